"""Tests for jaxbase.losses: label smoothing, cross-entropy and top-k with ties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbase import losses


def test_smooth_labels_closed_form():
  targets = losses.smooth_labels(jnp.array([2, 0]), num_classes=4, label_smoothing=0.2)
  np.testing.assert_allclose(
      targets, [[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]], rtol=1e-6
  )
  np.testing.assert_allclose(targets.sum(-1), [1.0, 1.0], rtol=1e-6)


def test_cross_entropy_with_smoothing_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  alpha = 0.3
  log_probs = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
  expected = -((1 - alpha) * log_probs[0] + alpha / 3 * log_probs.sum())
  np.testing.assert_allclose(
      losses.cross_entropy(logits, jnp.array([0]), alpha), [expected], rtol=1e-6
  )


def test_cross_entropy_without_smoothing_is_nll():
  logits = jnp.array([[1.0, 3.0], [0.5, 0.5]])
  expected = [np.log1p(np.exp(-2.0)), np.log(2.0)]
  np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([1, 0])), expected, rtol=1e-6)


def test_cross_entropy_is_float32_for_bfloat16_logits():
  loss = losses.cross_entropy(jnp.ones((2, 3), jnp.bfloat16), jnp.array([0, 1]))
  assert loss.dtype == jnp.float32


@pytest.mark.parametrize(
    "logits, label, rank",
    [
        ([0.1, 0.9, 0.5], 1, 0),
        ([0.1, 0.9, 0.5], 2, 1),
        ([0.1, 0.9, 0.5], 0, 2),
        # Ties go to the smaller class index, as argmax does.
        ([0.5, 0.5, 0.5], 0, 0),
        ([0.5, 0.5, 0.5], 1, 1),
        ([0.5, 0.5, 0.5], 2, 2),
        ([0.2, 0.7, 0.7, 0.1], 2, 1),
        ([0.2, 0.7, 0.7, 0.1], 1, 0),
    ],
)
def test_label_rank_ties_by_index(logits, label, rank):
  assert int(losses.label_rank(jnp.array([logits]), jnp.array([label]))[0]) == rank


def test_top1_equals_argmax_with_ties():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 3, size=(200, 5)).astype(np.float32)  # Many ties.
  labels = rng.integers(0, 5, size=200)
  expected = (np.argmax(logits, -1) == labels).astype(np.float32)
  np.testing.assert_array_equal(
      losses.topk_correct(jnp.array(logits), jnp.array(labels), 1), expected
  )


def test_topk_hand_computed():
  logits = jnp.array(
      [
          [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 4 has rank 4: in the top-5, not the top-3.
          [0.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # label 5 ties with 1..4, which rank above it: rank 4.
          [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # label 0 wins every tie: rank 0.
          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # label 0: one larger logit: rank 1.
      ]
  )
  labels = jnp.array([4, 5, 0, 0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1), [0, 0, 1, 0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 3), [0, 0, 1, 1])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 5), [1, 1, 1, 1])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 4), [0, 0, 1, 1])


# Masked-language-model masking: a vocabulary of 1,000 with 5 special ids.
MLM_VOCAB = 1000
NUM_SPECIAL = 5
MASK_ID = 4


def _mlm_batch(num_rows=512, length=64, seed=0):
  """Rows of [CLS] tokens [SEP] and padding, with random real lengths from 2 to `length`."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, num_rows)
  token_ids = rng.integers(NUM_SPECIAL, MLM_VOCAB, (num_rows, length)).astype(np.int32)
  padding_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  token_ids[:, 0] = 2
  token_ids[np.arange(num_rows), lengths - 1] = 3
  token_ids[padding_mask == 0] = 0
  return jnp.asarray(token_ids), jnp.asarray(padding_mask)


def _mask(token_ids, padding_mask, seed=1, max_predictions=10):
  return losses.mask_tokens(
      jax.random.PRNGKey(seed),
      token_ids,
      padding_mask,
      mask_id=MASK_ID,
      vocab_size=MLM_VOCAB,
      num_special=NUM_SPECIAL,
      max_predictions=max_predictions,
  )


def test_mask_tokens_chooses_fifteen_percent_per_row():
  token_ids, padding_mask = _mlm_batch()
  masked = _mask(token_ids, padding_mask)
  candidates = np.asarray((padding_mask == 1) & (token_ids >= NUM_SPECIAL)).sum(axis=1)
  expected = np.where(candidates > 0, np.maximum(1, np.round(0.15 * candidates)), 0)
  np.testing.assert_array_equal(np.asarray(masked["masked_weights"]).sum(axis=1), expected)
  # Rows without candidates ([CLS] [SEP] only) get no target.
  assert (candidates == 0).any()


