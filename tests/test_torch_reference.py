"""Tests that jaxbase.torch_reference builds the same networks as jaxbase.models."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed; pip install -e '.[torch]' runs these tests"
)

from jaxbase import models  # noqa: E402
from jaxbase import torch_reference  # noqa: E402

NUM_CLASSES = 10


def _jax_model(name, axis_name=None):
  config = ml_collections.ConfigDict({"name": name})
  return models.build_model(config, NUM_CLASSES, axis_name=axis_name)


def _randomized_variables(name, seed=0):
  """Initializes the jax model, then draws BatchNorm scales, offsets and statistics at random.

  At init, BatchNorm is the identity in eval mode (scale 1, offset 0, mean 0,
  variance 1), which would hide a wrongly copied statistic.
  """
  variables = _jax_model(name).init(
      jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)), train=False
  )
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    last = path[-1].key
    if last == "scale":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if last in ("bias", "mean"):
      return rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
    if last == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    return np.asarray(leaf)

  return jax.tree_util.tree_map_with_path(perturb, variables)


def _images(batch=4, seed=1):
  return np.random.default_rng(seed).uniform(0, 1, (batch, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("name, expected", [("resnet20", 272_474), ("resnet56", 855_770)])
def test_parameter_count_matches_jax(name, expected):
  variables = jax.eval_shape(
      lambda: _jax_model(name).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  twin = torch_reference.TorchResNet(name, NUM_CLASSES, models.CIFAR10_MEAN, models.CIFAR10_STD)
  assert models.count_params(variables["params"]) == expected
  assert torch_reference.count_params(twin) == expected


@pytest.mark.parametrize("train", [False, True])
def test_copied_weights_give_same_logits(train):
  name = "resnet20"
  variables = _randomized_variables(name)
  images = _images()
  twin = torch_reference.TorchResNet(name, NUM_CLASSES, models.CIFAR10_MEAN, models.CIFAR10_STD)
  torch_reference.load_flax_variables(twin, variables)
  twin.train(train)

  expected = _jax_model(name).apply(variables, images, train=train, mutable=["batch_stats"])[0]
  with torch.no_grad():
    logits = twin(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()

  assert logits.shape == (4, NUM_CLASSES)
  assert float(np.abs(np.asarray(expected)).max()) > 0.1  # Logits of a non-trivial scale.
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_copied_weights_give_same_training_gradients():
  """The whole backward pass in training mode, BatchNorm included, matches PyTorch's autograd."""
  name = "resnet8"
  variables = _randomized_variables(name)
  images = _images(batch=8)
  labels = np.arange(8) % NUM_CLASSES
  model = _jax_model(name)

  def loss(params, images):
    logits, _ = model.apply(
        {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
    )
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

  param_grads, image_grads = jax.grad(loss, (0, 1))(variables["params"], images)

  twin = torch_reference.TorchResNet(name, NUM_CLASSES, models.CIFAR10_MEAN, models.CIFAR10_STD)
  torch_reference.load_flax_variables(twin, variables)
  twin.train()
  torch_images = torch.from_numpy(images).permute(0, 3, 1, 2).requires_grad_()
  torch.nn.functional.cross_entropy(twin(torch_images), torch.from_numpy(labels)).backward()

  expected_images = torch_images.grad.permute(0, 2, 3, 1).numpy()
  assert float(np.abs(expected_images).max()) > 1e-4  # A gradient of a non-trivial scale.
  np.testing.assert_allclose(image_grads, expected_images, rtol=1e-3, atol=1e-6)
  # BatchNorm scale gradients: the stem's, and the fused one ending the first block.
  np.testing.assert_allclose(
      param_grads["stem_bn"]["scale"], twin.stem_bn.weight.grad.numpy(), rtol=1e-3, atol=1e-6
  )
  block = twin.blocks.stage1_block1
  np.testing.assert_allclose(
      param_grads["stage1_block1"]["bn2"]["scale"],
      block.bn2.weight.grad.numpy(),
      rtol=1e-3,
      atol=1e-6,
  )


def test_channels_last_gives_same_logits():
  variables = _randomized_variables("resnet8")
  images = torch.from_numpy(_images()).permute(0, 3, 1, 2)
  twin = torch_reference.TorchResNet(
      "resnet8", NUM_CLASSES, models.CIFAR10_MEAN, models.CIFAR10_STD
  )
  torch_reference.load_flax_variables(twin, variables)
  twin.eval()
  with torch.no_grad():
    contiguous = twin(images.contiguous()).numpy()
    twin = twin.to(memory_format=torch.channels_last)
    channels_last = twin(images.contiguous(memory_format=torch.channels_last)).numpy()
  np.testing.assert_allclose(channels_last, contiguous, rtol=1e-5, atol=1e-5)


def test_train_step_lowers_loss_on_one_batch():
  torch.manual_seed(0)
  twin = torch_reference.TorchResNet("resnet8", NUM_CLASSES, (0.5,), (0.25,))
  train_step = torch_reference.make_train_step(twin, lr=0.05)
  images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
  labels = torch.randint(0, NUM_CLASSES, (16,))
  losses = [float(train_step(images, labels)) for _ in range(5)]
  assert losses[-1] < losses[0]


def test_unsupported_model_raises():
  with pytest.raises(ValueError, match="no PyTorch twin of model 'resnet50'"):
    torch_reference.TorchResNet("resnet50", NUM_CLASSES, (0.5,), (0.25,))


def test_missing_variable_raises():
  variables = _randomized_variables("resnet8")
  del variables["batch_stats"]["stem_bn"]
  twin = torch_reference.TorchResNet(
      "resnet8", NUM_CLASSES, models.CIFAR10_MEAN, models.CIFAR10_STD
  )
  with pytest.raises(ValueError, match="stem_bn.running_mean"):
    torch_reference.load_flax_variables(twin, variables)
