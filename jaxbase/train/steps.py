"""Per-replica train and eval steps.

Both steps are written once as code for one replica holding a slice of the
global batch; collectives over the named axis `'data'` make them data-parallel.
`jaxbase.train.parallel` runs them under `jax.shard_map` or `jax.pmap`.
Gradients and metrics are means over equal-sized replica slices, so N replicas
compute the same update as one replica on the whole global batch.

Batches hold either `images` (image models) or `token_ids` and
`padding_mask` (text models, optionally `segment_ids`), plus `labels`;
`model_inputs` picks the model's keyword inputs from them. The
masked-language-model steps (`make_mlm_train_step`, `make_mlm_eval_step`)
train a `BertForMaskedLM` on the same text batches.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxbase import attacks, losses
from jaxbase.train import adversarial as adversarial_lib
from jaxbase.train import nonfinite
from jaxbase.train.state import TrainState

AXIS = "data"

# A function from (key, images) to augmented images, e.g. jaxbase.data.augment.crop_and_flip.
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
# A function from (key, images, labels) to (images, target distributions), e.g. mixup.
MixFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# token_augment(key, token_ids, padding_mask) -> token_ids of the same shape.
TokenAugmentFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """Returns the moving-average decay used at `step`: min(decay, (1 + step) / (10 + step)).

  The ramp keeps the average from being dominated by the initial weights in
  short runs; after a few hundred steps it is `decay`.
  """
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def to_float_images(images: jax.Array) -> jax.Array:
  """Maps uint8 pixels to float32 in [0, 1]; float input is passed through as float32."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


# Batch keys that text models take as keyword inputs.
TEXT_INPUTS = ("token_ids", "padding_mask", "segment_ids")


def model_inputs(batch: dict) -> dict[str, jax.Array]:
  """Select the model's keyword inputs from a batch.

  Returns:
    `{'images': float32 in [0, 1]}` for image batches (uint8 is scaled by
    1/255), else the text inputs that the batch has among `TEXT_INPUTS`.

  Raises:
    ValueError: if the batch has neither 'images' nor 'token_ids'.
  """
  if "images" in batch:
    return {"images": to_float_images(batch["images"])}
  if "token_ids" in batch:
    return {name: batch[name] for name in TEXT_INPUTS if name in batch}
  raise ValueError(f"batch has keys {sorted(batch)}, but needs 'images' or 'token_ids'")


def replica_key(root_key: jax.Array, step: jax.Array, axis_name: str = AXIS) -> jax.Array:
  """Derives the key of this step and replica: fold_in(fold_in(root, step), replica)."""
  key = jax.random.fold_in(root_key, step)
  return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def split_step_key(
    root_key: jax.Array, step: jax.Array, axis_name: str = AXIS
) -> tuple[jax.Array, jax.Array]:
  """Split this step's replica key into (input key, dropout key).

  The input key drives augmentation or MLM masking. Both keys differ across
  steps and replicas, so each replica draws its own dropout masks.
  """
  key = replica_key(root_key, step, axis_name)
  input_key, dropout_key = jax.random.split(key)
  return input_key, dropout_key


