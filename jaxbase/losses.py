"""Losses and per-example metrics, computed in float32 whatever the compute dtype."""

import jax
import jax.numpy as jnp
import optax


def smooth_labels(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """Turns integer labels into smoothed one-hot targets.

  Args:
    labels: int[batch] class indices.
    num_classes: number of classes K.
    label_smoothing: alpha in [0, 1); the target is (1 - alpha) * one_hot + alpha / K
      (Szegedy et al. 2016, "Rethinking the Inception Architecture").

  Returns:
    float32[batch, num_classes] targets whose rows sum to 1.
  """
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against (optionally smoothed) integer labels.

  Args:
    logits: float[batch, num_classes].
    labels: int[batch] class indices.
    label_smoothing: alpha in [0, 1).

  Returns:
    float32[batch] losses.
  """
  logits = logits.astype(jnp.float32)
  targets = smooth_labels(labels, logits.shape[-1], label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def soft_cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example softmax cross-entropy against target distributions, e.g. from mixup.

  Args:
    logits: float[batch, num_classes].
    targets: float[batch, num_classes] rows that sum to 1.
    label_smoothing: alpha in [0, 1), applied as (1 - alpha) * targets + alpha / K.

  Returns:
    float32[batch] losses.
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32) * (1.0 - label_smoothing)
  targets = targets + label_smoothing / logits.shape[-1]
  return optax.softmax_cross_entropy(logits, targets)


def kl_divergence(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Per-example KL(softmax(target_logits) || softmax(logits)), in float32.

  TRADES (Zhang et al. 2019) uses it with the clean logits as the target and
  the adversarial logits as the second argument.

  Args:
    target_logits: float[batch, num_classes], the reference distribution.
    logits: float[batch, num_classes].

  Returns:
    float32[batch], each >= 0.
  """
  target_log_probs = jax.nn.log_softmax(target_logits.astype(jnp.float32))
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(target_log_probs) * (target_log_probs - log_probs), axis=-1)


def label_rank(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Rank of the true class among the logits, with ties broken by class index.

  A class ranks above the label when its logit is larger, or equal with a smaller
  index. That is the order `argmax` and `jax.lax.top_k` use, so top-1 correctness
  by rank equals `argmax(logits) == label`, and a model whose logits are all
  equal scores 1/K at top-1 rather than 100%.

  Args:
    logits: float[batch, num_classes].
    labels: int[batch].

  Returns:
    int32[batch]; 0 means the label is the top prediction.
  """
  logits = logits.astype(jnp.float32)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  class_index = jnp.arange(logits.shape[-1])[None, :]
  above = (logits > label_logit) | ((logits == label_logit) & (class_index < labels[:, None]))
  return jnp.sum(above, axis=-1).astype(jnp.int32)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example top-k correctness as float32 0/1 (ties broken as in `label_rank`)."""
  return (label_rank(logits, labels) < k).astype(jnp.float32)


def mask_tokens(
    key: jax.Array,
    token_ids: jax.Array,
    padding_mask: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    num_special: int,
    max_predictions: int,
    mask_rate: float = 0.15,
    mask_token_fraction: float = 0.8,
    random_token_fraction: float = 0.1,
) -> dict[str, jax.Array]:
  """Choose masked-language-model targets and corrupt the inputs, as BERT does.

  In each row, `max(1, round(mask_rate * n))` of the `n` candidate tokens are
  chosen uniformly at random, where candidates are real tokens (padding
  mask 1) with ids `>= num_special`, so padding, [CLS], [SEP] and the other
  special tokens are never chosen. A row without candidates gets no target.
  Each chosen token is replaced by [MASK] with probability
  `mask_token_fraction`, by a random non-special token with probability
  `random_token_fraction`, and kept otherwise (80/10/10 in Devlin et al.
  2019, "BERT"). The model then predicts the original token at each chosen
  position.

  Args:
    key: PRNG key.
    token_ids: int32[batch, length].
    padding_mask: [batch, length], 1 for real tokens and 0 for padding.
    mask_id: id of [MASK].
    vocab_size: vocabulary size; random replacements are drawn from
      `[num_special, vocab_size)`.
    num_special: ids below it are special tokens.
    max_predictions: P, the number of target slots per row. It must be at
      least `max(1, round(mask_rate * length))`, so that no chosen token is
      dropped; it may exceed `length`, the extra slots then stay unused.
    mask_rate: fraction of candidate tokens to predict.
    mask_token_fraction: fraction of chosen tokens replaced by [MASK].
    random_token_fraction: fraction of chosen tokens replaced by a random
      token.

  Returns:
    A dict with 'token_ids' (the corrupted inputs, int32[batch, length]),
    'masked_positions' (int32[batch, P]), 'masked_targets' (the original ids
    there, int32[batch, P]) and 'masked_weights' (float32[batch, P], 1 on the
    slots in use, 0 on unused slots).
  """
  length = token_ids.shape[1]
  if max_predictions < max(1, round(mask_rate * length)):
    raise ValueError(
        f"max_predictions={max_predictions} is below round({mask_rate} * {length}); "
        "raise it so that every chosen token has a slot"
    )
  select_key, action_key, random_key = jax.random.split(key, 3)
  candidates = padding_mask.astype(bool) & (token_ids >= num_special)
  num_candidates = jnp.sum(candidates, axis=-1)
  num_chosen = jnp.where(
      num_candidates > 0, jnp.maximum(1, jnp.round(mask_rate * num_candidates)), 0
  ).astype(jnp.int32)

  # Sorting random scores puts the candidates first, in random order; the
  # first num_chosen of them are the targets.
  scores = jnp.where(candidates, jax.random.uniform(select_key, token_ids.shape), 2.0)
  positions = jnp.argsort(scores, axis=-1)[:, :max_predictions].astype(jnp.int32)
  if length < max_predictions:
    # Rows shorter than P (batches cut to their longest sentence): the extra
    # slots point at position 0 with weight 0, so P stays the same.
    positions = jnp.pad(positions, ((0, 0), (0, max_predictions - length)))
  weights = jnp.arange(max_predictions)[None, :] < num_chosen[:, None]
  targets = jnp.take_along_axis(token_ids, positions, axis=-1)

  action = jax.random.uniform(action_key, positions.shape)
  random_ids = jax.random.randint(random_key, positions.shape, num_special, vocab_size)
  replaced = jnp.where(
      action < mask_token_fraction,
      mask_id,
      jnp.where(action < mask_token_fraction + random_token_fraction, random_ids, targets),
  )
  replaced = jnp.where(weights, replaced, targets)
  rows = jnp.arange(token_ids.shape[0])[:, None]
  corrupted = token_ids.at[rows, positions].set(replaced.astype(token_ids.dtype))
  return {
      "token_ids": corrupted,
      "masked_positions": positions,
      "masked_targets": targets.astype(jnp.int32),
      "masked_weights": weights.astype(jnp.float32),
  }


def masked_lm_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-slot cross-entropy of masked-token predictions, in float32.

  Args:
    logits: float[batch, P, vocab_size] at the masked positions.
    targets: int[batch, P] original token ids.

  Returns:
    float32[batch, P]. Weight it by `masked_weights` from `mask_tokens`, so
    only the chosen positions count.
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
