"""jaxbase's BatchNorm against flax's: values, statistics, gradients, replicas, variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxbase.models.batchnorm import BatchNorm, batch_norm_train

SHAPE = (16, 3, 5, 6)  # Batch 16 so that 8 replicas each see 2 examples.


def _arrays(shape=SHAPE, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(1.5, 3.0, size=shape).astype(np.float32)
  residual = rng.normal(size=shape).astype(np.float32)
  weights = rng.normal(size=shape).astype(np.float32)  # Makes the loss depend on every output.
  channels = shape[-1]
  params = {
      "scale": jnp.asarray(rng.uniform(0.5, 2.0, channels).astype(np.float32)),
      "bias": jnp.asarray(rng.normal(size=channels).astype(np.float32)),
  }
  stats = {
      "mean": jnp.asarray(rng.normal(size=channels).astype(np.float32)),
      "var": jnp.asarray(rng.uniform(0.5, 2.0, channels).astype(np.float32)),
  }
  return jnp.asarray(x), jnp.asarray(residual), jnp.asarray(weights), params, stats


def _loss_fn(module, fused, use_residual, relu):
  """Loss of one BatchNorm layer, fused (jaxbase) or composed of flax's parts."""

  def loss(params, x, residual, weights, stats):
    variables = {"params": params, "batch_stats": stats}
    extra = residual if use_residual else None
    if fused:
      y, updates = module.apply(variables, x, extra, relu, mutable=["batch_stats"])
    else:
      y, updates = module.apply(variables, x, mutable=["batch_stats"])
      y = y + extra if use_residual else y
      y = nn.relu(y) if relu else y
    # A loss averaged over the local batch, as a train step's is.
    return jnp.sum(jnp.tanh(y) * weights) / x.shape[0], (y, updates["batch_stats"])

  return loss


def _value_and_grads(module, fused, use_residual, relu, arrays):
  x, residual, weights, params, stats = arrays
  grad_fn = jax.value_and_grad(_loss_fn(module, fused, use_residual, relu), (0, 1, 2), True)
  return grad_fn(params, x, residual, weights, stats)


