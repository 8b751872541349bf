"""Tests for jaxbase.losses: label smoothing, cross-entropy and top-k with ties."""

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
