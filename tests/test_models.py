"""Tests for the ResNet family and the model registry."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxbase.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODELS,
    ResNet,
    VARIANTS,
    build_model,
    count_params,
    normalize_images,
)

IMAGENET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Every test that runs a model uses this image shape, so the per-shape XLA
# compilations that dominate eager execution on CPU are shared across tests.
# A batch of 16 splits evenly over the 8 fake devices set up in conftest.py.
IMAGE_SHAPE = (16, 8, 8, 3)


def rng_key(seed=0):
  # Measured on a 2-core CPU: threefry random ops took 1 to 2 s to compile
  # per new parameter shape and rbg ops about 0.3 s.
  return jax.random.key(seed, impl="rbg")


def model_config(name, **fields):
  return ml_collections.ConfigDict(dict(name=name, **fields))


def abstract_params(model, image_size=32, channels=3):
  """Return the params tree as ShapeDtypeStructs, without allocating it."""
  images = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(rng_key(0), images, train=False))
  return variables["params"]


def param_paths(params):
  return {
      "/".join(str(key.key) for key in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def random_images(shape, seed=0):
  return jax.random.uniform(rng_key(seed), shape, jnp.float32)


def restrict_to(tree, template):
  """Return the subtree of `tree` with the keys of `template`, recursively."""
  if not hasattr(template, "items"):
    return tree
  return {key: restrict_to(tree[key], value) for key, value in template.items()}


def small_resnet(block, **attributes):
  """Two-stage network of the given block type, small enough to run on CPU."""
  return ResNet(
      stage_sizes=(2, 1),
      stage_widths=(16, 32),
      num_classes=5,
      block=block,
      stem_width=16,
      axis_name=None,
      **attributes,
  )


# --- parameter counts ---------------------------------------------------------

# (name, num_classes, measured count, literature count, relative tolerance).
# torchvision's totals for the ImageNet models are exact. He et al. 2016
# ("Deep Residual Learning for Image Recognition") give 0.27M, 0.85M and 1.7M
# for CIFAR ResNet-20/56/110 with zero-padded identity shortcuts (option A),
# which have no parameters. The 1x1 projection shortcuts used here (option B)
# add 2,752 parameters at every depth. Pre-activation ResNet-18 has a final
# BatchNorm before pooling, so it has 1,024 more parameters than
# implementations that omit it (11,171,146).
PARAM_COUNTS = [
    ("resnet20", 10, 272_474, 270_000, 0.02),
    ("resnet32", 10, 466_906, 460_000, 0.02),
    ("resnet44", 10, 661_338, 660_000, 0.02),
    ("resnet56", 10, 855_770, 850_000, 0.02),
    ("resnet110", 10, 1_730_714, 1_700_000, 0.02),
    ("preact_resnet18", 10, 11_172_170, 11_170_000, 0.001),
    ("wrn28_10", 10, 36_479_194, 36_500_000, 0.001),
    ("resnet18", 1000, 11_689_512, 11_689_512, 0.0),
    ("resnet34", 1000, 21_797_672, 21_797_672, 0.0),
    ("resnet50", 1000, 25_557_032, 25_557_032, 0.0),
    ("resnet101", 1000, 44_549_160, 44_549_160, 0.0),
    ("resnet152", 1000, 60_192_808, 60_192_808, 0.0),
]


@pytest.mark.parametrize("name, num_classes, measured, literature, rel_tol", PARAM_COUNTS)
def test_param_count_matches_literature(name, num_classes, measured, literature, rel_tol):
  count = count_params(abstract_params(MODELS[name](num_classes)))
  assert count == measured
  assert count == pytest.approx(literature, rel=rel_tol)


def test_plain_resnet20_matches_option_a_count():
  # Option-A shortcuts have no parameters, so a CIFAR ResNet with option A
  # has exactly the parameters of the plain network.
  count = count_params(abstract_params(MODELS["resnet20"](10, plain=True)))
  assert count == 269_722


def test_registry_lists_every_variant():
  expected = {
      "resnet8",
      "resnet20",
      "resnet32",
      "resnet44",
      "resnet56",
      "resnet110",
      "preact_resnet18",
      "wrn28_10",
      "resnet18",
      "resnet34",
      "resnet50",
      "resnet101",
      "resnet152",
  }
  bert = {f"bert_{size}" for size in ("tiny", "mini", "small", "medium", "base")}
  vit = {f"vit_{size}/{patch}" for size in ("ti", "s", "b") for patch in (4, 8, 16)}
  fastnet = {"fastnet", "fastnet_s"}
  assert set(MODELS) == expected | {"cnn_madry", "cnn_small"} | fastnet | bert | vit
  assert set(VARIANTS) == expected


def test_count_params_on_concrete_arrays():
  params = {"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros((5,))}}
  assert count_params(params) == 17


# --- plain networks -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_plain_has_no_shortcut_params(name):
  num_classes = 1000 if name in IMAGENET_NAMES else 10
  residual = abstract_params(MODELS[name](num_classes))
  plain = abstract_params(MODELS[name](num_classes, plain=True))

  plain_paths = param_paths(plain)
  residual_paths = param_paths(residual)
  assert not [path for path in plain_paths if "shortcut" in path]
  # Removing the shortcuts must leave every other layer in place.
  assert plain_paths == {p for p in residual_paths if "shortcut" not in p}
  assert count_params(plain) <= count_params(residual)


@pytest.mark.parametrize("block", ["basic", "bottleneck", "preact_basic"])
def test_plain_output_differs_with_shared_params(block):
  images = random_images(IMAGE_SHAPE)
  residual_model = small_resnet(block)
  plain_model = small_resnet(block, plain=True)
  variables = residual_model.init(rng_key(0), images, train=False)
  plain_shapes = jax.eval_shape(lambda: plain_model.init(rng_key(0), images, train=False))
  # Keep only the variables the plain model has, by dropping shortcut layers.
  plain_variables = restrict_to(variables, plain_shapes)

  residual_logits = residual_model.apply(variables, images, train=False)
  plain_logits = plain_model.apply(plain_variables, images, train=False)

  assert plain_logits.shape == (IMAGE_SHAPE[0], 5)
  assert bool(jnp.all(jnp.isfinite(plain_logits)))
  assert not np.allclose(residual_logits, plain_logits, atol=1e-4)


# --- dtypes -------------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = build_model(model_config("resnet20", dtype="bfloat16"), num_classes=10, axis_name=None)
  images = random_images(IMAGE_SHAPE)
  variables = model.init(rng_key(0), images, train=False)

  param_dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables["params"])}
  stats_dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables["batch_stats"])}
  assert param_dtypes == {jnp.dtype(jnp.float32)}
  assert stats_dtypes == {jnp.dtype(jnp.float32)}

  eval_logits = model.apply(variables, images, train=False)
  train_logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  assert eval_logits.dtype == jnp.float32
  assert train_logits.dtype == jnp.float32
  assert model.dtype == jnp.bfloat16


def test_bfloat16_compute_runs_convolutions_in_bfloat16():
  model = build_model(model_config("resnet20", dtype="bfloat16"), num_classes=10, axis_name=None)
  images = random_images(IMAGE_SHAPE)
  variables = model.init(rng_key(0), images, train=False)
  _, state = model.apply(
      variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  conv_output = state["intermediates"]["stage1_block1"]["conv1"]["__call__"][0]
  assert conv_output.dtype == jnp.bfloat16


# --- zero_init_residual -------------------------------------------------------


def test_zero_init_residual_zeroes_last_bn_scale():
  model = MODELS["resnet20"](10, zero_init_residual=True)
  params = model.init(rng_key(0), random_images(IMAGE_SHAPE), train=False)["params"]
  blocks = [name for name in params if name.startswith("stage")]
  assert len(blocks) == 9
  for block in blocks:
    assert not np.any(params[block]["bn2"]["scale"]), block
    assert np.all(params[block]["bn1"]["scale"] == 1), block
    if "shortcut_bn" in params[block]:
      assert np.all(params[block]["shortcut_bn"]["scale"] == 1), block


def test_zero_init_residual_zeroes_bottleneck_bn3():
  model = small_resnet("bottleneck", zero_init_residual=True)
  params = model.init(rng_key(0), random_images(IMAGE_SHAPE), train=False)["params"]
  for block in ("stage1_block1", "stage1_block2", "stage2_block1"):
    assert not np.any(params[block]["bn3"]["scale"]), block
    assert np.all(params[block]["bn2"]["scale"] == 1), block


def test_zero_init_residual_zeroes_preact_last_conv():
  model = small_resnet("preact_basic", zero_init_residual=True)
  params = model.init(rng_key(0), random_images(IMAGE_SHAPE), train=False)["params"]
  for block in ("stage1_block1", "stage1_block2", "stage2_block1"):
    assert not np.any(params[block]["conv2"]["kernel"]), block
    assert np.any(params[block]["conv1"]["kernel"]), block


def test_zero_init_residual_blocks_are_identity_at_init():
  # Stage 1 of ResNet-20 has identity shortcuts and non-negative inputs
  # (after the stem's ReLU), so each zero-initialized block returns its input.
  model = MODELS["resnet20"](10, zero_init_residual=True)
  images = random_images(IMAGE_SHAPE)
  variables = model.init(rng_key(0), images, train=False)
  _, state = model.apply(
      variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  outputs = state["intermediates"]
  stem = jax.nn.relu(outputs["stem_bn"]["__call__"][0])
  for block in ("stage1_block1", "stage1_block2", "stage1_block3"):
    np.testing.assert_allclose(outputs[block]["__call__"][0], stem, err_msg=block)


def test_zero_init_residual_preact_block_returns_shortcut():
  model = small_resnet("preact_basic", zero_init_residual=True)
  images = random_images(IMAGE_SHAPE)
  variables = model.init(rng_key(0), images, train=False)
  _, state = model.apply(
      variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  outputs = state["intermediates"]
  stem = outputs["stem_conv"]["__call__"][0]
  np.testing.assert_allclose(outputs["stage1_block1"]["__call__"][0], stem)
  np.testing.assert_allclose(outputs["stage1_block2"]["__call__"][0], stem)


def test_zero_init_residual_with_plain_raises():
  model = MODELS["resnet20"](10, plain=True, zero_init_residual=True)
  with pytest.raises(ValueError, match="plain=True"):
    model.init(rng_key(0), random_images(IMAGE_SHAPE), train=False)


# --- input normalization ------------------------------------------------------


def test_normalize_images_maps_mean_to_zero():
  mean = (0.1, 0.5, 0.9)
  std = (0.2, 0.25, 0.5)
  images = jnp.broadcast_to(jnp.asarray(mean), IMAGE_SHAPE)
  np.testing.assert_allclose(normalize_images(images, mean, std), 0.0, atol=1e-7)

  images = jnp.broadcast_to(jnp.asarray(mean) + jnp.asarray(std), IMAGE_SHAPE)
  np.testing.assert_allclose(normalize_images(images, mean, std), 1.0, atol=1e-6)


def test_model_normalizes_with_its_mean():
  # normalize(mean; mean, std) == normalize(0; 0, std), so both models must
  # see the same stem input and return the same logits from the same params.
  mean = (0.3, 0.6, 0.2)
  std = (0.2, 0.3, 0.4)
  shifted = MODELS["resnet20"](10, mean=mean, std=std)
  centered = MODELS["resnet20"](10, mean=(0.0, 0.0, 0.0), std=std)
  mean_images = jnp.broadcast_to(jnp.asarray(mean), IMAGE_SHAPE)
  variables = shifted.init(rng_key(0), mean_images, train=False)

  shifted_logits = shifted.apply(variables, mean_images, train=False)
  centered_logits = centered.apply(variables, jnp.zeros(IMAGE_SHAPE), train=False)
  np.testing.assert_allclose(shifted_logits, centered_logits, atol=1e-6)


def test_default_statistics_per_family():
  assert MODELS["resnet20"](10).mean == CIFAR10_MEAN
  assert MODELS["wrn28_10"](10).std == CIFAR10_STD
  assert MODELS["resnet50"](1000).mean == IMAGENET_MEAN
  assert MODELS["resnet18"](1000).std == IMAGENET_STD


def test_single_channel_statistics():
  model = MODELS["resnet20"](10, mean=(0.1307,), std=(0.3081,))
  images = random_images(IMAGE_SHAPE[:3] + (1,))
  variables = model.init(rng_key(0), images, train=False)
  assert model.apply(variables, images, train=False).shape == (IMAGE_SHAPE[0], 10)


# --- BatchNorm ----------------------------------------------------------------


def test_batchnorm_train_updates_stats_and_eval_does_not():
  model = MODELS["resnet20"](10, axis_name=None)
  images = random_images(IMAGE_SHAPE)
  variables = model.init(rng_key(0), images, train=False)
  stats = variables["batch_stats"]

  _, train_state = model.apply(variables, images, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(
      lambda old, new: bool(jnp.any(old != new)), stats, train_state["batch_stats"]
  )
  assert all(jax.tree.leaves(changed))

  _, eval_state = model.apply(variables, images, train=False, mutable=["batch_stats"])
  unchanged = jax.tree.map(
      lambda old, new: bool(jnp.all(old == new)), stats, eval_state["batch_stats"]
  )
  assert all(jax.tree.leaves(unchanged))


def test_batchnorm_momentum_is_0_9():
  model = MODELS["resnet20"](10, axis_name=None)
  images = random_images(IMAGE_SHAPE)
  variables = model.init(rng_key(0), images, train=False)
  _, state = model.apply(
      variables,
      images,
      train=True,
      mutable=["batch_stats", "intermediates"],
      capture_intermediates=True,
  )
  stem_output = state["intermediates"]["stem_conv"]["__call__"][0]
  batch_mean = jnp.mean(stem_output, axis=(0, 1, 2))
  np.testing.assert_allclose(
      state["batch_stats"]["stem_bn"]["mean"], 0.1 * batch_mean, rtol=1e-5, atol=1e-7
  )


def test_batchnorm_cross_replica_matches_full_batch():
  assert jax.device_count() == 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  images = random_images(IMAGE_SHAPE)

  single = MODELS["resnet20"](10, axis_name=None)
  replicated = MODELS["resnet20"](10, axis_name="data")
  variables = single.init(rng_key(0), images, train=False)

  full_logits, full_state = single.apply(variables, images, train=True, mutable=["batch_stats"])

  def train_step(variables, images):
    logits, state = replicated.apply(variables, images, train=True, mutable=["batch_stats"])
    return logits, state["batch_stats"]

  sharded_step = jax.jit(
      jax.shard_map(
          train_step,
          mesh=mesh,
          in_specs=(P(), P("data")),
          out_specs=(P("data"), P()),
      )
  )
  sharded_logits, sharded_stats = sharded_step(variables, images)

  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      full_state["batch_stats"],
      sharded_stats,
  )
  np.testing.assert_allclose(full_logits, sharded_logits, rtol=1e-4, atol=1e-4)


def test_batchnorm_per_device_stats_differ_without_axis_name():
  # Guards the test above: if per-device statistics already matched the
  # full batch, it would pass without any cross-replica averaging. Tiling
  # one device's 2 images to the full batch size gives that device's
  # statistics.
  images = random_images(IMAGE_SHAPE)
  one_device_images = jnp.tile(images[:2], (IMAGE_SHAPE[0] // 2, 1, 1, 1))
  model = MODELS["resnet20"](10, axis_name=None)
  variables = model.init(rng_key(0), images, train=False)
  _, full = model.apply(variables, images, train=True, mutable=["batch_stats"])
  _, part = model.apply(variables, one_device_images, train=True, mutable=["batch_stats"])
  assert not np.allclose(
      full["batch_stats"]["stem_bn"]["mean"], part["batch_stats"]["stem_bn"]["mean"]
  )


def test_init_with_default_axis_name_outside_mapped_axis():
  model = build_model(model_config("resnet20"), num_classes=10)
  assert model.axis_name == "data"
  images = random_images(IMAGE_SHAPE)
  variables = model.init(rng_key(0), images, train=False)
  assert model.apply(variables, images, train=False).shape == (IMAGE_SHAPE[0], 10)


# --- dropout ------------------------------------------------------------------


def test_wrn_dropout_active_only_in_training():
  # A WRN-10-2 layout: the same pre-activation wide block as wrn28_10, small
  # enough to run on CPU.
  model = ResNet(
      stage_sizes=(1, 1, 1),
      stage_widths=(32, 64, 128),
      num_classes=10,
      block="preact_basic",
      dropout_rate=0.3,
      axis_name=None,
  )
  images = random_images(IMAGE_SHAPE)
  variables = model.init(rng_key(0), images, train=False)

  def train_logits(seed):
    logits, _ = model.apply(
        variables,
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng_key(seed)},
    )
    return logits

  assert not np.allclose(train_logits(1), train_logits(2))
  np.testing.assert_array_equal(train_logits(1), train_logits(1))

  eval_a = model.apply(variables, images, train=False)
  eval_b = model.apply(variables, images, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)


def test_build_model_passes_dropout_to_wrn():
  model = build_model(model_config("wrn28_10", dropout_rate=0.3), num_classes=10)
  assert model.dropout_rate == 0.3
  assert model.stage_widths == (160, 320, 640)


# --- build_model --------------------------------------------------------------


def test_build_model_defaults():
  model = build_model(model_config("resnet50"), num_classes=1000, axis_name=None)
  assert isinstance(model, ResNet)
  assert model.num_classes == 1000
  assert model.plain is False
  assert model.zero_init_residual is False
  assert model.dropout_rate == 0.0
  assert model.dtype == jnp.float32
  assert model.param_dtype == jnp.float32
  assert model.axis_name is None
  assert model.mean == IMAGENET_MEAN
  assert model.block == "bottleneck"


def test_build_model_reads_config_fields():
  config = model_config(
      "resnet32",
      plain=True,
      dtype="float16",
      zero_init_residual=False,
      dropout_rate=0.0,
      mean=[0.5, 0.5, 0.5],
      std=[0.25, 0.25, 0.25],
  )
  model = build_model(config, num_classes=100)
  assert model.plain is True
  assert model.dtype == jnp.float16
  assert model.mean == (0.5, 0.5, 0.5)
  assert model.std == (0.25, 0.25, 0.25)
  assert model.num_classes == 100
  assert model.stage_sizes == (5, 5, 5)


# --- invalid input ------------------------------------------------------------


def test_unknown_model_name_raises():
  with pytest.raises(ValueError, match="unknown model 'resnet21'") as error:
    build_model(model_config("resnet21"), num_classes=10)
  assert "resnet20, resnet32" in str(error.value)


def test_missing_model_name_raises():
  config = ml_collections.ConfigDict(dict(plain=True))
  with pytest.raises(ValueError, match="no 'name'"):
    build_model(config, num_classes=10)


def test_unknown_dtype_raises():
  with pytest.raises(ValueError, match="'float8'"):
    build_model(model_config("resnet20", dtype="float8"), num_classes=10)


def test_dropout_on_model_without_dropout_raises():
  with pytest.raises(ValueError, match="dropout_rate=0.1"):
    build_model(model_config("resnet20", dropout_rate=0.1), num_classes=10)
  model = MODELS["resnet50"](1000, dropout_rate=0.1)
  with pytest.raises(ValueError, match="dropout_rate=0.1"):
    model.init(rng_key(0), random_images(IMAGE_SHAPE), train=False)


def test_rank_3_images_raise():
  model = MODELS["resnet20"](10)
  with pytest.raises(ValueError, match=r"got shape \(2, 8, 8\)") as error:
    model.init(rng_key(0), random_images((2, 8, 8)), train=False)
  assert "images[..., None]" in str(error.value)


def test_uint8_images_raise():
  model = MODELS["resnet20"](10)
  images = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  with pytest.raises(ValueError, match="got uint8") as error:
    model.init(rng_key(0), images, train=False)
  assert "images.astype(jnp.float32) / 255" in str(error.value)


def test_channel_mismatch_raises():
  model = MODELS["resnet20"](10)
  with pytest.raises(ValueError, match=r"have 1 channel\(s\)") as error:
    model.init(rng_key(0), random_images(IMAGE_SHAPE[:3] + (1,)), train=False)
  assert str(CIFAR10_MEAN) in str(error.value)


def test_mean_std_length_mismatch_raises():
  model = MODELS["resnet20"](10, mean=(0.5,), std=(0.2, 0.2, 0.2))
  with pytest.raises(ValueError, match="same length"):
    model.init(rng_key(0), random_images(IMAGE_SHAPE), train=False)


def test_nonpositive_std_raises():
  model = MODELS["resnet20"](10, std=(0.2, 0.0, 0.2))
  with pytest.raises(ValueError, match=r"std=\(0.2, 0.0, 0.2\)"):
    model.init(rng_key(0), random_images(IMAGE_SHAPE), train=False)


def test_cnn_madry_param_count():
  # conv 5x5x1x32 + conv 5x5x32x64 + dense 3136x1024 + dense 1024x10, with biases.
  model = build_model(model_config("cnn_madry"), num_classes=10)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  )
  assert count_params(variables["params"]) == 832 + 51_264 + 3_212_288 + 10_250


def test_cnn_rejects_shortcut_options():
  for field in ("plain", "zero_init_residual"):
    with pytest.raises(ValueError, match=f"has no shortcuts, so {field}=True"):
      build_model(model_config("cnn_small", **{field: True}), num_classes=10)


def test_cnn_logits_float32_with_bfloat16_compute():
  model = build_model(model_config("cnn_small", dtype="bfloat16"), num_classes=10)
  images = jnp.full((2, 28, 28, 1), 0.5)
  variables = model.init(jax.random.key(0), images, train=False)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert model.apply(variables, images, train=False).dtype == jnp.float32