@pytest.mark.parametrize("use_residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_training_mode_matches_flax(use_residual, relu):
  arrays = _arrays()
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  ours = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  (ref_loss, (ref_y, ref_stats)), ref_grads = _value_and_grads(
      flax_bn, False, use_residual, relu, arrays
  )
  (loss, (y, stats)), grads = _value_and_grads(ours, True, use_residual, relu, arrays)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(y, ref_y, atol=2e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(stats[key], ref_stats[key], rtol=1e-5, atol=1e-6)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(grads[0][name], ref_grads[0][name], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)
  if use_residual:
    np.testing.assert_allclose(grads[2], ref_grads[2], rtol=1e-5, atol=1e-7)
  else:
    np.testing.assert_array_equal(grads[2], 0.0)
  if relu:
    assert float(jnp.min(y)) == 0.0  # The ReLU really runs: some outputs are clipped.


def test_statistics_closed_form():
  x, _, _, _, _ = _arrays()
  y, mean, var = batch_norm_train(x, jnp.ones(6), jnp.zeros(6), epsilon=0.0)
  flat = np.asarray(x, np.float64).reshape(-1, 6)
  np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(var, flat.var(0), rtol=1e-4)
  normalized = np.asarray(y).reshape(-1, 6)
  np.testing.assert_allclose(normalized.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(normalized.var(0), 1.0, rtol=1e-4)


def test_gradients_central_differences():
  x, residual, weights, params, _ = _arrays(shape=(4, 2, 3), seed=1)

  def loss(x, scale, bias, residual):
    y, _, _ = batch_norm_train(x, scale, bias, residual, relu=True)
    return jnp.sum(jnp.tanh(y) * weights)

  grads = jax.grad(loss, (0, 1, 2, 3))(x, params["scale"], params["bias"], residual)
  args = [x, params["scale"], params["bias"], residual]
  eps = 1e-3
  rng = np.random.default_rng(2)
  for index, grad in enumerate(grads):
    direction = jnp.asarray(rng.normal(size=args[index].shape).astype(np.float32))
    plus = list(args)
    minus = list(args)
    plus[index] = args[index] + eps * direction
    minus[index] = args[index] - eps * direction
    numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=2e-2, atol=2e-3)


def test_eval_mode_matches_flax():
  x, residual, _, params, stats = _arrays()
  variables = {"params": params, "batch_stats": stats}
  ref = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
  ours = BatchNorm(use_running_average=True, epsilon=1e-5)
  np.testing.assert_allclose(ours.apply(variables, x), ref, atol=2e-5)
  np.testing.assert_allclose(
      ours.apply(variables, x, residual, True), nn.relu(ref + residual), atol=2e-5
  )


def test_variables_match_flax():
  x, _, _, _, _ = _arrays()
  flax_vars = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  our_vars = BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  describe = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert describe(our_vars) == describe(flax_vars)
  # Variables of one restore into the other: eval outputs agree.
  _, _, _, params, stats = _arrays()
  variables = {"params": params, "batch_stats": stats}
  np.testing.assert_allclose(
      BatchNorm(use_running_average=True).apply(variables, x),
      nn.BatchNorm(use_running_average=True).apply(variables, x),
      atol=2e-5,
  )


def test_eight_replicas_one_batch():
  """Statistics over `axis_name` make 8 replicas of 2 examples behave as one batch of 16."""
  arrays = _arrays()
  x, residual, weights, params, stats = arrays
  module = BatchNorm(use_running_average=False, momentum=0.9, axis_name="data")
  single = BatchNorm(use_running_average=False, momentum=0.9)
  (loss1, (y1, stats1)), grads1 = _value_and_grads(single, True, True, True, arrays)

  grad_fn = jax.value_and_grad(_loss_fn(module, True, True, True), (0, 1, 2), True)

  def per_replica(params, x, residual, weights, stats):
    (loss, (y, new_stats)), (dparams, dx, dresidual) = grad_fn(params, x, residual, weights, stats)
    # As the train step does: average the losses and parameter gradients. The
    # per-replica losses are means over 2 examples, the single one over 16, so
    # the input gradients differ by the factor 8.
    mean = lambda tree: jax.lax.pmean(tree, "data")
    return mean(loss), y, new_stats, mean(dparams), dx / 8, dresidual / 8

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  mapped = jax.jit(
      jax.shard_map(
          per_replica,
          mesh=mesh,
          in_specs=(P(), P("data"), P("data"), P("data"), P()),
          out_specs=(P(), P("data"), P(), P(), P("data"), P("data")),
          check_vma=False,
      )
  )
  loss8, y8, stats8, dparams8, dx8, dresidual8 = mapped(params, x, residual, weights, stats)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  np.testing.assert_allclose(y8, y1, atol=2e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(stats8[key], stats1[key], rtol=1e-5, atol=1e-6)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(dparams8[name], grads1[0][name], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dx8, grads1[1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dresidual8, grads1[2], rtol=1e-4, atol=1e-7)


def test_bfloat16_float32_statistics():
  x, residual, _, params, _ = _arrays()
  y, mean, var = batch_norm_train(
      x.astype(jnp.bfloat16), params["scale"], params["bias"], residual.astype(jnp.bfloat16)
  )
  assert y.dtype == jnp.bfloat16
  assert mean.dtype == var.dtype == jnp.float32
  ref, _, _ = batch_norm_train(x, params["scale"], params["bias"], residual)
  np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=0.1)


def test_bad_shapes_rejected():
  x = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r"scale must have shape \(3,\).*got \(4,\)"):
    batch_norm_train(x, jnp.ones(4), jnp.zeros(3))
  with pytest.raises(ValueError, match=r"residual must have the shape of x \(4, 3\)"):
    batch_norm_train(x, jnp.ones(3), jnp.zeros(3), jnp.zeros((4, 1)))
  with pytest.raises(ValueError, match=r"invalid x of shape \(3,\)"):
    batch_norm_train(jnp.zeros(3), jnp.ones(3), jnp.zeros(3))
  eval_mode = BatchNorm(use_running_average=True)
  variables = eval_mode.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"residual must have the shape of x \(4, 3\)"):
    eval_mode.apply(variables, x, jnp.zeros((1, 3)))


def test_integer_input_and_list_parameters():
  y, _, _ = batch_norm_train(jnp.arange(8).reshape(4, 2), [1.0, 1.0], [0.0, 0.0], epsilon=0.0)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y[:, 0], (np.arange(0, 8, 2) - 3) / np.sqrt(5.0), rtol=1e-6)


