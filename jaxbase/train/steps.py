"""Per-replica train and eval steps.

Both steps are written once as code for one replica holding a slice of the
global batch; collectives over the named axis `'data'` make them data-parallel.
`jaxbase.train.parallel` runs them under `jax.shard_map` or `jax.pmap`.
Gradients and metrics are means over equal-sized replica slices, so N replicas
compute the same update as one replica on the whole global batch.
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


def replica_key(root_key: jax.Array, step: jax.Array, axis_name: str = AXIS) -> jax.Array:
  """Derives the key of this step and replica: fold_in(fold_in(root, step), replica)."""
  key = jax.random.fold_in(root_key, step)
  return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


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
    axis_name: the data-parallel axis.

  Returns:
    The per-replica step. `batch` contains `images` (uint8 or float in [0, 1],
    [local_batch, height, width, channels]) and `labels` (int32[local_batch]).
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
    key = replica_key(state.key, state.step, axis_name)
    augment_key, dropout_key = jax.random.split(key)
    images = to_float_images(batch["images"])
    labels = batch["labels"]
    if augment is not None:
      images = augment(augment_key, images)
    targets = None
    if mix is not None:
      # A stream of its own, so turning mixing on leaves the other streams unchanged.
      images, targets = mix(jax.random.fold_in(key, 3), images, labels)

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
          inputs,
          train=True,
          rngs={"dropout": dropout_key},
          mutable=["batch_stats"],
      )
      return logits, new_model_state.get("batch_stats", {})

    def loss_fn(params):
      if method == "trades":
        logits, batch_stats = apply(params, state.batch_stats, images)
        adversarial_logits, batch_stats = apply(params, batch_stats, crafted)
        loss = losses.cross_entropy(logits, labels, label_smoothing).mean()
        robust = losses.kl_divergence(logits, adversarial_logits).mean()
        return loss + adversarial.trades_beta * robust, (logits, batch_stats)
      inputs = images if crafted is None else crafted
      logits, batch_stats = apply(params, state.batch_stats, inputs)
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


def make_eval_step(
    model: flax.linen.Module, *, axis_name: str = AXIS
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
    axis_name: the data-parallel axis.

  Returns:
    The per-replica eval step.
  """

  def eval_step(state: TrainState, batch: dict) -> dict:
    images = to_float_images(batch["images"])
    labels, mask = batch["labels"], batch["mask"]
    logits = model.apply(state.eval_variables(), images, train=False)
    sums = {
        "loss_sum": jnp.sum(losses.cross_entropy(logits, labels) * mask),
        "top1_sum": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
        "top5_sum": jnp.sum(losses.topk_correct(logits, labels, min(5, logits.shape[-1])) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, axis_name)

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
