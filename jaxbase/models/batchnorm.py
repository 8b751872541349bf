"""BatchNorm with a hand-written gradient and an optional fused residual add and ReLU.

`BatchNorm` is a drop-in replacement for `flax.linen.BatchNorm` over the last
axis, with the attributes that jaxbase's models use. It has the same variables
(params 'scale' and 'bias', batch_stats 'mean' and 'var') and the same running
average update. Its statistics are flax's too: float32, the variance as
E[x^2] - E[x]^2 clipped at zero, averaged over `axis_name` when set. A
checkpoint written with either module restores into the other.

Why: in training mode, differentiating flax's BatchNorm and the ReLU after it
leaves XLA several passes over each activation in the backward pass. The
gradient written out by hand needs one reduction pass (the sums of dy and
dy * (x - mean), with the ReLU mask applied on the fly) and one elementwise
pass for dx. The forward pass needs one reduction and one elementwise pass, and
`residual` and `relu` fold a residual block's shortcut add and activation into
that elementwise pass. With it, a ResNet-20 train step at batch 128 on 2 CPU cores ran at 652
instead of 590 images per second (medians of 10 rounds of
`scripts/benchmark.py`; BENCHMARKS.md, "Speed against PyTorch on CPU").

`batch_norm_train` is the pure function underneath, for use outside Flax.

Limits: the gradient is a `jax.custom_vjp`, so training-mode BatchNorm has no
forward-mode derivative (`jax.jvp`, `jax.jacfwd`). With an axis bound by
`jax.vmap`, `jax.grad` must be taken inside the vmap (see `batch_norm_train`). Reverse-mode second
derivatives work: a Hessian-vector product matched flax's to 2e-7. The
statistics it returns for the running averages carry no gradient. Eval mode
(running averages) is ordinary JAX code.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxbase.kernels import conv as kernel_conv

Dtype = Any


def _reduce_axes(x) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def _global_count(x, axis_name: str | None) -> int:
  """Returns the number of values per channel in the batch, summed over `axis_name` when set."""
  count = x.size // x.shape[-1]
  return count if axis_name is None else count * lax.psum(1, axis_name)


def batch_norm_train(
    x,
    scale,
    bias,
    residual=None,
    *,
    axis_name: str | None = None,
    epsilon: float = 1e-5,
    relu: bool = False,
    dtype=None,
):
  """Normalize `x` with its batch statistics, then optionally add `residual` and apply ReLU.

  Computes `y = (x - mean) / sqrt(var + epsilon) * scale + bias`, then
  `y + residual` when `residual` is given, then `max(y, 0)` when `relu`.
  Statistics are per channel (the last axis) over all other axes, in float32.

  Args:
    x: float[..., channels] (any rank of at least 2).
    scale: float[channels].
    bias: float[channels].
    residual: None, or an array of the shape of `x` added after the
      normalization (a residual block's shortcut).
    axis_name: mapped axis (`jax.shard_map` or `jax.pmap`) over which the
      statistics are averaged, or None for this replica's batch alone. Under
      `jax.vmap(..., axis_name=...)`, take gradients inside the vmap: the
      backward pass needs the axis, so `jax.grad` of a vmapped function
      raises an unbound axis name error.
    epsilon: added to the variance.
    relu: apply ReLU last.
    dtype: dtype of y; None keeps a floating `x`'s dtype and gives float32
      for integer `x`. The computation runs in float32 and rounds once, to
      this dtype.

  Returns:
    (y, mean, var): y of the shape of `x`; mean and var float32
    [channels], the (biased) batch statistics, without gradient.
  """
  x, scale, bias = jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)
  if x.ndim < 2:
    raise ValueError(
        f"invalid x of shape {tuple(x.shape)}: expected [batch, ..., channels], at least 2 axes"
    )
  channels = x.shape[-1]
  for name, value in (("scale", scale), ("bias", bias)):
    if tuple(value.shape) != (channels,):
      raise ValueError(
          f"{name} must have shape ({channels},) for x of shape {tuple(x.shape)}, "
          f"got {tuple(value.shape)}"
      )
  _check_residual(x, residual)
  if dtype is None:
    # Integer inputs normalize to float32, as flax's BatchNorm gives them.
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  out_dtype = jnp.dtype(dtype)
  scale = scale.astype(jnp.float32)
  bias = bias.astype(jnp.float32)
  if axis_name is not None:
    # Under shard_map with check_vma=True the replicated parameters must vary like
    # x, and the transpose of this cast sums their gradients over the replicas.
    scale, bias = kernel_conv.vary_alike(x, scale, bias)[1:]
  y, mean, var = _batch_norm(
      x, scale, bias, residual, axis_name, float(epsilon), bool(relu), out_dtype
  )
  return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def _check_residual(x, residual) -> None:
  if residual is not None and tuple(residual.shape) != tuple(x.shape):
    raise ValueError(
        f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
    )


def _normalize(x, mean, inv_std, scale, bias, residual, relu: bool):
  """Returns `relu((x - mean) * inv_std * scale + bias + residual)` in float32."""
  y = (x.astype(jnp.float32) - mean) * (scale.astype(jnp.float32) * inv_std)
  y = y + bias.astype(jnp.float32)
  if residual is not None:
    y = y + residual.astype(jnp.float32)
  if relu:
    y = jnp.maximum(y, 0.0)
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _batch_norm(x, scale, bias, residual, axis_name, epsilon, relu, out_dtype):
  return _batch_norm_fwd(x, scale, bias, residual, axis_name, epsilon, relu, out_dtype)[0]


def _batch_norm_fwd(x, scale, bias, residual, axis_name, epsilon, relu, out_dtype):
  axes = _reduce_axes(x)
  x32 = x.astype(jnp.float32)
  # One pass for both sums, and one collective for both.
  sums = jnp.stack([jnp.sum(x32, axis=axes), jnp.sum(x32 * x32, axis=axes)])
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  count = _global_count(x, axis_name)
  mean = sums[0] / count
  var = jnp.maximum(sums[1] / count - mean * mean, 0.0)
  inv_std = lax.rsqrt(var + epsilon)
  y = _normalize(x32, mean, inv_std, scale, bias, residual, relu).astype(out_dtype)
  # The ReLU mask comes from y, which the next layer keeps for its own gradient anyway.
  # Whether there is a residual, and its dtype, travel as an empty array or none.
  residual_marker = () if residual is None else (jnp.zeros((0,), residual.dtype),)
  saved = (x, y if relu else None, mean, inv_std, scale, residual_marker)
  return (y, mean, var), saved


def _batch_norm_bwd(axis_name, epsilon, relu, out_dtype, saved, cotangents):
  del epsilon, out_dtype  # Already in inv_std, and the cotangent's dtype.
  x, y, mean, inv_std, scale, residual_marker = saved
  dy = cotangents[0]  # The statistics leave through stop_gradient, so their cotangents are 0.
  if relu:
    dy = jnp.where(y > 0, dy, jnp.zeros((), dy.dtype))
  dresidual = dy.astype(residual_marker[0].dtype) if residual_marker else None
  axes = _reduce_axes(x)
  dy32 = dy.astype(jnp.float32)
  centered = x.astype(jnp.float32) - mean
  local = jnp.stack([jnp.sum(dy32, axis=axes), jnp.sum(dy32 * centered, axis=axes)])
  # The parameter gradients are this replica's share, as autodiff of flax's
  # BatchNorm gives them. The train step averages gradients over replicas itself.
  dbias = local[0]
  dscale = local[1] * inv_std
  # The input gradient also flows through the statistics, which every replica
  # shares, so it needs the sums over all replicas.
  sums = local if axis_name is None else lax.psum(local, axis_name)
  count = _global_count(x, axis_name)
  multiplier = scale * inv_std
  # dx = multiplier * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with
  # x_hat = (x - mean) * inv_std, as per-channel coefficients of dy and x - mean.
  centered_coefficient = multiplier * inv_std * inv_std * sums[1] / count
  dx = multiplier * (dy32 - sums[0] / count) - centered_coefficient * centered
  return dx.astype(x.dtype), dscale, dbias, dresidual


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis, with an optional fused residual add and ReLU.

  Same variables and statistics as `flax.linen.BatchNorm` with its defaults
  (see the module docstring); `__call__(x, residual=None, relu=False)`
  computes `relu(batch_norm(x) + residual)` in one fused step.

  Attributes:
    use_running_average: normalize with the running averages (eval) instead
      of the batch statistics (training, which updates the averages when the
      'batch_stats' collection is mutable).
    axis_name: mapped axis over which training statistics are averaged, or
      None.
    momentum: weight of the old running average in each update.
    epsilon: added to the variance.
    dtype: output dtype; None promotes the input dtype with `param_dtype`.
    param_dtype: dtype of 'scale' and 'bias'.
    scale_init: initializer of 'scale'.
    bias_init: initializer of 'bias'.
  """

  use_running_average: bool = False
  axis_name: str | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, residual=None, relu: bool = False):
    """Normalize `x: float[..., channels]`. See `batch_norm_train` for `residual` and `relu`."""
    channels = x.shape[-1]
    running_mean = self.variable(
        "batch_stats", "mean", lambda shape: jnp.zeros(shape, jnp.float32), (channels,)
    )
    running_var = self.variable(
        "batch_stats", "var", lambda shape: jnp.ones(shape, jnp.float32), (channels,)
    )
    scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (channels,), self.param_dtype)
    # As flax does: without a dtype, the output promotes the input with the parameters.
    dtype = self.dtype or jnp.result_type(x, scale, bias)

    if self.use_running_average:
      _check_residual(x, residual)
      inv_std = lax.rsqrt(running_var.value + self.epsilon)
      y = _normalize(x, running_mean.value, inv_std, scale, bias, residual, relu)
      return y.astype(dtype)

    # As in flax, `init` runs outside any mapped axis, so it uses this replica's batch.
    y, mean, var = batch_norm_train(
        x,
        scale,
        bias,
        residual,
        axis_name=None if self.is_initializing() else self.axis_name,
        epsilon=self.epsilon,
        relu=relu,
        dtype=dtype,
    )
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y
