"""Tests for jaxbase.models.transformer and its registry entries, with tiny encoders."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxbase import models
from jaxbase.models import transformer

VOCAB = 40
MAX_LENGTH = 12
# Three sentences of different lengths, [CLS]=2 first and [SEP]=3 last, ids >= 5 in between.
SENTENCES = [[2, 7, 9, 11, 3], [2, 30, 3], [2, 5, 6, 7, 8, 9, 10, 12, 3]]


def _bert(pre_norm=False, dropout=0.0, **overrides):
  attributes = dict(
      vocab_size=VOCAB,
      max_length=MAX_LENGTH,
      num_layers=2,
      width=16,
      num_heads=2,
      mlp_dim=32,
      num_classes=3,
      dropout_rate=dropout,
      attention_dropout_rate=dropout,
      pre_norm=pre_norm,
  )
  attributes.update(overrides)
  return transformer.BertClassifier(**attributes)


def _padded(sentences, length=MAX_LENGTH, pad_id=0):
  token_ids = np.full((len(sentences), length), pad_id, np.int32)
  padding_mask = np.zeros((len(sentences), length), np.int32)
  for row, sentence in enumerate(sentences):
    token_ids[row, : len(sentence)] = sentence
    padding_mask[row, : len(sentence)] = 1
  return jnp.asarray(token_ids), jnp.asarray(padding_mask)


def _init(model, token_ids, padding_mask):
  return model.init(jax.random.PRNGKey(0), token_ids, train=False, padding_mask=padding_mask)


@pytest.mark.parametrize("pre_norm, pool", [(False, "cls"), (True, "cls"), (False, "mean")])
def test_padded_equals_unpadded(pre_norm, pool):
  model = _bert(pre_norm=pre_norm, pool=pool)
  token_ids, padding_mask = _padded(SENTENCES)
  variables = _init(model, token_ids, padding_mask)
  padded_logits = model.apply(variables, token_ids, train=False, padding_mask=padding_mask)
  for row, sentence in enumerate(SENTENCES):
    alone = model.apply(variables, jnp.asarray([sentence], jnp.int32), train=False)
    np.testing.assert_allclose(padded_logits[row], alone[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padded_token_ids_change_nothing(pool):
  model = _bert(pool=pool)
  token_ids, padding_mask = _padded(SENTENCES)
  variables = _init(model, token_ids, padding_mask)
  logits = model.apply(variables, token_ids, train=False, padding_mask=padding_mask)
  scrambled = jnp.where(
      padding_mask == 1,
      token_ids,
      jax.random.randint(jax.random.PRNGKey(5), token_ids.shape, 0, VOCAB),
  )
  assert not np.array_equal(scrambled, token_ids)
  scrambled_logits = model.apply(variables, scrambled, train=False, padding_mask=padding_mask)
  np.testing.assert_allclose(scrambled_logits, logits, rtol=0, atol=1e-6)


def test_padding_mask_matters():
  # The same ids read as all-real tokens give other logits, so the mask is used.
  model = _bert()
  token_ids, padding_mask = _padded(SENTENCES)
  variables = _init(model, token_ids, padding_mask)
  masked = model.apply(variables, token_ids, train=False, padding_mask=padding_mask)
  unmasked = model.apply(variables, token_ids, train=False)
  assert not np.allclose(masked[1], unmasked[1], atol=1e-4)


def test_mean_pool_averages_real_token_outputs():
  # With the head's kernel set to the identity, the logits are the pooled
  # vector plus the bias: the mean of the encoder outputs at real tokens.
  model = _bert(pool="mean", num_classes=16)
  token_ids, padding_mask = _padded(SENTENCES)
  variables = _init(model, token_ids, padding_mask)
  params = jax.tree.map(lambda x: x, variables["params"])
  params["head"] = {"kernel": jnp.eye(16), "bias": jnp.zeros(16)}
  logits, state = model.apply(
      {"params": params},
      token_ids,
      train=False,
      padding_mask=padding_mask,
      capture_intermediates=lambda module, _: module.name == "encoder",
  )
  (outputs,) = state["intermediates"]["encoder"]["__call__"]
  for row, sentence in enumerate(SENTENCES):
    expected = np.mean(np.asarray(outputs[row, : len(sentence)]), axis=0)
    np.testing.assert_allclose(logits[row], expected, rtol=1e-5, atol=1e-6)


def test_bert_rejects_unknown_pool():
  token_ids, padding_mask = _padded(SENTENCES)
  with pytest.raises(ValueError, match="unknown pool 'max'"):
    _init(_bert(pool="max"), token_ids, padding_mask)


def test_bert_dropout_only_in_training():
  model = _bert(dropout=0.3)
  token_ids, padding_mask = _padded(SENTENCES)
  variables = _init(model, token_ids, padding_mask)

  def run(train, seed):
    return model.apply(
        variables,
        token_ids,
        train=train,
        padding_mask=padding_mask,
        rngs={"dropout": jax.random.PRNGKey(seed)},
    )

  np.testing.assert_array_equal(run(False, 1), run(False, 2))
  assert not np.allclose(run(True, 1), run(True, 2))


def test_bert_param_tree_and_dtypes():
  model = _bert(pre_norm=True, dtype=jnp.bfloat16)
  token_ids, padding_mask = _padded(SENTENCES)
  variables = _init(model, token_ids, padding_mask)
  params = variables["params"]
  assert set(params) == {"embeddings", "encoder", "head"}
  assert set(params["encoder"]) == {"block_0", "block_1", "final_norm"}
  assert params["embeddings"]["token_embed"]["embedding"].shape == (VOCAB, 16)
  assert params["embeddings"]["position_embed"]["embedding"].shape == (MAX_LENGTH, 16)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  logits = model.apply(variables, token_ids, train=False, padding_mask=padding_mask)
  assert logits.dtype == jnp.float32
  assert logits.shape == (3, 3)


def test_post_norm_has_no_final_norm():
  token_ids, padding_mask = _padded(SENTENCES)
  params = _init(_bert(pre_norm=False), token_ids, padding_mask)["params"]
  assert set(params["encoder"]) == {"block_0", "block_1"}


def test_sequence_longer_than_max_length_raises():
  model = _bert()
  token_ids = jnp.ones((1, MAX_LENGTH + 1), jnp.int32)
  with pytest.raises(ValueError, match="longer than the model's max_length 12"):
    model.init(jax.random.PRNGKey(0), token_ids, train=False)


def test_masked_lm_gathers_positions_and_ties_embeddings():
  model = transformer.BertForMaskedLM(
      vocab_size=VOCAB, max_length=MAX_LENGTH, num_layers=1, width=16, num_heads=2, mlp_dim=32
  )
  token_ids, padding_mask = _padded(SENTENCES)
  variables = model.init(jax.random.PRNGKey(0), token_ids, train=False, padding_mask=padding_mask)
  assert "mlm_head" not in variables["params"]
  assert set(variables["params"]) == {
      "embeddings",
      "encoder",
      "mlm_transform",
      "mlm_norm",
      "mlm_bias",
  }

  full = model.apply(variables, token_ids, train=False, padding_mask=padding_mask)
  assert full.shape == (3, MAX_LENGTH, VOCAB)

  positions = jnp.asarray([[1, 2], [1, 0], [4, 7]], jnp.int32)
  gathered = model.apply(
      variables, token_ids, train=False, padding_mask=padding_mask, masked_positions=positions
  )
  np.testing.assert_allclose(
      gathered, jnp.take_along_axis(full, positions[..., None], axis=1), rtol=1e-5, atol=1e-5
  )

  # Tied output layer: a change of the token embedding moves the logits.
  changed = jax.tree.map(lambda x: x, variables)
  changed["params"]["embeddings"]["token_embed"]["embedding"] = (
      variables["params"]["embeddings"]["token_embed"]["embedding"] * 2.0
  )
  assert not np.allclose(
      model.apply(changed, token_ids, train=False, padding_mask=padding_mask), full
  )


def test_stochastic_depth_drops_whole_branches():
  block = transformer.EncoderBlock(num_heads=2, mlp_dim=16, drop_path_rate=0.5, pre_norm=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (256, 4, 8))
  variables = block.init(jax.random.PRNGKey(1), x, None, train=False)
  trained = block.apply(variables, x, None, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  # A pre-LN block whose two branches are both dropped returns its input
  # exactly; that happens to an example with probability 0.5 * 0.5.
  unchanged = np.all(np.asarray(trained) == np.asarray(x), axis=(1, 2))
  assert 0.15 < unchanged.mean() < 0.35
  evaluated = block.apply(variables, x, None, train=False)
  assert not np.any(np.all(np.asarray(evaluated) == np.asarray(x), axis=(1, 2)))


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_vit_shapes_and_position_embedding(pool):
  model = transformer.VisionTransformer(
      num_classes=5, patch_size=4, num_layers=1, width=16, num_heads=2, mlp_dim=32, pool=pool
  )
  images = jnp.full((2, 16, 16, 3), 0.5)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  params = variables["params"]
  tokens = 16 + (1 if pool == "token" else 0)
  assert params["position_embed"].shape == (1, tokens, 16)
  assert ("class_token" in params) == (pool == "token")
  logits = model.apply(variables, images, train=False)
  assert logits.shape == (2, 5)
  assert logits.dtype == jnp.float32
  # The head starts at zero, so every class starts with the same logit.
  np.testing.assert_array_equal(logits, 0.0)


def test_vit_normalizes_inside():
  model = transformer.VisionTransformer(
      num_classes=2,
      patch_size=4,
      num_layers=1,
      width=8,
      num_heads=2,
      mlp_dim=16,
      mean=(0.5, 0.5, 0.5),
      std=(0.25, 0.25, 0.25),
  )
  images = jnp.full((1, 8, 8, 3), 0.5)
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  # Mean-valued pixels normalize to zero, so the patch embedding outputs its bias only.
  _, state = model.apply(
      variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
  )
  patch_output = state["intermediates"]["patch_embed"]["__call__"][0]
  np.testing.assert_allclose(
      patch_output, jnp.broadcast_to(variables["params"]["patch_embed"]["bias"], (1, 2, 2, 8))
  )


def test_vit_rejects_uint8_and_bad_patch():
  model = transformer.VisionTransformer(
      num_classes=2, patch_size=3, num_layers=1, width=8, num_heads=2, mlp_dim=16
  )
  with pytest.raises(ValueError, match="does not divide the image size 8x8"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
  with pytest.raises(ValueError, match="must be float"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 9, 9, 3), jnp.uint8), train=False)


def test_variant_tables_follow_published_shapes():
  assert transformer.bert_variant("base") == dict(
      num_layers=12, width=768, num_heads=12, mlp_dim=3072
  )
  assert transformer.bert_variant("mini") == dict(
      num_layers=4, width=256, num_heads=4, mlp_dim=1024
  )
  assert transformer.vit_variant("S/4") == dict(
      num_layers=12, width=384, num_heads=6, mlp_dim=1536, patch_size=4
  )
  assert transformer.vit_variant("ti/16")["width"] == 192


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: transformer.bert_variant("huge"),
            "valid variants: tiny, mini, small, medium, base",
        ),
        (lambda: transformer.vit_variant("L/16"), "SIZE one of Ti, S, B"),
        (lambda: transformer.vit_variant("S/x"), "unknown ViT variant 'S/x'"),
    ],
)
def test_unknown_variant_lists_valid_ones(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_registry_unknown_model_lists_transformers():
  with pytest.raises(ValueError, match="unknown model 'bert_huge'") as error:
    models.build_model(ml_collections.ConfigDict({"name": "bert_huge"}), 2, vocab_size=10)
  assert "bert_mini" in str(error.value)
  assert "vit_s/4" in str(error.value)


def test_registry_builds_bert_and_vit():
  config = ml_collections.ConfigDict(
      {"name": "bert_tiny", "max_length": 8, "dropout_rate": 0.1, "pre_norm": True}
  )
  model = models.build_model(config, 2, vocab_size=50)
  assert isinstance(model, transformer.BertClassifier)
  assert (model.num_layers, model.width, model.vocab_size, model.max_length) == (2, 128, 50, 8)
  assert model.pre_norm
  mlm = models.build_model(config, 2, vocab_size=50, task="mlm")
  assert isinstance(mlm, transformer.BertForMaskedLM)
  assert model.pool == "cls"
  config.pool = "mean"
  assert models.build_model(config, 2, vocab_size=50).pool == "mean"

  vit = models.build_model(ml_collections.ConfigDict({"name": "vit_b/16", "pool": "gap"}), 10)
  assert (vit.width, vit.patch_size, vit.pool) == (768, 16, "gap")


@pytest.mark.parametrize(
    "fields, kwargs, message",
    [
        ({"name": "bert_tiny", "max_length": 8}, {}, "needs vocab_size"),
        ({"name": "bert_tiny"}, {"vocab_size": 10}, "needs model.max_length"),
        ({"name": "vit_s/4"}, {"task": "mlm"}, "needs a BERT model"),
        ({"name": "resnet20"}, {"task": "mlm"}, "needs a BERT model"),
        ({"name": "vit_s/4", "plain": True}, {}, "applies to ResNets only"),
        (
            {"name": "bert_tiny", "max_length": 8, "pool": "mean"},
            {"vocab_size": 10, "task": "mlm"},
            "applies to classifiers",
        ),
    ],
)
def test_registry_rejects_bad_transformer_fields(fields, kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.build_model(ml_collections.ConfigDict(fields), 2, **kwargs)
