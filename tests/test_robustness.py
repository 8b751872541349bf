"""Tests for jaxbase.robustness: attack names and whole-test-set robust accuracy."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxbase import attacks, optim, robustness
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import create_train_state
from jaxbase.train.steps import flip_averaged_logits


class TinyNet(nn.Module):
  """A linear classifier on centered pixels, so predictions vary from image to image."""

  @nn.compact
  def __call__(self, images, train: bool):
    del train
    centered = images.reshape(images.shape[0], -1) - 0.5
    return nn.Dense(3)(centered) * 5.0


@pytest.mark.parametrize(
    "name, steps, restarts, random_init",
    [("fgsm", 1, 1, False), ("pgd20", 20, 1, True), ("pgd50x10", 50, 10, True)],
)
def test_parse_attack(name, steps, restarts, random_init):
  spec = robustness.parse_attack(name)
  assert (spec.num_steps, spec.restarts, spec.random_init) == (steps, restarts, random_init)


@pytest.mark.parametrize("name", ["pgd", "pgd0", "pgd10x0", "cw", "fgsm2"])
def test_parse_attack_rejects(name):
  with pytest.raises(ValueError, match=f"unknown attack '{name}'"):
    robustness.parse_attack(name)


def _setup(num_examples=37):
  model = TinyNet()
  optimizer, _ = optim.build(
      ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "schedule": "constant"}), 1, 1
  )
  state = create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples, 6, 6, 1), dtype=np.uint8)
  logits = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      images.astype(np.float32) / 255,
      train=False,
  )
  labels = np.array(jnp.argmax(logits, -1), np.int32)  # Clean accuracy 100%.
  labels[:5] = (labels[:5] + 1) % 3  # Five wrong labels: clean accuracy 32/37.
  return model, state, images, labels


def _report(devices=None, **kwargs):
  model, state, images, labels = _setup()
  launcher = DataParallel("shard_map", devices=devices)
  arguments = dict(
      attack_names=["fgsm", "pgd5x2"], eps_values=[0.0, 0.05, 0.2, 0.5], global_batch_size=16
  )
  arguments.update(kwargs)
  return robustness.evaluate_robustness(
      model, launcher, launcher.replicate(state), images, labels, **arguments
  )


def test_robust_accuracy_exact_counts_and_monotone():
  report = _report()
  assert report["examples"] == 37
  np.testing.assert_allclose(report["clean_accuracy"], 32 / 37, rtol=1e-6)
  for attack in ("fgsm", "pgd5x2"):
    curve = [r["robust_accuracy"] for r in report["results"] if r["attack"] == attack]
    assert curve[0] == pytest.approx(32 / 37)  # eps = 0 is the clean accuracy.
    assert all(a >= b for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] < curve[0]
    for accuracy in curve:
      assert (accuracy * 37) == pytest.approx(round(accuracy * 37))  # Whole examples only.


def test_fgsm_eight_devices_equal_one():
  eight = _report(attack_names=["fgsm"])
  one = _report(devices=jax.devices()[:1], attack_names=["fgsm"])
  assert eight == one


def test_report_written_with_plot(tmp_path):
  report = _report(attack_names=["fgsm"], eps_values=[0.0, 0.05])
  json_path, plot_path = robustness.write_report(report, str(tmp_path))
  assert os.path.getsize(json_path) > 0
  assert os.path.getsize(plot_path) > 0


def test_eval_flip_attacks_averaged_model():
  model, state, images, labels = _setup()
  report = _report(attack_names=["fgsm"], eps_values=[0.0, 0.05], eval_flip=True)
  assert report["eval_flip"] is True

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  averaged = functools.partial(flip_averaged_logits, attacks.make_logits_fn(model, variables))
  pixels = jnp.asarray(images, jnp.float32) / 255
  clean = np.mean(np.argmax(averaged(pixels), -1) == labels)
  np.testing.assert_allclose(report["clean_accuracy"], clean, rtol=1e-6)
  # FGSM against the averaged model, by hand: one signed step up its loss gradient.
  adversarial = attacks.fgsm(averaged, pixels, jnp.asarray(labels), eps=0.05)
  robust = np.mean(np.argmax(averaged(adversarial), -1) == labels)
  assert report["results"][1]["eps"] == 0.05
  np.testing.assert_allclose(report["results"][1]["robust_accuracy"], robust, rtol=1e-6)
  # The check can fail: TinyNet is not mirror-symmetric, so flips change the clean accuracy.
  assert clean != pytest.approx(32 / 37)


def test_bad_eps_raises():
  with pytest.raises(ValueError, match="eps must be finite and >= 0, got -0.1"):
    _report(eps_values=[-0.1])


def test_fixed_subset_same_examples_in_split_order():
  images = np.arange(100 * 2).reshape(100, 2)
  labels = np.arange(100) % 10
  first_images, first_labels = robustness.fixed_subset(images, labels, 30)
  again_images, _ = robustness.fixed_subset(images, labels, 30)
  np.testing.assert_array_equal(first_images, again_images)
  index = first_images[:, 0] // 2  # Row i of `images` starts with 2 * i.
  assert len(np.unique(index)) == 30
  assert np.all(np.diff(index) > 0)
  np.testing.assert_array_equal(first_labels, labels[index])
  assert len(np.unique(first_labels)) > 1  # Not just the first rows.
  all_images, _ = robustness.fixed_subset(images, labels, 0)
  assert all_images is images
  with pytest.raises(ValueError, match="must be >= 0 .* got -1"):
    robustness.fixed_subset(images, labels, -1)