def test_mask_tokens_never_chooses_padding_or_special_tokens():
  token_ids, padding_mask = _mlm_batch()
  masked = _mask(token_ids, padding_mask)
  positions = np.asarray(masked["masked_positions"])
  weights = np.asarray(masked["masked_weights"]) > 0
  chosen_padding = np.take_along_axis(np.asarray(padding_mask), positions, axis=1)
  chosen_ids = np.take_along_axis(np.asarray(token_ids), positions, axis=1)
  assert (chosen_padding[weights] == 1).all()
  assert (chosen_ids[weights] >= NUM_SPECIAL).all()
  # Positions in use are distinct within a row.
  for row in range(len(positions)):
    used = positions[row][weights[row]]
    assert len(set(used.tolist())) == len(used)
  # Only chosen positions change, and padding stays [PAD].
  changed = np.asarray(masked["token_ids"]) != np.asarray(token_ids)
  chosen = np.zeros_like(changed)
  rows = np.repeat(np.arange(len(positions)), positions.shape[1]).reshape(positions.shape)
  chosen[rows[weights], positions[weights]] = True
  assert not (changed & ~chosen).any()
  np.testing.assert_array_equal(np.asarray(masked["token_ids"])[np.asarray(padding_mask) == 0], 0)
  np.testing.assert_array_equal(np.asarray(masked["masked_targets"])[weights], chosen_ids[weights])


def test_mask_tokens_80_10_10_split():
  token_ids, padding_mask = _mlm_batch(num_rows=2048)
  masked = _mask(token_ids, padding_mask)
  weights = np.asarray(masked["masked_weights"]) > 0
  positions = np.asarray(masked["masked_positions"])
  new = np.take_along_axis(np.asarray(masked["token_ids"]), positions, axis=1)[weights]
  old = np.asarray(masked["masked_targets"])[weights]
  total = weights.sum()
  assert total > 9000
  mask_fraction = np.mean(new == MASK_ID)
  random_fraction = np.mean((new != MASK_ID) & (new != old))
  kept_fraction = np.mean(new == old)
  # At 9,000 targets the binomial standard deviations are at most 0.0042; 0.02 is about 5.
  assert abs(mask_fraction - 0.8) < 0.02
  assert abs(random_fraction - 0.1) < 0.02
  assert abs(kept_fraction - 0.1) < 0.02
  replaced = new[(new != MASK_ID) & (new != old)]
  assert replaced.min() >= NUM_SPECIAL
  assert replaced.max() < MLM_VOCAB


def test_mask_tokens_depends_on_key_only():
  token_ids, padding_mask = _mlm_batch(num_rows=8)
  first = _mask(token_ids, padding_mask, seed=3)
  again = _mask(token_ids, padding_mask, seed=3)
  other = _mask(token_ids, padding_mask, seed=4)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(first["masked_positions"], other["masked_positions"])


def test_mask_tokens_with_more_slots_than_positions():
  # A batch cut to 6 tokens still returns P = 10 slots; the 4 extra ones are unused.
  token_ids, padding_mask = _mlm_batch(num_rows=64, length=6)
  masked = _mask(token_ids, padding_mask, max_predictions=10)
  assert masked["masked_positions"].shape == (64, 10)
  weights = np.asarray(masked["masked_weights"])
  np.testing.assert_array_equal(weights[:, 6:], 0)
  candidates = np.asarray((padding_mask == 1) & (token_ids >= NUM_SPECIAL)).sum(axis=1)
  expected = np.where(candidates > 0, np.maximum(1, np.round(0.15 * candidates)), 0)
  np.testing.assert_array_equal(weights.sum(axis=1), expected)
  assert np.asarray(masked["masked_positions"]).max() < 6


def test_mask_tokens_rejects_too_few_slots():
  token_ids, padding_mask = _mlm_batch(num_rows=2)
  with pytest.raises(ValueError, match="max_predictions=3 is below"):
    _mask(token_ids, padding_mask, max_predictions=3)


def test_masked_lm_loss_counts_only_weighted_slots():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 7))
  targets = jnp.asarray([[1, 2, 3], [4, 5, 6]])
  weights = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  token_losses = losses.masked_lm_cross_entropy(logits, targets)
  expected = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(3)[None, :], targets]
  np.testing.assert_allclose(token_losses, expected, rtol=1e-6)
  # Changing logits at an unweighted slot leaves the weighted sum unchanged.
  changed = logits.at[0, 2].set(100.0).at[1, 1].set(-50.0)
  np.testing.assert_allclose(
      jnp.sum(losses.masked_lm_cross_entropy(changed, targets) * weights),
      jnp.sum(token_losses * weights),
      rtol=1e-6,
  )
