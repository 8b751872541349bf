"""Model FLOPs counted from a function's jaxpr, for throughput and model-FLOP utilization.

`count_flops(fn, *args)` traces `fn` and adds up the floating-point operations
of its convolutions (`conv_general_dilated`) and matrix products
(`dot_general`), counting a multiply-add as 2 FLOPs. Elementwise work,
normalization and reductions are not counted. Calls inside `jit`,
`custom_vjp`/`custom_jvp`, `remat`, `shard_map` and `cond` (the costliest
branch) are followed, and a `scan` body counts once per iteration. A
`while_loop` body has no known trip count and raises.

Inside `shard_map` or `pmap` the count is per device, because it reads the
shapes of the per-device body. The count comes from the program's shapes, so it
is the same on every backend,
but it counts only XLA's own convolutions. Count a model whose convolutions run
on jaxbase's oneDNN kernels (`jaxbase.kernels.conv`) with `conv_impl="xla"`.
"""

import math
from typing import Any, Callable

import jax
from jax.extend import core

_SUBJAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> int:
  """Returns the FLOPs of the convolutions and matrix products of `fn(*args, **kwargs)`.

  Args:
    fn: a JAX-traceable function.
    *args: its arguments: arrays or `jax.ShapeDtypeStruct`s.
    **kwargs: keyword arguments passed through to `fn`.

  Raises:
    ValueError: if `fn` contains a `while_loop`.
  """
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  return _jaxpr_flops(closed.jaxpr)


def _jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _jaxpr_flops(_open(eqn.params["jaxpr"]))
    elif name == "cond":
      total += max(_jaxpr_flops(_open(branch)) for branch in eqn.params["branches"])
    elif name == "while":
      raise ValueError(
          "count_flops cannot count a while_loop, whose number of iterations is unknown "
          "when tracing; use lax.scan or lax.fori_loop with static bounds instead"
      )
    else:
      for key in _SUBJAXPR_PARAMS:
        if key in eqn.params:
          total += _jaxpr_flops(_open(eqn.params[key]))
          break
  return total


def _open(jaxpr):
  return jaxpr.jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else jaxpr


def _conv_flops(eqn) -> int:
  """Returns 2 x output elements x (kernel window x input channels per group).

  Transposed convolutions and the input gradients of strided ones dilate their
  input with zeros. Counting their outputs would count those zeros, so they
  count from the input side: 2 x input elements x kernel window x output
  channels per group.
  """
  numbers = eqn.params["dimension_numbers"]
  kernel_shape = eqn.invars[1].aval.shape
  # rhs_spec: (output feature, input feature, spatial...) positions in the kernel.
  out_feature, in_feature, *spatial = numbers.rhs_spec
  window = math.prod(kernel_shape[axis] for axis in spatial)
  lhs_dilation = eqn.params.get("lhs_dilation") or ()
  if any(factor > 1 for factor in lhs_dilation):
    lhs_shape = eqn.invars[0].aval.shape
    # Batch and spatial positions of the input (lhs_spec[1] is its feature axis). Each input
    # channel meets the output channels of its group, so the group count cancels out.
    input_positions = math.prod(lhs_shape) // lhs_shape[numbers.lhs_spec[1]]
    return 2 * input_positions * window * kernel_shape[in_feature] * kernel_shape[out_feature]
  out_shape = eqn.outvars[0].aval.shape
  return 2 * math.prod(out_shape) * window * kernel_shape[in_feature]


def _dot_flops(eqn) -> int:
  """Returns 2 x output elements x contracted size."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  contracted = math.prod(lhs_shape[axis] for axis in lhs_contract)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
