"""One builder for optimizers, learning-rate schedules and weight-decay masks.

`build(config, ...)` turns the `optim` section of a run config into an
`optax.GradientTransformation`, so every recipe in the repository gets its
optimizer the same way and a user can reproduce one from the config alone.
"""

from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adamw", "adam", "lamb", "lars")
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
        f"optim.warmup_epochs={config.warmup_epochs} gives {warmup_steps} warmup steps, "
        f"not fewer than the {total_steps} steps of the run; lower optim.warmup_epochs."
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

  Weight decay is masked by `decay_mask`. For 'sgd' and 'lars' it is added to
  the gradient before momentum, the classic L2 form of SGD recipes; for
  'adamw' and 'lamb' it is decoupled from the adaptive step (Loshchilov and
  Hutter 2019). 'adam' with weight decay is rejected because coupled L2 with
  Adam is rarely what a user means; use 'adamw'.

  Fine-tuning options split the parameters into groups
  (`transfer.param_groups`) under `optax.multi_transform`. With
  `freeze_backbone`, everything but the head goes through
  `optax.set_to_zero`: frozen leaves get no update, no weight decay and no
  optimizer slots. With `layer_decay` < 1, each layer's group gets its own
  copy of the optimizer with the schedule scaled for that layer. In both
  cases global-norm clipping (`optax.masked`) measures only the trained
  leaves.

  Args:
    config: the `optim` config: `name`, `lr`, `weight_decay`, `momentum`,
      `nesterov`, `b1`, `b2`, `eps`, `clip_norm` (global-norm clipping, 0 or
      None for none), `freeze_backbone` (bool), `layer_decay` (in (0, 1], 1
      for none) and the schedule fields of `build_schedule`.
    steps_per_epoch: optimizer updates per epoch.
    total_steps: optimizer updates in the whole run.
    params: the parameters, or their `jax.eval_shape` structs; needed only
      for `freeze_backbone` and `layer_decay`, to label the groups.

  Returns:
    `(optimizer, schedule)`; the schedule is the unscaled one.

  Raises:
    ValueError: on an unknown optimizer, an out-of-range value, or a
      fine-tuning option without `params`.
  """
  name = config.get("name", "sgd")
  weight_decay = float(config.get("weight_decay", 0.0))
  clip_norm = config.get("clip_norm", None)
  freeze_backbone = bool(config.get("freeze_backbone") or False)
  layer_decay = float(config.get("layer_decay") or 1.0)
  if float(config.lr) <= 0:
    raise ValueError(f"optim.lr must be positive, got {config.lr}")
  if weight_decay < 0:
    raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay}")
  if clip_norm is not None and clip_norm < 0:
    raise ValueError(
        f"optim.clip_norm must be positive, or 0 or None for no clipping; got {clip_norm}"
    )
  if total_steps <= 0:
    raise ValueError(
        f"the run has {total_steps} optimizer steps; raise num_epochs or lower batch_size"
    )
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optim.name {name!r}; known optimizers: {', '.join(OPTIMIZERS)}")
  if name == "adam" and weight_decay:
    raise ValueError(
        f"optim.weight_decay={weight_decay} with optim.name='adam'; use 'adamw' for "
        "decoupled weight decay, or set optim.weight_decay=0"
    )

  schedule = build_schedule(config, steps_per_epoch, total_steps)
  if not freeze_backbone and layer_decay == 1.0:
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    return optax.chain(*parts, *_update_rule(config, name, schedule, weight_decay)), schedule

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
      transforms[label] = optax.chain(*_update_rule(config, name, scaled, weight_decay))
  parts = []
  if clip_norm:
    trained = jax.tree.map(lambda label: scales[label] > 0, labels)
    parts.append(optax.masked(optax.clip_by_global_norm(clip_norm), trained))
  parts.append(optax.multi_transform(transforms, labels))
  return optax.chain(*parts), schedule


def _update_rule(
    config: ml_collections.ConfigDict, name: str, schedule: optax.Schedule, weight_decay: float
) -> list[optax.GradientTransformation]:
  """Return the transforms of optimizer `name` with its weight decay, without clipping.

  A list rather than a chain, so that a plain run's `optax.chain` has the
  same flat state as before groups existed and older checkpoints still load.
  """
  momentum = config.get("momentum", 0.9)
  b1, b2, eps = config.get("b1", 0.9), config.get("b2", 0.999), config.get("eps", 1e-8)
  if name == "sgd":
    parts = []
    if weight_decay:
      parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(
        optax.sgd(schedule, momentum=momentum or None, nesterov=config.get("nesterov", False))
    )
    return parts
  if name == "adamw":
    return [
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    ]
  if name == "adam":
    return [optax.adam(schedule, b1=b1, b2=b2, eps=eps)]
  if name == "lamb":
    return [optax.lamb(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)]
  return [
      optax.lars(
          schedule,
          weight_decay=weight_decay,
          weight_decay_mask=decay_mask,
          trust_ratio_mask=decay_mask,
          momentum=momentum,
          nesterov=config.get("nesterov", False),
      )
  ]
