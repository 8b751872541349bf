"""Tests for jaxbase.transfer and the fine-tuning groups of jaxbase.optim, with tiny encoders."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxbase import checkpoint as checkpoint_lib
from jaxbase import optim, transfer
from jaxbase.models import transformer
from jaxbase.train import steps as steps_lib
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import TrainState, create_train_state

VOCAB = 30
LENGTH = 8


def _bert_classifier(vocab_size=VOCAB, num_layers=2, width=16):
  return transformer.BertClassifier(
      vocab_size=vocab_size,
      max_length=LENGTH,
      num_layers=num_layers,
      width=width,
      num_heads=2,
      mlp_dim=32,
      num_classes=2,
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
  )


def _bert_mlm(vocab_size=VOCAB):
  return transformer.BertForMaskedLM(
      vocab_size=vocab_size, max_length=LENGTH, num_layers=2, width=16, num_heads=2, mlp_dim=32
  )


def _text_inputs(batch=1):
  return {
      "token_ids": jnp.zeros((batch, LENGTH), jnp.int32),
      "padding_mask": jnp.ones((batch, LENGTH), jnp.int32),
  }


def _params(model, seed):
  return create_train_state(model, optax.identity(), _text_inputs(), seed).params


def test_load_pretrained_copies_backbone_and_keeps_head():
  pretrained = _params(_bert_mlm(), seed=1)
  fresh = _params(_bert_classifier(), seed=2)
  loaded = transfer.load_pretrained(fresh, pretrained)
  for name in ("embeddings", "encoder"):
    jax.tree.map(np.testing.assert_array_equal, loaded[name], pretrained[name])
  jax.tree.map(np.testing.assert_array_equal, loaded["head"], fresh["head"])
  assert jax.tree.structure(loaded) == jax.tree.structure(fresh)


def test_load_pretrained_vocabulary_mismatch_names_parameters():
  pretrained = _params(_bert_mlm(vocab_size=VOCAB + 5), seed=1)
  fresh = _params(_bert_classifier(), seed=2)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError) as error:
    transfer.load_pretrained(fresh, pretrained)
  message = str(error.value)
  assert "embeddings/token_embed/embedding [35, 16] vs [30, 16]" in message
  assert "the vocabularies differ" in message
  assert "position_embed" not in message


def test_load_pretrained_shape_and_missing_mismatch_names_parameters():
  pretrained = _params(_bert_mlm(), seed=1)
  deeper = _params(_bert_classifier(num_layers=3), seed=2)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="16 in the new model only") as e:
    transfer.load_pretrained(deeper, pretrained)
  assert "encoder/block_2/" in str(e.value)
  assert "vocabularies" not in str(e.value)
  wider = _params(_bert_classifier(width=8), seed=2)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="with different shapes") as e:
    transfer.load_pretrained(wider, pretrained)
  assert "encoder/block_0/mlp/dense1/kernel [16, 32] vs [8, 32]" in str(e.value)


def test_resize_position_embeddings_identity_at_same_size():
  embed = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 16, 6))
  same = transfer.resize_position_embeddings(embed, (4, 4), has_class_token=True)
  np.testing.assert_allclose(same, embed, rtol=0, atol=1e-6)
  without_class = embed[:, 1:]
  np.testing.assert_allclose(
      transfer.resize_position_embeddings(without_class, (4, 4), has_class_token=False),
      without_class,
      rtol=0,
      atol=1e-6,
  )


def test_resize_position_embeddings_keeps_class_token():
  class_row = jnp.full((1, 1, 3), 7.0)
  grid = jnp.arange(16, dtype=jnp.float32).reshape(4, 4)
  # Each channel is a constant times the row index, a linear function of position.
  patches = jnp.stack([grid // 4, grid // 4 * 2.0, jnp.ones_like(grid)], axis=-1).reshape(1, 16, 3)
  resized = transfer.resize_position_embeddings(
      jnp.concatenate([class_row, patches], axis=1), (8, 8), has_class_token=True
  )
  assert resized.shape == (1, 65, 3)
  np.testing.assert_array_equal(resized[0, 0], class_row[0, 0])
  np.testing.assert_allclose(resized[0, 1:, 2], 1.0, rtol=1e-6)
  rows = resized[0, 1:, 0].reshape(8, 8)
  # Rows increase from the top down, and each row is constant across columns.
  assert np.all(np.diff(rows[:, 0]) >= 0)
  np.testing.assert_allclose(rows, np.repeat(rows[:, :1], 8, axis=1), rtol=1e-6)


def test_resize_position_embeddings_rejects_wrong_class_token_setting():
  embed = jnp.zeros((1, 17, 4))
  with pytest.raises(ValueError, match="not a square grid; check model.pool"):
    transfer.resize_position_embeddings(embed, (8, 8), has_class_token=False)


def test_load_pretrained_resizes_vit_position_embedding():
  def vit():
    return transformer.VisionTransformer(
        num_classes=3, patch_size=4, num_layers=1, width=8, num_heads=2, mlp_dim=16
    )

  small = create_train_state(vit(), optax.identity(), jnp.zeros((1, 8, 8, 3)), 0).params
  large = create_train_state(vit(), optax.identity(), jnp.zeros((1, 16, 16, 3)), 1).params
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="position_embed"):
    transfer.load_pretrained(large, small)
  loaded = transfer.load_pretrained(large, small, resize_position_embed=True, has_class_token=True)
  assert loaded["position_embed"].shape == (1, 17, 8)
  np.testing.assert_array_equal(loaded["position_embed"][0, 0], small["position_embed"][0, 0])
  np.testing.assert_array_equal(loaded["patch_embed"]["kernel"], small["patch_embed"]["kernel"])


def test_restore_params_reads_any_checkpoint(tmp_path):
  model = _bert_mlm()
  optimizer = optax.adamw(1e-3)
  state = create_train_state(model, optimizer, _text_inputs(), 3)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
  checkpointer.save(
      5,
      state,
      {"param_shapes": checkpoint_lib.param_shapes(state.params), "tokenizer": "{}"},
      force=True,
  )
  checkpointer.wait()
  checkpointer.close()
  params, meta = transfer.restore_params(str(tmp_path))
  assert meta["tokenizer"] == "{}"
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))
  with pytest.raises(FileNotFoundError, match="not found"):
    transfer.restore_params(str(tmp_path / "missing"))


def test_layer_decay_scales():
  params = _params(_bert_classifier(num_layers=2), seed=0)
  labels, scales = transfer.param_groups(params, layer_decay=0.5)
  assert labels["embeddings"]["token_embed"]["embedding"] == "layer_0"
  assert labels["encoder"]["block_0"]["mlp"]["dense1"]["kernel"] == "layer_1"
  assert labels["encoder"]["block_1"]["attention"]["query"]["kernel"] == "layer_2"
  assert labels["head"]["kernel"] == "layer_3"
  assert scales == {"layer_0": 0.125, "layer_1": 0.25, "layer_2": 0.5, "layer_3": 1.0}


def test_param_groups_reject_contradictions():
  params = _params(_bert_classifier(), seed=0)
  with pytest.raises(ValueError, match="contradict"):
    transfer.param_groups(params, freeze_backbone=True, layer_decay=0.5)
  with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
    transfer.param_groups(params, layer_decay=1.5)


def _optim_config(**overrides):
  config = ml_collections.ConfigDict(
      {
          "name": "adamw",
          "lr": 0.01,
          "weight_decay": 0.1,
          "schedule": "constant",
          "warmup_epochs": 0.0,
          "clip_norm": 0.5,
          "freeze_backbone": False,
          "layer_decay": 1.0,
      }
  )
  config.update(overrides)
  return config


def test_fine_tuning_options_need_params():
  with pytest.raises(ValueError, match="pass params="):
    optim.build(_optim_config(freeze_backbone=True), 1, 10)


def _array_sizes(tree) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(tree) if hasattr(leaf, "size") and leaf.ndim)


def test_frozen_backbone_unchanged_and_without_slots():
  model = _bert_classifier()
  params = _params(model, seed=0)
  optimizer, _ = optim.build(_optim_config(freeze_backbone=True), 1, 10, params=params)
  state = create_train_state(model, optimizer, _text_inputs(), seed=0)
  initial = jax.device_get(state.params)

  # Adam keeps two slots (mu, nu) per trained value; the head is all that is trained.
  head_size = sum(leaf.size for leaf in jax.tree.leaves(initial["head"]))
  assert _array_sizes(state.opt_state) == 2 * head_size

  launcher = DataParallel("shard_map")
  train_step = launcher.compile_train_step(steps_lib.make_train_step(model, optimizer))
  state = launcher.replicate(state)
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {
        "token_ids": rng.integers(5, VOCAB, (8, LENGTH)).astype(np.int32),
        "padding_mask": np.ones((8, LENGTH), np.int32),
        "labels": rng.integers(0, 2, 8).astype(np.int32),
    }
    state, _ = train_step(state, launcher.shard_batch(batch))
  final = jax.device_get(launcher.unreplicate(state).params)
  for name in ("embeddings", "encoder"):
    jax.tree.map(np.testing.assert_array_equal, final[name], initial[name])
  assert not np.array_equal(final["head"]["kernel"], initial["head"]["kernel"])


def test_clipping_ignores_frozen_gradients():
  model = _bert_classifier()
  params = _params(model, seed=0)
  # Gradients of 1 on the head (norm sqrt(head size)) and huge on the backbone.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  grads["head"] = jax.tree.map(jnp.ones_like, params["head"])
  head_norm = float(optax.tree.norm(grads["head"]))
  config = _optim_config(
      freeze_backbone=True, name="sgd", momentum=0.0, weight_decay=0.0, lr=1.0, clip_norm=1e9
  )
  optimizer, _ = optim.build(config, 1, 10, params=params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), updates["encoder"])
  np.testing.assert_allclose(updates["head"]["bias"], -1.0, rtol=1e-6)

  # With a clip norm of half the head norm, the head update halves: the
  # backbone gradients did not enter the norm.
  config.clip_norm = head_norm / 2
  optimizer, _ = optim.build(config, 1, 10, params=params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["head"]["bias"], -0.5, rtol=1e-5)


def test_layer_decay_scales_updates():
  model = _bert_classifier(num_layers=2)
  params = _params(model, seed=0)
  optimizer, _ = optim.build(
      _optim_config(
          name="sgd", momentum=0.0, weight_decay=0.0, lr=1.0, clip_norm=None, layer_decay=0.5
      ),
      1,
      10,
      params=params,
  )
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  np.testing.assert_allclose(updates["head"]["bias"], -1.0)
  np.testing.assert_allclose(updates["encoder"]["block_1"]["mlp"]["dense1"]["bias"], -0.5)
  np.testing.assert_allclose(updates["encoder"]["block_0"]["mlp"]["dense1"]["bias"], -0.25)
  np.testing.assert_allclose(updates["embeddings"]["norm"]["scale"], -0.125)


def test_frozen_state_checkpoint_round_trip(tmp_path):
  # The optimizer state of a frozen backbone contains masked nodes; it must
  # save and restore like any other state.
  model = _bert_classifier()
  params = _params(model, seed=0)
  optimizer, _ = optim.build(_optim_config(freeze_backbone=True), 1, 10, params=params)
  state = create_train_state(model, optimizer, _text_inputs(), seed=0)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
  # A checkpoint's step must be its state's step, 0 here.
  checkpointer.save(
      0, state, {"param_shapes": checkpoint_lib.param_shapes(state.params)}, force=True
  )
  checkpointer.wait()
  restored, _ = checkpointer.restore(state, 0)
  checkpointer.close()
  assert isinstance(restored, TrainState)
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
