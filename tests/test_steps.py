"""Tests for the per-replica steps and the launcher, on 8 fake CPU devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxbase import losses, optim
from jaxbase.data import augment
from jaxbase.data import pipeline
from jaxbase.models import transformer
from jaxbase.models.batchnorm import BatchNorm
from jaxbase.train import steps as steps_lib
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import create_train_state

NUM_CLASSES = 3


class TinyNet(nn.Module):
  """Conv, BatchNorm over the 'data' axis, ReLU, global average pool, dense."""

  axis_name: str | None = "data"

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(4, (3, 3), use_bias=False)(images)
    x = BatchNorm(use_running_average=not train, axis_name=self.axis_name, momentum=0.9)(
        x, relu=True
    )
    x = x.mean(axis=(1, 2))
    return nn.Dense(NUM_CLASSES)(x).astype(jnp.float32)


def _optimizer():
  config = ml_collections.ConfigDict(
      {
          "name": "sgd",
          "lr": 0.1,
          "momentum": 0.9,
          "nesterov": True,
          "weight_decay": 5e-4,
          "schedule": "cosine",
          "warmup_epochs": 1.0,
          "clip_norm": 1.0,
      }
  )
  return optim.build(config, steps_per_epoch=2, total_steps=8)


def _batches(num_steps, global_batch=16, seed=0):
  rng = np.random.default_rng(seed)
  return [
      {
          "images": rng.integers(0, 256, (global_batch, 6, 6, 1), dtype=np.uint8),
          "labels": rng.integers(0, NUM_CLASSES, global_batch).astype(np.int32),
      }
      for _ in range(num_steps)
  ]


def _run(launcher, num_steps=3):
  model = TinyNet()
  optimizer, schedule = _optimizer()
  state = create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=0)
  state = launcher.replicate(state)
  train_step = launcher.compile_train_step(
      steps_lib.make_train_step(model, optimizer, schedule=schedule, label_smoothing=0.1)
  )
  history = []
  for batch in _batches(num_steps):
    state, metrics = train_step(state, launcher.shard_batch(batch))
    history.append(jax.device_get(metrics))
  return jax.device_get(launcher.unreplicate(state)), history, train_step


def _assert_trees_close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol), a, b)


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8
  state8, metrics8, _ = _run(DataParallel("shard_map"))
  state1, metrics1, _ = _run(DataParallel("shard_map", devices=jax.devices()[:1]))
  _assert_trees_close(state8.params, state1.params)
  _assert_trees_close(state8.batch_stats, state1.batch_stats)
  _assert_trees_close(metrics8, metrics1)
  assert int(state8.step) == int(state1.step) == 3


def test_pmap_equals_shard_map():
  state_sm, metrics_sm, _ = _run(DataParallel("shard_map"))
  state_pm, metrics_pm, _ = _run(DataParallel("pmap"))
  _assert_trees_close(state_sm.params, state_pm.params)
  _assert_trees_close(state_sm.batch_stats, state_pm.batch_stats)
  _assert_trees_close(state_sm.opt_state, state_pm.opt_state)
  _assert_trees_close(metrics_sm, metrics_pm)


def test_train_step_compiles_once():
  _, _, train_step = _run(DataParallel("shard_map"), num_steps=4)
  assert train_step._cache_size() == 1


def test_train_step_updates_batch_stats_and_step():
  launcher = DataParallel("shard_map")
  model = TinyNet()
  optimizer, _ = _optimizer()
  initial = jax.device_get(create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=0))
  state, _, _ = _run(launcher, num_steps=1)
  assert int(state.step) == 1
  assert not np.allclose(
      state.batch_stats["BatchNorm_0"]["mean"], initial.batch_stats["BatchNorm_0"]["mean"]
  )


def test_replica_keys_differ_across_devices():
  launcher = DataParallel("shard_map")

  def keys(root, batch):
    del batch
    return jax.random.key_data(jax.random.wrap_key_data(steps_lib.replica_key(root, jnp.int32(5))))[
        None
    ]

  mapped = jax.jit(
      jax.shard_map(
          keys, mesh=launcher.mesh, in_specs=(jax.P(), jax.P("data")), out_specs=jax.P("data")
      )
  )
  out = np.asarray(mapped(jax.random.PRNGKey(0), jnp.zeros((8,))))
  assert len({tuple(row) for row in out}) == 8


@pytest.mark.parametrize(
    "num_examples, mode", [(37, "shard_map"), (37, "pmap"), (16, "shard_map"), (5, "shard_map")]
)
def test_eval_counts_every_example_once(num_examples, mode):
  launcher = DataParallel(mode)
  model = TinyNet()
  optimizer, _ = _optimizer()
  state = create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=1)
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (num_examples, 6, 6, 1), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32)

  # Reference: the whole set at once, on the host, without a mapped axis.
  logits = TinyNet(axis_name=None).apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.asarray(images, jnp.float32) / 255,
      train=False,
  )
  expected_top1 = float(np.mean(np.argmax(logits, -1) == labels))
  expected_loss = float(np.mean(losses.cross_entropy(logits, jnp.asarray(labels))))

  eval_step = launcher.compile_eval_step(steps_lib.make_eval_step(model))
  replicated = launcher.replicate(state)
  totals = {}
  for batch in pipeline.eval_batches(images, labels, global_batch_size=16):
    for name, value in jax.device_get(eval_step(replicated, launcher.shard_batch(batch))).items():
      totals[name] = totals.get(name, 0.0) + float(value)
  summary = steps_lib.summarize_eval(totals)
  assert summary["examples"] == num_examples
  np.testing.assert_allclose(summary["accuracy"], expected_top1, rtol=1e-6)
  np.testing.assert_allclose(summary["loss"], expected_loss, rtol=1e-5)


# Test-time flips (eval_flip).


class MirrorSymmetricNet(nn.Module):
  """Dense layer on the summed features of an image and of its left-right mirror image.

  Mirroring the input swaps the two terms of the sum, so the logits stay the
  same. A vertical flip changes them, because the 3x3 kernels are not
  symmetric.
  """

  @nn.compact
  def __call__(self, images, train: bool):
    del train
    conv = nn.Conv(4, (3, 3))
    features = nn.relu(conv(images)).mean(axis=(1, 2))
    mirrored_features = nn.relu(conv(images[:, :, ::-1, :])).mean(axis=(1, 2))
    return nn.Dense(NUM_CLASSES)(features + mirrored_features).astype(jnp.float32)


def _eval_batch(num_real=13, global_batch=16, seed=4):
  """A batch of 16 with 13 real examples and 3 padding rows (mask 0)."""
  rng = np.random.default_rng(seed)
  return {
      "images": rng.integers(0, 256, (global_batch, 6, 6, 1), dtype=np.uint8),
      "labels": rng.integers(0, NUM_CLASSES, global_batch).astype(np.int32),
      "mask": (np.arange(global_batch) < num_real).astype(np.float32),
  }


def _eval_sums(model, state, batch, eval_flip):
  launcher = DataParallel("shard_map")
  eval_step = launcher.compile_eval_step(steps_lib.make_eval_step(model, eval_flip=eval_flip))
  sums = eval_step(launcher.replicate(state), launcher.shard_batch(batch))
  return {name: float(value) for name, value in jax.device_get(sums).items()}


def _expected_sums(logits, labels, mask):
  return {
      "loss_sum": float(jnp.sum(losses.cross_entropy(logits, labels) * mask)),
      "top1_sum": float(jnp.sum(losses.topk_correct(logits, labels, 1) * mask)),
      "top5_sum": float(jnp.sum(losses.topk_correct(logits, labels, NUM_CLASSES) * mask)),
      "count": float(jnp.sum(mask)),
  }


def test_eval_flip_averages_mirrored_logits():
  model = TinyNet()
  optimizer, _ = _optimizer()
  state = create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=2)
  batch = _eval_batch()
  images = jnp.asarray(batch["images"], jnp.float32) / 255
  labels, mask = jnp.asarray(batch["labels"]), jnp.asarray(batch["mask"])

  # By hand: two plain forward passes, on the batch and on its mirror image.
  reference = TinyNet(axis_name=None)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  original = reference.apply(variables, images, train=False)
  mirrored = reference.apply(variables, images[:, :, ::-1, :], train=False)
  expected = _expected_sums((original + mirrored) / 2, labels, mask)

  flipped = _eval_sums(model, state, batch, eval_flip=True)
  assert flipped.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(flipped[name], expected[name], rtol=1e-5, err_msg=name)
  assert flipped["count"] == 13
  # The check can fail: TinyNet's 3x3 kernels are not mirror-symmetric.
  plain = _eval_sums(model, state, batch, eval_flip=False)
  np.testing.assert_allclose(plain["loss_sum"], _expected_sums(original, labels, mask)["loss_sum"])
  assert not np.isclose(plain["loss_sum"], flipped["loss_sum"], rtol=1e-4)


def test_eval_flip_leaves_symmetric_model_unchanged():
  model = MirrorSymmetricNet()
  optimizer, _ = _optimizer()
  state = create_train_state(model, optimizer, jnp.zeros((1, 6, 6, 1)), seed=3)
  batch = _eval_batch(seed=5)
  plain = _eval_sums(model, state, batch, eval_flip=False)
  flipped = _eval_sums(model, state, batch, eval_flip=True)
  assert plain["top1_sum"] == flipped["top1_sum"]
  assert plain["count"] == flipped["count"] == 13
  np.testing.assert_allclose(flipped["loss_sum"], plain["loss_sum"], rtol=1e-6)


def test_eval_flip_rejects_text_batch():
  model = _bert(dropout=0.0)
  optimizer, _ = _optimizer()
  state = create_train_state(model, optimizer, _text_example(), seed=0)
  batch = {**_text_batches(1)[0], "mask": np.ones(16, np.float32)}
  eval_step = steps_lib.make_eval_step(model, eval_flip=True)
  with pytest.raises(ValueError, match="eval_flip mirrors images.*set eval_flip=False"):
    eval_step(state, batch)


def test_batch_not_divisible_by_devices_raises():
  with pytest.raises(ValueError, match="batch_size=100 is not divisible by the 8 devices"):
    DataParallel("shard_map").check_batch_size(100)


def test_unknown_parallel_mode_raises():
  with pytest.raises(ValueError, match="unknown parallel mode 'dp'"):
    DataParallel("dp")


# Text encoders: a tiny BERT classifier and its masked-LM twin.
TEXT_VOCAB = 24
TEXT_LENGTH = 6


def _text_batches(num_steps, global_batch=16, seed=0):
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(num_steps):
    lengths = rng.integers(3, TEXT_LENGTH + 1, global_batch)
    padding_mask = (np.arange(TEXT_LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
    token_ids = rng.integers(5, TEXT_VOCAB, (global_batch, TEXT_LENGTH)).astype(np.int32)
    token_ids[:, 0] = 2
    batches.append(
        {
            "token_ids": token_ids * padding_mask,
            "padding_mask": padding_mask,
            "labels": rng.integers(0, 2, global_batch).astype(np.int32),
        }
    )
  return batches


def _bert(dropout, mlm=False):
  sizes = dict(
      vocab_size=TEXT_VOCAB,
      max_length=TEXT_LENGTH,
      num_layers=2,
      width=8,
      num_heads=2,
      mlp_dim=16,
      dropout_rate=dropout,
      attention_dropout_rate=dropout,
  )
  if mlm:
    return transformer.BertForMaskedLM(**sizes)
  return transformer.BertClassifier(num_classes=2, **sizes)


def _text_example():
  return {
      "token_ids": jnp.zeros((1, TEXT_LENGTH), jnp.int32),
      "padding_mask": jnp.ones((1, TEXT_LENGTH), jnp.int32),
  }


def _run_text(launcher, dropout=0.0, num_steps=2):
  model = _bert(dropout)
  optimizer, schedule = _optimizer()
  state = launcher.replicate(create_train_state(model, optimizer, _text_example(), seed=0))
  train_step = launcher.compile_train_step(
      steps_lib.make_train_step(model, optimizer, schedule=schedule)
  )
  history = []
  for batch in _text_batches(num_steps):
    state, metrics = train_step(state, launcher.shard_batch(batch))
    history.append(jax.device_get(metrics))
  return jax.device_get(launcher.unreplicate(state)), history


def test_token_dropout_rate_one_equals_masked_input():
  # With every word token replaced, the step equals a plain step on sentences
  # whose word tokens were all set to the replacement id beforehand.
  launcher = DataParallel("shard_map")
  model = _bert(0.0)
  optimizer, schedule = _optimizer()
  initial = lambda: launcher.replicate(create_train_state(model, optimizer, _text_example(), 0))
  replace = functools.partial(augment.token_dropout, rate=1.0, replace_id=4, num_special=5)
  batch = _text_batches(1)[0]
  augmented_step = launcher.compile_train_step(
      steps_lib.make_train_step(model, optimizer, schedule=schedule, token_augment=replace)
  )
  plain_step = launcher.compile_train_step(
      steps_lib.make_train_step(model, optimizer, schedule=schedule)
  )
  words = (batch["padding_mask"] == 1) & (batch["token_ids"] >= 5)
  masked = {**batch, "token_ids": np.where(words, 4, batch["token_ids"]).astype(np.int32)}
  # The compiled steps donate their input state, so each call gets a new one.
  augmented, augmented_metrics = augmented_step(initial(), launcher.shard_batch(batch))
  plain, plain_metrics = plain_step(initial(), launcher.shard_batch(masked))
  _, unchanged_metrics = plain_step(initial(), launcher.shard_batch(batch))
  _assert_trees_close(jax.device_get(augmented.params), jax.device_get(plain.params), atol=1e-6)
  np.testing.assert_allclose(augmented_metrics["loss"], plain_metrics["loss"], rtol=1e-6)
  # The tiny random model barely depends on its tokens, but the loss still moves
  # 30 times more than the tolerance above.
  assert not np.isclose(augmented_metrics["loss"], unchanged_metrics["loss"], rtol=1e-6, atol=0)


def test_encoder_eight_devices_equal_one_device():
  state8, metrics8 = _run_text(DataParallel("shard_map"))
  state1, metrics1 = _run_text(DataParallel("shard_map", devices=jax.devices()[:1]))
  _assert_trees_close(state8.params, state1.params)
  _assert_trees_close(metrics8, metrics1)


def test_encoder_dropout_masks_differ_across_replicas():
  launcher = DataParallel("shard_map")
  model = _bert(dropout=0.5)
  variables = {"params": create_train_state(model, optax.identity(), _text_example(), 0).params}
  # The same sentence on every replica: train-mode logits differ only through dropout.
  batch = jax.tree.map(lambda x: np.repeat(x[:1], 8, axis=0), _text_batches(1)[0])

  def per_replica_logits(model):
    def replica_logits(root_key, batch):
      _, dropout_key = steps_lib.split_step_key(root_key, jnp.int32(0))
      return model.apply(
          variables, **steps_lib.model_inputs(batch), train=True, rngs={"dropout": dropout_key}
      )

    mapped = jax.shard_map(
        replica_logits,
        mesh=launcher.mesh,
        in_specs=(jax.P(), jax.P("data")),
        out_specs=jax.P("data"),
    )
    return np.asarray(jax.jit(mapped)(jax.random.PRNGKey(0), launcher.shard_batch(batch)))

  logits = per_replica_logits(model)
  assert len({tuple(np.round(row, 6)) for row in logits}) == 8

  # With dropout off, the replicas agree with the eval-mode logits.
  no_dropout = _bert(dropout=0.0)
  eval_logits = np.asarray(
      no_dropout.apply(variables, **steps_lib.model_inputs(batch), train=False)
  )
  np.testing.assert_allclose(per_replica_logits(no_dropout), eval_logits, rtol=1e-5, atol=1e-6)


def test_mlm_step_pmap_equals_shard_map_and_starts_near_uniform():
  masking = dict(mask_id=4, vocab_size=TEXT_VOCAB, num_special=5, max_predictions=2, mask_rate=0.15)

  def run(mode):
    launcher = DataParallel(mode)
    model = _bert(dropout=0.1, mlm=True)
    optimizer, schedule = _optimizer()
    state = launcher.replicate(create_train_state(model, optimizer, _text_example(), seed=0))
    train_step = launcher.compile_train_step(
        steps_lib.make_mlm_train_step(model, optimizer, masking=masking, schedule=schedule)
    )
    metrics = []
    for batch in _text_batches(2):
      state, step_metrics = train_step(state, launcher.shard_batch(batch))
      metrics.append(jax.device_get(step_metrics))
    return jax.device_get(launcher.unreplicate(state)), metrics

  state_sm, metrics_sm = run("shard_map")
  state_pm, metrics_pm = run("pmap")
  _assert_trees_close(state_sm.params, state_pm.params)
  _assert_trees_close(metrics_sm, metrics_pm)
  # Small initial logits give a loss near log(vocabulary size).
  np.testing.assert_allclose(metrics_sm[0]["loss"], np.log(TEXT_VOCAB), rtol=0.15)
  assert 0 <= metrics_sm[0]["top1"] <= metrics_sm[0]["top5"] <= 1
