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