def make_train_step(
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    label_smoothing: float = 0.0,
    augment: AugmentFn | None = None,
    adversarial: ml_collections.ConfigDict | None = None,
    steps_per_epoch: int = 1,
    mix: MixFn | None = None,
    ema_decay: float = 0.0,
    token_augment: TokenAugmentFn | None = None,
    axis_name: str = AXIS,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (state, metrics)` for one replica.

  Args:
    model: the flax module; BatchNorm in it must use `axis_name`.
    optimizer: the optax transformation.
    schedule: the learning-rate schedule, only to report the learning rate.
    label_smoothing: label smoothing of the cross-entropy loss.
    augment: on-device augmentation applied to the replica's images, or None.
    adversarial: the `adversarial` config (see `jaxbase.train.adversarial`), or
      None for standard training. Attacks see the augmented images.
    steps_per_epoch: steps per epoch, for the eps warmup.
    mix: mixup or cutmix after `augment`, or None. The loss then uses its
      target distributions; top-1 and top-5 still count the original labels.
      Not combinable with `adversarial`, whose attacks need hard labels.
    ema_decay: when > 0, update `state.ema` after every step as
      `ema = d * ema + (1 - d) * new` with `d = ema_decay_at(ema_decay, step)`.
      The state must have been created with `ema=True`.
    token_augment: `token_augment(key, token_ids, padding_mask) -> token_ids`
      applied to text batches (e.g. `augment.token_dropout`), or None.
    axis_name: the data-parallel axis.

  Returns:
    The per-replica step. `batch` contains `images` (uint8 or float in [0, 1],
    [local_batch, height, width, channels]) or the text inputs of
    `model_inputs`, and `labels` (int32[local_batch]). Augmentation and
    adversarial training need images.
    Metrics are replica means: `loss`, `top1`, `top5`, `learning_rate`. Under
    'pgd' and 'fgsm_rs' top-1 and top-5 are measured on the training inputs,
    adversarial ones included; under 'trades' on the clean ones. Metrics also
    contain `nonfinite`, `jaxbase.train.nonfinite.nonfinite_flags` of the mean
    loss and gradients. A step that sets any flag returns the old params,
    batch_stats and opt_state with the step counter advanced, so the batch is
    skipped and the state stays finite.
  """
  method = "none" if adversarial is None else adversarial.method
  if adversarial is not None:
    adversarial_lib.check_config(adversarial)
  if mix is not None and method != "none":
    raise ValueError(
        f"mixup/cutmix give soft targets, but adversarial.method={method!r} crafts attacks "
        "against hard labels; turn one of them off"
    )
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema decay must be in [0, 1), got {ema_decay}")

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    # Separate streams for augmentation and dropout, different on every replica.
    augment_key, dropout_key = split_step_key(state.key, state.step, axis_name)
    key = replica_key(state.key, state.step, axis_name)  # The attack's streams fold into it.
    inputs = model_inputs(batch)
    labels = batch["labels"]
    if (augment is not None or mix is not None or method != "none") and "images" not in inputs:
      raise ValueError(
          "augmentation and adversarial training apply to images, but the batch has "
          f"{sorted(batch)}; turn them off for text models"
      )
    if token_augment is not None and "token_ids" not in inputs:
      raise ValueError(
          f"token augmentation applies to text, but the batch has {sorted(batch)}; "
          "set augment.token_dropout to 0 for image models"
      )
    if augment is not None:
      inputs["images"] = augment(augment_key, inputs["images"])
    if token_augment is not None:
      inputs["token_ids"] = token_augment(augment_key, inputs["token_ids"], inputs["padding_mask"])
    targets = None
    if mix is not None:
      # A stream of its own, so turning mixing on leaves the other streams unchanged.
      inputs["images"], targets = mix(jax.random.fold_in(key, 3), inputs["images"], labels)
    images = inputs.get("images")

    crafted = None
    if method != "none":
      # A stream of its own, so adding an attack leaves the other streams unchanged.
      attack_key, attack_dropout_key = jax.random.split(jax.random.fold_in(key, 2))
      logits_fn = attacks.make_logits_fn(
          model,
          {"params": state.params, "batch_stats": state.batch_stats},
          train=adversarial.attack_train_mode,
          rngs={"dropout": attack_dropout_key},
      )
      scale = adversarial_lib.eps_scale(adversarial, state.step, steps_per_epoch)
      crafted = adversarial_lib.craft(adversarial, logits_fn, images, labels, attack_key, scale)

    def apply(params, batch_stats, inputs):
      logits, new_model_state = model.apply(
          {"params": params, "batch_stats": batch_stats},
          **inputs,
          train=True,
          rngs={"dropout": dropout_key},
          mutable=["batch_stats"],
      )
      return logits, new_model_state.get("batch_stats", {})

    def loss_fn(params):
      if method == "trades":
        logits, batch_stats = apply(params, state.batch_stats, inputs)
        adversarial_logits, batch_stats = apply(params, batch_stats, {"images": crafted})
        loss = losses.cross_entropy(logits, labels, label_smoothing).mean()
        robust = losses.kl_divergence(logits, adversarial_logits).mean()
        return loss + adversarial.trades_beta * robust, (logits, batch_stats)
      step_inputs = inputs if crafted is None else {"images": crafted}
      logits, batch_stats = apply(params, state.batch_stats, step_inputs)
      if targets is not None:
        loss = losses.soft_cross_entropy(logits, targets, label_smoothing).mean()
      else:
        loss = losses.cross_entropy(logits, labels, label_smoothing).mean()
      return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    metrics = {
        "loss": loss,
        "top1": losses.topk_correct(logits, labels, 1).mean(),
        "top5": losses.topk_correct(logits, labels, min(5, logits.shape[-1])).mean(),
    }
    metrics = jax.lax.pmean(metrics, axis_name)
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)

    # Flags from the replica means, so every replica takes the same branch below.
    flags = nonfinite.nonfinite_flags(metrics["loss"], grads)
    metrics[nonfinite.FLAGS_KEY] = flags
    ema = state.ema
    if ema_decay:
      if ema is None:
        raise ValueError("ema_decay > 0 needs a state created with create_train_state(ema=True)")
      decay = ema_decay_at(ema_decay, state.step)
      ema = jax.tree.map(
          lambda average, new: decay * average + (1.0 - decay) * new,
          ema,
          {"params": params, "batch_stats": batch_stats},
      )
    updated = (params, batch_stats, opt_state, ema)
    previous = (state.params, state.batch_stats, state.opt_state, state.ema)
    params, batch_stats, opt_state, ema = jax.tree.map(
        lambda new, old: jnp.where(jnp.any(flags), old, new), updated, previous
    )
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema
    )
    return new_state, metrics

  return train_step


def flip_averaged_logits(
    logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array
) -> jax.Array:
  """Average the logits of `images` and of their left-right mirror images.

  This is test-time flip augmentation. Logits are averaged rather than
  probabilities, so the result is again logits: cross-entropy, top-k and
  attacks apply to it unchanged, and its softmax is the normalized geometric
  mean of the two softmax outputs.

  Args:
    logits_fn: a function from images to float32[batch, num_classes] logits.
    images: float32[batch, height, width, channels].

  Returns:
    float32[batch, num_classes], `(logits_fn(images) + logits_fn(mirrored)) / 2`.
  """
  mirrored = images[:, :, ::-1, :]
  return 0.5 * (logits_fn(images) + logits_fn(mirrored))


def make_eval_step(
    model: flax.linen.Module, *, eval_flip: bool = False, axis_name: str = AXIS
) -> Callable[[TrainState, dict], dict]:
  """Builds `eval_step(state, batch) -> sums` for one replica.

  It evaluates `state.eval_variables()`: the moving average of the weights
  when the state has one. The batch carries a `mask` (float32[local_batch], 1
  for real examples and 0 for padding), and the step returns sums over real
  examples, summed across
  replicas: `loss_sum`, `top1_sum`, `top5_sum`, `count`. The caller adds them
  over batches and divides at the end, so every example counts exactly once.

  Args:
    model: the flax module.
    eval_flip: score each image by `flip_averaged_logits`, the mean of the
      logits of the image and of its mirror image. This doubles the cost of
      the step. Image batches only.
    axis_name: the data-parallel axis.

  Returns:
    The per-replica eval step.
  """

  def eval_step(state: TrainState, batch: dict) -> dict:
    labels, mask = batch["labels"], batch["mask"]
    inputs = model_inputs(batch)
    if eval_flip and "images" not in inputs:
      raise ValueError(
          f"eval_flip mirrors images, but the batch has {sorted(batch)}; "
          "set eval_flip=False for text models"
      )
    variables = state.eval_variables()
    if eval_flip:
      logits = flip_averaged_logits(
          lambda images: model.apply(variables, images=images, train=False), inputs["images"]
      )
    else:
      logits = model.apply(variables, **inputs, train=False)
    sums = {
        "loss_sum": jnp.sum(losses.cross_entropy(logits, labels) * mask),
        "top1_sum": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
        "top5_sum": jnp.sum(losses.topk_correct(logits, labels, min(5, logits.shape[-1])) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, axis_name)

  return eval_step


def make_mlm_train_step(
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    *,
    masking: dict[str, Any],
    schedule: optax.Schedule | None = None,
    axis_name: str = AXIS,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Build the per-replica masked-language-model step of a `BertForMaskedLM`.

  Each replica masks its own rows with `losses.mask_tokens` from its own key
  (the replica key's first split; the second drives dropout). The loss is the
  cross-entropy summed over the chosen tokens of all replicas, divided by
  their global count, so each token weighs the same however the masked
  tokens fall across replicas.

  Args:
    model: a `BertForMaskedLM`.
    optimizer: the optax transformation.
    masking: keyword arguments of `losses.mask_tokens` besides the key and
      the arrays (mask_id, vocab_size, num_special, max_predictions, rates).
    schedule: the learning-rate schedule, only to report the learning rate.
    axis_name: the data-parallel axis.

  Returns:
    `train_step(state, batch) -> (state, metrics)` for batches with
    'token_ids' and 'padding_mask'. Metrics are over the masked tokens of the
    global batch: `loss`, `top1`, `top5`, and `learning_rate`.
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    mask_key, dropout_key = split_step_key(state.key, state.step, axis_name)
    masked = losses.mask_tokens(mask_key, batch["token_ids"], batch["padding_mask"], **masking)
    weights = masked["masked_weights"]
    num_replicas = jax.lax.psum(1, axis_name)
    # The replica's sum over the global count, times the replica count: the
    # pmean below then gives the global per-token mean.
    scale = num_replicas / jnp.maximum(jax.lax.psum(jnp.sum(weights), axis_name), 1.0)

    def loss_fn(params):
      logits = model.apply(
          {"params": params},
          masked["token_ids"],
          train=True,
          padding_mask=batch["padding_mask"],
          masked_positions=masked["masked_positions"],
          rngs={"dropout": dropout_key},
      )
      token_losses = losses.masked_lm_cross_entropy(logits, masked["masked_targets"])
      return jnp.sum(token_losses * weights) * scale, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    sums = _masked_token_sums(logits, masked["masked_targets"], weights)
    metrics = jax.lax.pmean(
        {"loss": loss, "top1": sums["top1_sum"] * scale, "top5": sums["top5_sum"] * scale},
        axis_name,
    )
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)

    # The same guard as the classification step: a non-finite step keeps the old state.
    flags = nonfinite.nonfinite_flags(metrics["loss"], grads)
    metrics[nonfinite.FLAGS_KEY] = flags
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(jnp.any(flags), old, new),
        (params, opt_state),
        (state.params, state.opt_state),
    )
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _masked_token_sums(logits, targets, weights) -> dict[str, jax.Array]:
  """Sum loss and top-1/top-5 correctness over the weighted masked-token slots."""
  vocab_size = logits.shape[-1]
  flat_logits = logits.reshape(-1, vocab_size)
  flat_targets = targets.reshape(-1)
  flat_weights = weights.reshape(-1)
  token_losses = losses.masked_lm_cross_entropy(flat_logits, flat_targets)
  return {
      "loss_sum": jnp.sum(token_losses * flat_weights),
      "top1_sum": jnp.sum(losses.topk_correct(flat_logits, flat_targets, 1) * flat_weights),
      "top5_sum": jnp.sum(
          losses.topk_correct(flat_logits, flat_targets, min(5, vocab_size)) * flat_weights
      ),
      "count": jnp.sum(flat_weights),
  }


def make_mlm_eval_step(
    model: flax.linen.Module, *, axis_name: str = AXIS
) -> Callable[[TrainState, dict], dict]:
  """Build the per-replica masked-language-model eval step.

  Eval batches carry masks fixed in advance (the output of
  `losses.mask_tokens` for the whole eval set, drawn once from a fixed key),
  so every evaluation scores the same tokens. Padding rows (`mask` 0) count
  nothing.

  Returns:
    `eval_step(state, batch) -> sums` with `loss_sum`, `top1_sum`,
    `top5_sum` and `count` over masked tokens, summed across replicas;
    `summarize_eval` turns them into per-token means.
  """

  def eval_step(state: TrainState, batch: dict) -> dict:
    logits = model.apply(
        {"params": state.params},
        batch["token_ids"],
        train=False,
        padding_mask=batch["padding_mask"],
        masked_positions=batch["masked_positions"],
    )
    weights = batch["masked_weights"] * batch["mask"][:, None]
    return jax.lax.psum(_masked_token_sums(logits, batch["masked_targets"], weights), axis_name)

  return eval_step


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
  """Turns summed eval metrics into means: `loss`, `accuracy` (top-1), `top5`, `examples`."""
  count = float(sums["count"])
  if count == 0:
    raise ValueError("the eval set is empty; check data.test_split")
  return {
      "loss": float(sums["loss_sum"]) / count,
      "accuracy": float(sums["top1_sum"]) / count,
      "top5": float(sums["top5_sum"]) / count,
      "examples": int(round(count)),
  }
