"""One builder for optimizers, learning-rate schedules and weight-decay masks.

`build(config, ...)` turns the `optim` section of a run config into an
`optax.GradientTransformation`, so every recipe in the repository gets its
optimizer the same way and a user can reproduce one from the config alone.

With `accumulation_steps` k > 1, one optimizer update averages the gradients
of k train steps (micro-batches). The schedule, weight decay and clipping then
count optimizer updates, not train steps, so callers pass `build` the number of
updates (see `updates_per_epoch`) and map train steps to updates with
`schedule_by_train_step`.
"""

from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adamw", "adam", "lamb", "lars")
# How weight decay enters: the optimizer's usual form, the gradient of an L2
# penalty added before the optimizer, or decay decoupled from its scaling.
WEIGHT_DECAY_MODES = ("default", "l2", "decoupled")
SCHEDULES = ("constant", "cosine", "step", "onecycle")


def decay_mask(params: Any) -> Any:
  """Marks the leaves that weight decay applies to: kernels and embedding tables.

  A leaf is decayed when its name is 'kernel' (dense and convolution weights)
  or 'embedding' (`nn.Embed` tables). Biases, BatchNorm and LayerNorm scales
  and offsets are left alone, as is standard since Goyal et al. 2017: decaying
  them shrinks normalization without regularizing the function. So are ViT's
  `position_embed` and `class_token`, as in DeiT (Touvron et al. 2021). The
  rule goes by name rather than rank because attention biases are 2-D
  ([heads, head_dim]).

  Args:
    params: a parameter pytree.

  Returns:
    A pytree of bools with the structure of `params`.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params
  )


def accumulation_steps(config: ml_collections.ConfigDict) -> int:
  """Returns `config.accumulation_steps`, the train steps per optimizer update (default 1)."""
  steps = config.get("accumulation_steps", 1)
  steps = 1 if steps is None else steps
  if int(steps) != steps or steps < 1:
    raise ValueError(f"optim.accumulation_steps must be a positive integer, got {steps}")
  return int(steps)


def updates_per_epoch(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Returns the optimizer updates per epoch: train steps per epoch / accumulation steps.

  Raises:
    ValueError: when the accumulation steps do not divide the train steps of an
      epoch. An update would then average micro-batches of two epochs, and the
      epoch-based schedule and evaluations would fall between updates.
  """
  k = accumulation_steps(config)
  if steps_per_epoch % k:
    divisors = [d for d in range(1, steps_per_epoch + 1) if steps_per_epoch % d == 0]
    raise ValueError(
        f"optim.accumulation_steps={k} does not divide the {steps_per_epoch} train steps per "
        f"epoch; use one of {divisors}, or change batch_size"
    )
  return steps_per_epoch // k


