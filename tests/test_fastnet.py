"""Tests for the FastNet family and the fast CIFAR-10 recipe that uses it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxbase import models
from jaxbase.configs import cifar10_fast
from jaxbase.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASTNET_VARIANTS,
    MODELS,
    FastNet,
    build_model,
    count_params,
    fastnet_multiply_adds,
)
from jaxbase.train import config_check

# Three max-pooling stages take 8x8 images to 1x1, and a batch of 16 splits over
# the 8 fake devices of conftest.py.
IMAGE_SHAPE = (16, 8, 8, 3)


def rng_key(seed=0):
  return jax.random.key(seed, impl="rbg")


def random_images(shape=IMAGE_SHAPE, seed=0):
  return jax.random.uniform(rng_key(seed), shape, jnp.float32)


def model_config(name, **fields):
  return ml_collections.ConfigDict(dict(name=name, **fields))


def closed_form_param_count(stem_width, stage_widths, num_classes, channels=3):
  """Parameters from the layer shapes: 3x3 kernels without bias, BatchNorm scale and bias."""
  count = 9 * channels * stem_width + 2 * stem_width
  previous = stem_width
  for width in stage_widths:
    count += 9 * previous * width + 2 * width  # Conv and BatchNorm before the pool.
    count += 2 * (9 * width * width + 2 * width)  # The residual pair.
    previous = width
  return count + previous * num_classes  # The head has no bias.


def conv_and_dense_multiply_adds(model, image_size=32):
  """Multiply-adds of every Conv and Dense layer, from their kernels and output shapes.

  Each output element of a layer costs one multiply-add per kernel entry
  feeding it: kernel.size / out_features. Shapes come from `jax.eval_shape`,
  so nothing is computed.
  """
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

  def forward():
    variables = model.init(rng_key(0), images, train=False)
    _, state = model.apply(
        variables,
        images,
        train=False,
        capture_intermediates=lambda module, _: isinstance(module, (nn.Conv, nn.Dense)),
        mutable=["intermediates"],
    )
    return variables["params"], state["intermediates"]

  params, intermediates = jax.eval_shape(forward)
  kernels = {
      tuple(key.key for key in path[:-1]): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if path[-1].key == "kernel"
  }
  total = 0
  for path, output in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    layer = tuple(key.key for key in path if hasattr(key, "key"))[:-1]  # Drop '__call__'.
    kernel = kernels[layer]
    total += int(np.prod(output.shape)) * int(np.prod(kernel.shape)) // kernel.shape[-1]
  assert len(kernels) > 0
  return total


# --- sizes --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FASTNET_VARIANTS))
def test_param_count_matches_layer_shapes(name):
  variant = FASTNET_VARIANTS[name]
  images = jnp.zeros((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: MODELS[name](10).init(rng_key(0), images, train=False))
  expected = closed_form_param_count(variant["stem_width"], variant["stage_widths"], 10)
  assert count_params(variables["params"]) == expected


def test_param_counts_in_docstring():
  images = jnp.zeros((1, 32, 32, 3), jnp.float32)
  counts = {
      name: count_params(
          jax.eval_shape(lambda: MODELS[name](10).init(rng_key(0), images, train=False))["params"]
      )
      for name in FASTNET_VARIANTS
  }
  assert counts == {"fastnet": 3_195_680, "fastnet_s": 613_382}


@pytest.mark.parametrize("name", sorted(FASTNET_VARIANTS))
def test_multiply_adds_match_layer_outputs(name):
  variant = FASTNET_VARIANTS[name]
  counted = conv_and_dense_multiply_adds(MODELS[name](10))
  assert fastnet_multiply_adds(variant["stem_width"], variant["stage_widths"]) == counted


def test_multiply_adds_in_docstring():
  assert conv_and_dense_multiply_adds(MODELS["fastnet"](10)) == 208_505_344
  assert conv_and_dense_multiply_adds(MODELS["fastnet_s"](10)) == 40_127_584
  assert conv_and_dense_multiply_adds(MODELS["resnet20"](10, axis_name=None)) == 40_813_184


def test_small_width_costs_at_most_resnet20():
  fastnet_s = conv_and_dense_multiply_adds(MODELS["fastnet_s"](10))
  resnet20 = conv_and_dense_multiply_adds(MODELS["resnet20"](10, axis_name=None))
  assert fastnet_s <= resnet20
  # The next uniform scaling step (15/32 of fastnet's widths) would exceed it.
  assert fastnet_multiply_adds(15, (30, 120, 120)) > resnet20


# --- outputs and dtypes -------------------------------------------------------


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = build_model(model_config("fastnet_s", dtype="bfloat16"), num_classes=10, axis_name=None)
  images = random_images()
  variables = model.init(rng_key(0), images, train=False)

  assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  assert {leaf.dtype for leaf in jax.tree.leaves(variables["batch_stats"])} == {
      jnp.dtype(jnp.float32)
  }
  eval_logits, state = model.apply(
      variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  train_logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert eval_logits.shape == (IMAGE_SHAPE[0], 10)
  assert eval_logits.dtype == jnp.float32
  assert train_logits.dtype == jnp.float32
  conv_output = state["intermediates"]["stage1"]["res_conv1"]["__call__"][0]
  assert conv_output.dtype == jnp.bfloat16


def test_logits_are_head_output_times_scale():
  images = random_images()
  scaled = FastNet(10, stem_width=8, stage_widths=(8, 16, 16), axis_name=None)
  unscaled = scaled.clone(logit_scale=1.0)
  variables = scaled.init(rng_key(0), images, train=False)
  np.testing.assert_allclose(
      scaled.apply(variables, images, train=False),
      unscaled.apply(variables, images, train=False) / 8,
      rtol=1e-6,
  )


def test_head_reads_global_max_of_last_stage():
  images = random_images(seed=1)
  model = FastNet(10, stem_width=8, stage_widths=(8, 16, 16), axis_name=None)
  variables = model.init(rng_key(0), images, train=False)
  logits, state = model.apply(
      variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  features = state["intermediates"]["stage3"]["__call__"][0]
  pooled = jnp.max(features, axis=(1, 2))
  expected = pooled @ variables["params"]["head"]["kernel"] * model.logit_scale
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  assert "bias" not in variables["params"]["head"]


def test_batchnorm_cross_replica_matches_full_batch():
  assert jax.device_count() == 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  images = random_images()
  single = FastNet(10, stem_width=8, stage_widths=(8, 16, 16), axis_name=None)
  replicated = single.clone(axis_name="data")
  variables = single.init(rng_key(0), images, train=False)
  full_logits, full_state = single.apply(variables, images, train=True, mutable=["batch_stats"])

  def train_apply(variables, images):
    logits, state = replicated.apply(variables, images, train=True, mutable=["batch_stats"])
    return logits, state["batch_stats"]

  sharded = jax.jit(
      jax.shard_map(train_apply, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()))
  )
  sharded_logits, sharded_stats = sharded(variables, images)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      full_state["batch_stats"],
      sharded_stats,
  )
  np.testing.assert_allclose(full_logits, sharded_logits, rtol=1e-4, atol=1e-5)


def test_default_normalization_is_cifar10():
  model = build_model(model_config("fastnet_s"), num_classes=10)
  assert isinstance(model, FastNet)
  assert model.mean == CIFAR10_MEAN
  assert model.std == CIFAR10_STD
  assert model.axis_name == "data"
  # An image at the mean pixel normalizes to zero, like an all-zero input without normalization.
  centered = FastNet(10, stem_width=8, stage_widths=(8, 16, 16), axis_name=None)
  raw = centered.clone(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  variables = centered.init(rng_key(0), random_images(), train=False)
  mean_images = jnp.broadcast_to(jnp.asarray(CIFAR10_MEAN), (2, 8, 8, 3))
  np.testing.assert_allclose(
      centered.apply(variables, mean_images, train=False),
      raw.apply(variables, jnp.zeros((2, 8, 8, 3)), train=False),
      atol=1e-6,
  )


# --- invalid input ------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("plain", True),
        ("zero_init_residual", True),
        ("drop_path_rate", 0.1),
        ("head_dropout_rate", 0.1),
        ("dropout_rate", 0.1),
    ],
)
def test_build_rejects_resnet_only_fields(field, value):
  with pytest.raises(ValueError, match=f"{field}={value}.*set it to (False|0)"):
    build_model(model_config("fastnet_s", **{field: value}), num_classes=10)


def test_image_side_not_divisible_raises():
  model = MODELS["fastnet_s"](10, axis_name=None)
  with pytest.raises(ValueError, match="use sides divisible by 8"):
    model.init(rng_key(0), jnp.zeros((2, 28, 28, 3)), train=False)


def test_uint8_images_raise():
  model = MODELS["fastnet_s"](10, axis_name=None)
  with pytest.raises(ValueError, match="must be float in"):
    model.init(rng_key(0), jnp.zeros((2, 32, 32, 3), jnp.uint8), train=False)


# --- the cifar10_fast config --------------------------------------------------


def test_fast_config_builds_its_model():
  config = cifar10_fast.get_config()
  config_check.check_config(config)
  assert config.model.name == "fastnet_s"
  assert config.eval_flip is True
  assert 0 < config.ema.decay < 1
  assert config.loss.label_smoothing > 0
  assert config.optim.nesterov is True
  assert config.optim.schedule == "onecycle"
  assert config.data.source == "folder"
  assert config.num_epochs == 10

  model = models.build_model(config.model, num_classes=10)
  assert isinstance(model, FastNet)
  assert model.stage_widths == FASTNET_VARIANTS["fastnet_s"]["stage_widths"]
  assert model.mean == tuple(config.model.mean)
  logits = jax.eval_shape(
      lambda: model.apply(
          model.init(rng_key(0), jnp.zeros((2, 32, 32, 3)), train=False),
          jnp.zeros((2, 32, 32, 3)),
          train=False,
      )
  )
  assert logits.shape == (2, 10)
  assert logits.dtype == jnp.float32
