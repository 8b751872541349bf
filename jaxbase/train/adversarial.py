"""Adversarial training as a choice of the ordinary train step.

`config.adversarial.method` selects what the train step feeds the loss:

- 'none': the clean (augmented) batch.
- 'pgd': PGD adversarial training (Madry et al. 2018, "Towards Deep Learning
  Models Resistant to Adversarial Attacks"): the loss is taken on PGD examples.
- 'fgsm_rs': FGSM from a random start with step 1.25 eps (Wong, Rice and Kolter
  2020, "Fast is better than free"); one gradient step per example.
- 'trades': TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off
  between Robustness and Accuracy"): cross-entropy on clean examples plus beta
  times KL(clean || adversarial), with the adversarial examples crafted to
  maximize that KL from a 0.001-scale Gaussian start.

`clean_fraction` keeps that share of each replica's batch clean for 'pgd' and
'fgsm_rs', and `eps_warmup_epochs` ramps eps (and the step size with it)
linearly from 0 over the first epochs.
"""

import jax
import jax.numpy as jnp
import ml_collections

from jaxbase import attacks, losses

METHODS = ("none", "pgd", "fgsm_rs", "trades")


def default_config() -> ml_collections.ConfigDict:
  """Returns the `adversarial` config section, with adversarial training off."""
  config = ml_collections.ConfigDict()
  config.method = "none"  # 'none' | 'pgd' | 'fgsm_rs' | 'trades'
  config.eps = 8 / 255  # Pixel units; 8/255 is the usual CIFAR-10 L-inf budget.
  config.step_size = 2 / 255  # PGD and TRADES step; 'fgsm_rs' uses 1.25 * eps.
  config.num_steps = 7  # PGD and TRADES steps per example.
  config.norm = "linf"
  config.trades_beta = 6.0  # Weight of the KL term; 6 is the paper's CIFAR-10 value.
  config.clean_fraction = 0.0  # Share of each batch kept clean ('pgd', 'fgsm_rs').
  config.eps_warmup_epochs = 0.0
  # Craft attacks with the model in eval mode (running BatchNorm statistics), as
  # attacks do by default; True uses batch statistics and dropout, never updating them.
  config.attack_train_mode = False
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on an unknown method or out-of-range values."""
  if config.method not in METHODS:
    raise ValueError(
        f"unknown adversarial.method {config.method!r}; use one of: {', '.join(METHODS)}"
    )
  if config.method == "none":
    return
  attacks.check_attack_args(
      eps=config.eps,
      step_size=config.step_size,
      norm=config.norm,
      num_steps=config.num_steps,
      restarts=1,
  )
  if not 0.0 <= config.clean_fraction < 1.0:
    raise ValueError(f"adversarial.clean_fraction must be in [0, 1), got {config.clean_fraction}")
  if config.method == "trades" and config.clean_fraction:
    raise ValueError(
        "adversarial.clean_fraction does not apply to TRADES, whose loss already has a clean "
        "term; set it to 0"
    )
  if config.trades_beta < 0:
    raise ValueError(f"adversarial.trades_beta must be >= 0, got {config.trades_beta}")
  if config.eps_warmup_epochs < 0:
    raise ValueError(f"adversarial.eps_warmup_epochs must be >= 0, got {config.eps_warmup_epochs}")


def eps_scale(
    config: ml_collections.ConfigDict, step: jax.Array, steps_per_epoch: int
) -> jax.Array:
  """Returns the warmup factor in [0, 1] that multiplies eps and the step size at `step`."""
  warmup_steps = config.eps_warmup_epochs * steps_per_epoch
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / warmup_steps)


def craft(
    config: ml_collections.ConfigDict,
    logits_fn: attacks.LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    scale: jax.Array,
) -> jax.Array:
  """Crafts the training inputs of 'pgd' or 'fgsm_rs', or the TRADES adversarial images.

  Args:
    config: the `adversarial` config.
    logits_fn: the model as a function of pixels (see `attacks.make_logits_fn`).
    images: float[batch, height, width, channels] in [0, 1].
    labels: int[batch].
    key: PRNG key of this step and replica.
    scale: eps warmup factor from `eps_scale`.

  Returns:
    Images of the same shape, with gradients stopped: the model is trained on
    them, not through the attack.
  """
  eps = config.eps * scale
  if config.method == "pgd":
    adversarial = attacks.pgd(
        logits_fn,
        images,
        labels,
        key,
        eps=eps,
        step_size=config.step_size * scale,
        num_steps=config.num_steps,
        norm=config.norm,
    )
  elif config.method == "fgsm_rs":
    adversarial = attacks.fgsm(
        logits_fn,
        images,
        labels,
        key,
        eps=eps,
        step_size=1.25 * eps,
        norm=config.norm,
        random_init=True,
    )
  elif config.method == "trades":
    clean_logits = jax.lax.stop_gradient(logits_fn(images))
    start = 0.001 * jax.random.normal(key, images.shape)
    adversarial = attacks.pgd(
        logits_fn,
        images,
        clean_logits,
        eps=eps,
        step_size=config.step_size * scale,
        num_steps=config.num_steps,
        norm=config.norm,
        random_init=False,
        init_delta=start,
        loss_fn=lambda logits, clean: losses.kl_divergence(clean, logits),
    )
  else:
    raise ValueError(f"adversarial.method {config.method!r} crafts no examples")
  adversarial = jax.lax.stop_gradient(adversarial)

  if config.method != "trades" and config.clean_fraction:
    num_clean = int(round(config.clean_fraction * images.shape[0]))
    adversarial = jnp.concatenate([images[:num_clean], adversarial[num_clean:]])
  return adversarial