def schedule_by_train_step(schedule: optax.Schedule, accumulation: int) -> optax.Schedule:
  """Maps a schedule over optimizer updates to one over train steps.

  Train step s contributes to update s // accumulation, so the returned value
  is the learning rate of the update that step's gradient goes into.
  """
  if accumulation == 1:
    return schedule
  return lambda step: schedule(step // accumulation)


def build_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """Builds the learning-rate schedule named by `config.schedule`.

  Args:
    config: the `optim` config: `lr`, `schedule`, `warmup_epochs`, and for
      'step' `decay_epochs` (epoch boundaries) and `decay_factor`; for
      'onecycle' `pct_start`, `div_factor`, `final_div_factor`.
    steps_per_epoch: optimizer updates per epoch.
    total_steps: optimizer updates in the whole run.

  Returns:
    A function from the update count to the learning rate.

  Raises:
    ValueError: on an unknown schedule or a warmup longer than the run.
  """
  lr = float(config.lr)
  name = config.get("schedule", "constant")
  warmup_steps = int(round(config.get("warmup_epochs", 0.0) * steps_per_epoch))
  if warmup_steps >= total_steps and name != "constant":
    raise ValueError(
        f"optim.warmup_epochs={config.warmup_epochs} gives {warmup_steps} warmup steps, but "
        f"the run has only {total_steps} steps; set optim.warmup_epochs below num_epochs."
    )

  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, total_steps - warmup_steps)
  elif name == "step":
    boundaries = {
        int(epoch * steps_per_epoch) - warmup_steps: config.get("decay_factor", 0.1)
        for epoch in config.get("decay_epochs", ())
    }
    main = optax.piecewise_constant_schedule(lr, boundaries)
  elif name == "onecycle":
    # The one-cycle policy (Smith and Topin 2019) has its own warmup phase.
    return optax.cosine_onecycle_schedule(
        transition_steps=total_steps,
        peak_value=lr,
        pct_start=config.get("pct_start", 0.25),
        div_factor=config.get("div_factor", 25.0),
        final_div_factor=config.get("final_div_factor", 1e4),
    )
  else:
    raise ValueError(f"unknown optim.schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")

  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def build(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    total_steps: int,
    *,
    params: Any = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer and its learning-rate schedule from the `optim` config.

  Weight decay is masked by `decay_mask`. With `weight_decay_mode='default'`,
  'sgd' and 'lars' add it to the gradient before momentum, the classic L2
  form of SGD recipes, and 'adamw' and 'lamb' decouple it from the adaptive
  step (Loshchilov and Hutter 2019); 'adam' rejects it, because coupled L2
  with Adam is rarely what a user means. The two explicit modes compare the
  forms for 'sgd' and 'adam':
  - 'l2': `weight_decay * params` (the gradient of the penalty
    `weight_decay / 2 * |params|^2`) is added to the clipped gradient before
    the optimizer. This is the update of the penalty in the loss, except that
    the penalty's gradient is not clipped.
  - 'decoupled': the optimizer's direction plus `weight_decay * params` is
    scaled by the learning rate (SGDW; for 'adam' it is 'adamw').

  Fine-tuning options split the parameters into groups
  (`transfer.param_groups`) under `optax.multi_transform`. With
  `freeze_backbone`, everything but the head goes through
  `optax.set_to_zero`: frozen leaves get no update, no weight decay and no
  optimizer slots. With `layer_decay` < 1, each layer's group gets its own
  copy of the optimizer with the schedule scaled for that layer. In both
  cases global-norm clipping (`optax.masked`) measures only the trained
  leaves.

  Args:
    config: the `optim` config: `name`, `lr`, `weight_decay`,
      `weight_decay_mode`, `momentum`, `nesterov`, `b1`, `b2`, `eps`,
      `clip_norm` (global-norm clipping, 0 or None for none),
      `accumulation_steps` (train steps per update, default 1),
      `freeze_backbone` (bool), `layer_decay` (in (0, 1], 1 for none) and the
      schedule fields of `build_schedule`.
    steps_per_epoch: optimizer updates per epoch.
    total_steps: optimizer updates in the whole run.
    params: the parameters, or their `jax.eval_shape` structs; needed only
      for `freeze_backbone` and `layer_decay`, to label the groups.

  Returns:
    `(optimizer, schedule)`. The schedule maps the optimizer update count to
    the learning rate, unscaled by layer decay. With `accumulation_steps`
    k > 1 the optimizer is an `optax.MultiSteps`: it returns zero updates for
    k - 1 train steps and applies the inner optimizer to the mean gradient on
    the k-th.

  Raises:
    ValueError: on an unknown optimizer, an out-of-range value, or a
      fine-tuning option without `params`.
  """
  name = config.get("name", "sgd")
  weight_decay = float(config.get("weight_decay", 0.0))
  mode = config.get("weight_decay_mode", None) or "default"
  if mode not in WEIGHT_DECAY_MODES:
    raise ValueError(
        f"unknown optim.weight_decay_mode {mode!r}; known modes: {', '.join(WEIGHT_DECAY_MODES)}"
    )
  if mode != "default" and name not in ("sgd", "adam"):
    raise ValueError(
        f"optim.weight_decay_mode={mode!r} applies to 'sgd' and 'adam'; optim.name={name!r} "
        "has its own form of weight decay, so set weight_decay_mode='default'"
    )
  clip_norm = config.get("clip_norm", None)
  freeze_backbone = bool(config.get("freeze_backbone") or False)
  layer_decay = config.get("layer_decay")
  layer_decay = 1.0 if layer_decay is None else float(layer_decay)
  if float(config.lr) <= 0:
    raise ValueError(f"optim.lr must be positive, got {config.lr}")
  if weight_decay < 0:
    raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay}")
  if clip_norm is not None and clip_norm < 0:
    raise ValueError(
        f"optim.clip_norm must be positive, or 0 or None for no clipping; got {clip_norm}"
    )
  accumulation = accumulation_steps(config)
  if total_steps <= 0:
    raise ValueError(
        f"the run has {total_steps} optimizer steps; raise num_epochs or lower batch_size"
    )
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optim.name {name!r}; known optimizers: {', '.join(OPTIMIZERS)}")
  if name == "adam" and weight_decay and mode == "default":
    raise ValueError(
        f"optim.weight_decay={weight_decay} with optim.name='adam'; use 'adamw' for "
        "decoupled weight decay, optim.weight_decay_mode='l2' for an L2 penalty, or "
        "optim.weight_decay=0"
    )

  schedule = build_schedule(config, steps_per_epoch, total_steps)
  optimizer = _grouped_optimizer(
      config, name, mode, schedule, weight_decay, clip_norm, freeze_backbone, layer_decay, params
  )
  if accumulation > 1:
    # The whole chain sits inside MultiSteps, so clipping sees the mean
    # gradient and the schedule's count advances once per k train steps.
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=accumulation).gradient_transformation()
  return optimizer, schedule


def _grouped_optimizer(
    config, name, mode, schedule, weight_decay, clip_norm, freeze_backbone, layer_decay, params
) -> optax.GradientTransformation:
  """Chains clipping and the update rule, per parameter group when fine-tuning options are on."""
  if not freeze_backbone and layer_decay == 1.0:
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*parts, *_update_rule(config, name, mode, schedule, weight_decay))

  if params is None:
    raise ValueError(
        "optim.freeze_backbone and optim.layer_decay need the model parameters to label "
        "their groups; pass params= (jax.eval_shape of the init is enough)"
    )
  # Imported here: transfer imports checkpoint and orbax, which plain runs need not load.
  from jaxbase import transfer  # pylint: disable=g-import-not-at-top

  labels, scales = transfer.param_groups(
      params, freeze_backbone=freeze_backbone, layer_decay=layer_decay
  )
  transforms = {}
  for label, scale in scales.items():
    if scale == 0:
      transforms[label] = optax.set_to_zero()
    else:
      scaled = lambda step, scale=scale: scale * schedule(step)
      transforms[label] = optax.chain(*_update_rule(config, name, mode, scaled, weight_decay))
  parts = []
  if clip_norm:
    trained = jax.tree.map(lambda label: scales[label] > 0, labels)
    parts.append(optax.masked(optax.clip_by_global_norm(clip_norm), trained))
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts)


def _update_rule(
    config: ml_collections.ConfigDict,
    name: str,
    mode: str,
    schedule: optax.Schedule,
    weight_decay: float,
) -> list[optax.GradientTransformation]:
  """Return the transforms of optimizer `name` with its weight decay, without clipping.

  A list rather than a chain, so that a plain run's `optax.chain` has the
  same flat state as before groups existed and older checkpoints still load.
  """
  momentum = config.get("momentum", 0.9)
  b1, b2, eps = config.get("b1", 0.9), config.get("b2", 0.999), config.get("eps", 1e-8)
  parts: list[optax.GradientTransformation] = []
  if mode == "l2" and weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))

  if name == "sgd" and mode == "decoupled":
    if momentum:
      parts.append(optax.trace(decay=momentum, nesterov=config.get("nesterov", False)))
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return parts
  if name == "sgd":
    if weight_decay and mode == "default":
      parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(
        optax.sgd(schedule, momentum=momentum or None, nesterov=config.get("nesterov", False))
    )
    return parts
  if name == "adamw" or (name == "adam" and mode == "decoupled"):
    parts.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    )
    return parts
  if name == "adam":
    parts.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
    return parts
  if name == "lamb":
    parts.append(
        optax.lamb(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    )
    return parts
  parts.append(
      optax.lars(
          schedule,
          weight_decay=weight_decay,
          weight_decay_mask=decay_mask,
          trust_ratio_mask=decay_mask,
          momentum=momentum,
          nesterov=config.get("nesterov", False),
      )
  )
  return parts