def test_check_vma_matches_unchecked():
  """With check_vma=True, JAX itself sums the parameter gradients over replicas."""
  x, residual, weights, params, stats = _arrays()
  module = BatchNorm(use_running_average=False, axis_name="data")
  grad_fn = jax.grad(lambda *args: _loss_fn(module, True, True, True)(*args)[0])
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def mapped(check_vma):
    def per_replica(params, x, residual, weights):
      grads = grad_fn(params, x, residual, weights, stats)
      # Unchecked, the gradient is this replica's share and needs the sum.
      return grads if check_vma else jax.lax.psum(grads, "data")

    specs = (P(), P("data"), P("data"), P("data"))
    return jax.jit(
        jax.shard_map(per_replica, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
    )(params, x, residual, weights)

  checked, unchecked = mapped(True), mapped(False)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(checked[name], unchecked[name], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(checked["scale"]).sum()) > 0


def test_training_init_outside_mapped_axis():
  x, _, _, _, _ = _arrays()
  variables = BatchNorm(use_running_average=False, axis_name="data").init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)


def test_gradient_dtypes_follow_inputs():
  x, residual, weights, params, _ = _arrays()

  def loss(x, residual):
    y, _, _ = batch_norm_train(
        x, params["scale"], params["bias"], residual, relu=True, dtype=jnp.float32
    )
    return jnp.sum(y * weights)

  x16 = x.astype(jnp.bfloat16)
  dx, dresidual = jax.grad(loss, (0, 1))(x16, residual)
  assert dx.dtype == jnp.bfloat16
  assert dresidual.dtype == jnp.float32
  dx32, dresidual32 = jax.grad(loss, (0, 1))(x16.astype(jnp.float32), residual)
  np.testing.assert_allclose(dresidual, dresidual32, atol=1e-6)
  np.testing.assert_allclose(dx.astype(jnp.float32), dx32, rtol=0.02, atol=0.02)


def test_output_dtype_promotes_like_flax():
  x, _, _, _, _ = _arrays()
  x16 = x.astype(jnp.bfloat16)
  ours = BatchNorm(use_running_average=False)
  theirs = nn.BatchNorm(use_running_average=False)
  y, _ = ours.apply(ours.init(jax.random.key(0), x16), x16, mutable=["batch_stats"])
  ref, _ = theirs.apply(theirs.init(jax.random.key(0), x16), x16, mutable=["batch_stats"])
  assert y.dtype == ref.dtype == jnp.float32
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_large_mean_keeps_precision():
  """The gradient stays accurate when the mean is 100 times the spread."""
  rng = np.random.default_rng(3)
  x = jnp.asarray((100.0 + rng.normal(size=(64, 4))).astype(np.float32))
  weights = jnp.asarray(rng.normal(size=(64, 4)).astype(np.float32))

  def loss(x, scale):
    y, _, _ = batch_norm_train(x, scale, jnp.zeros(4))
    return jnp.sum(y * weights)

  dx, dscale = jax.grad(loss, (0, 1))(x, jnp.ones(4))
  x64 = np.asarray(x, np.float64)
  centered = x64 - x64.mean(0)
  std = np.sqrt(x64.var(0) + 1e-5)
  w = np.asarray(weights, np.float64)
  np.testing.assert_allclose(dscale, (w * centered / std).sum(0), rtol=1e-3, atol=1e-3)
  expected_dx = (w - w.mean(0) - centered / std * (w * centered / std).mean(0)) / std
  np.testing.assert_allclose(dx, expected_dx, rtol=1e-2, atol=1e-3)
