"""FGSM and PGD adversarial attacks as pure functions of a logits function.

Every attack works in pixel space: `images` are floats in [0, 1] and `eps` is
measured in those units (8/255 is the usual CIFAR-10 L-inf budget). The model's
own first layer normalizes, so attacks take and return raw pixels. Each
iterate, the random start included, is projected onto the eps-ball around the
clean images and clipped into [0, 1]. L-inf steps follow the sign of the
gradient, L2 steps the gradient divided by its per-example L2 norm.

The loss is the sum of per-example cross-entropies, so each example's gradient
depends only on that example as long as the logits function treats examples
independently (eval-mode BatchNorm does, train-mode BatchNorm does not).

Attacks are jit-, vmap- and shard_map-compatible: they use no Python control
flow on array values. Argument checks on values (eps, step size, pixel range)
run only on concrete inputs, because traced values have no value to check.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxbase import losses

NORMS = ("linf", "l2")

LogitsFn = Callable[[jax.Array], jax.Array]
# A per-example loss to ascend: (logits [batch, classes], labels) -> float32[batch].
AttackLossFn = Callable[[jax.Array, Any], jax.Array]

# Added to L2 norms before dividing, so a zero gradient or perturbation gives a
# zero step instead of NaN.
_TINY = 1e-12


def make_logits_fn(
    model: nn.Module,
    variables: dict[str, Any],
    *,
    train: bool = False,
    rngs: dict[str, jax.Array] | None = None,
) -> LogitsFn:
  """Wraps a flax model as a function from pixels to float32 logits for attacks.

  Args:
    model: a module called as `model(images, train=...)`.
    variables: `{'params': ..., 'batch_stats': ...}`.
    train: run the model in training mode (dropout on, BatchNorm on batch
      statistics). The default eval mode is what attacks normally use. In
      training mode the updated BatchNorm statistics are computed and dropped,
      so an attack never changes `batch_stats`.
    rngs: rng streams for training mode, e.g. `{'dropout': key}`.

  Returns:
    `logits_fn(images) -> float32[batch, num_classes]`.
  """
  if not train:
    return lambda images: model.apply(variables, images, train=False).astype(jnp.float32)

  def logits_fn(images):
    logits, _ = model.apply(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
    return logits.astype(jnp.float32)

  return logits_fn


def _is_concrete(value: Any) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_attack_args(
    *, eps: Any, step_size: Any, norm: str, num_steps: int, restarts: int
) -> None:
  """Raises ValueError for an unknown norm or a negative or non-finite eps or step size."""
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; use one of: {', '.join(NORMS)}")
  for name, value in (("eps", eps), ("step_size", step_size)):
    if _is_concrete(value):
      number = float(value)
      if not np.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {number}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if restarts < 1:
    raise ValueError(f"restarts must be >= 1, got {restarts}")


def check_pixels(images: jax.Array) -> None:
  """Raises ValueError unless concrete `images` are floats in [0, 1].

  Values outside [0, 1] usually mean normalized images were passed; attacks
  expect raw pixels, and normalization belongs in the model.
  """
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"images must be float in [0, 1], got {images.dtype}; convert with "
        "images.astype(jnp.float32) / 255"
    )
  if not _is_concrete(images):
    return
  low, high = float(jnp.min(images)), float(jnp.max(images))
  if not (0.0 <= low and high <= 1.0):
    raise ValueError(
        f"images must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; attacks take raw "
        "pixels (eps is in pixel units), so pass images before normalization and let the "
        "model normalize"
    )


def _per_example_norm(x: jax.Array) -> jax.Array:
  """L2 norm of each example, shaped to broadcast against x: [batch, 1, 1, ...]."""
  norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))
  return norms


def project(delta: jax.Array, eps: float | jax.Array, norm: str) -> jax.Array:
  """Projects perturbations onto the eps-ball of `norm` around zero, per example."""
  if norm == "linf":
    return jnp.clip(delta, -eps, eps)
  scale = jnp.minimum(1.0, eps / (_per_example_norm(delta) + _TINY))
  return delta * scale


def clip_to_pixels(images: jax.Array, delta: jax.Array) -> jax.Array:
  """Shrinks `delta` so that `images + delta` stays in [0, 1]."""
  return jnp.clip(images + delta, 0.0, 1.0) - images


def random_start(
    key: jax.Array, shape: tuple[int, ...], eps: float | jax.Array, norm: str
) -> jax.Array:
  """Draws perturbations uniformly from the eps-ball of `norm`, one per example.

  L-inf: each coordinate uniform in [-eps, eps]. L2: a uniform direction
  (normalized Gaussian) times a radius eps * u^(1/d), which is uniform in the
  volume of the d-dimensional ball.
  """
  if norm == "linf":
    return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0) * eps
  direction_key, radius_key = jax.random.split(key)
  direction = jax.random.normal(direction_key, shape)
  direction = direction / (_per_example_norm(direction) + _TINY)
  dims = int(np.prod(shape[1:]))
  radius = jax.random.uniform(radius_key, (shape[0],) + (1,) * (len(shape) - 1)) ** (1.0 / dims)
  return direction * radius * eps


def _ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  if norm == "linf":
    return jnp.sign(grad)
  return grad / (_per_example_norm(grad) + _TINY)


def _attack_loss(logits: jax.Array, labels: jax.Array, targeted: bool) -> jax.Array:
  """Per-example loss the attack ascends: CE to the label, or minus CE to the target."""
  cross_entropy = losses.cross_entropy(logits, labels)
  return -cross_entropy if targeted else cross_entropy


def _success(logits: jax.Array, labels: jax.Array, targeted: bool) -> jax.Array:
  predictions = jnp.argmax(logits, axis=-1)
  return predictions == labels if targeted else predictions != labels


def pgd(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    eps: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    random_init: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    init_delta: jax.Array | None = None,
    loss_fn: AttackLossFn | None = None,
) -> jax.Array:
  """Projected gradient descent (Madry et al. 2018), L-inf or L2.

  Args:
    logits_fn: function from images to logits; see `make_logits_fn`.
    images: float[batch, height, width, channels] in [0, 1].
    labels: int[batch]: the true classes, or the target classes if `targeted`.
    key: PRNG key for the random start; needed when `random_init` is True.
    eps: radius of the perturbation ball, in pixel units.
    step_size: step length per iteration, in pixel units.
    num_steps: gradient steps per restart.
    norm: 'linf' or 'l2'.
    random_init: start from a uniform point of the eps-ball instead of the
      clean images.
    restarts: independent runs. Per example, the result kept is a successful
      one (misclassified, or classified as the target) if any run succeeds,
      and among equally successful runs the one with the highest attack loss.
    targeted: move towards `labels` instead of away from them.
    init_delta: an explicit starting perturbation for the first restart
      (projected and clipped like any iterate), e.g. to attack a batch and its
      examples one by one from the same start.
    loss_fn: a per-example loss to ascend instead of the cross-entropy, called
      as `loss_fn(logits, labels)`; `labels` may then be any pytree (e.g. the
      clean logits for TRADES). Restarts then keep the highest loss, and
      `targeted` must be False.

  Returns:
    Adversarial images, float32 like `images`, within eps of `images` in
    `norm` and in [0, 1].

  Raises:
    ValueError: on an unknown norm, a negative or non-finite eps or step size,
      images that are not floats in [0, 1], or a missing key.
  """
  check_attack_args(eps=eps, step_size=step_size, norm=norm, num_steps=num_steps, restarts=restarts)
  check_pixels(images)
  if random_init and key is None and (init_delta is None or restarts > 1):
    raise ValueError(
        "a random start needs a PRNG key; pass key=jax.random.key(...) or set random_init=False"
    )
  if loss_fn is not None and targeted:
    raise ValueError(
        "targeted=True applies to the cross-entropy loss; fold the target into loss_fn instead"
    )
  images = images.astype(jnp.float32)

  def per_example_loss(logits):
    if loss_fn is not None:
      return loss_fn(logits, labels)
    return _attack_loss(logits, labels, targeted)

  def succeeded(logits):
    if loss_fn is not None:
      return jnp.zeros(logits.shape[0], bool)
    return _success(logits, labels, targeted)

  def loss_and_logits(adversarial):
    logits = logits_fn(adversarial)
    return jnp.sum(per_example_loss(logits)), logits

  grad_fn = jax.grad(loss_and_logits, has_aux=True)

  def iterate(delta):
    delta = clip_to_pixels(images, project(delta, eps, norm))

    def step(_, delta):
      grad, _ = grad_fn(images + delta)
      delta = delta + step_size * _ascent_direction(grad, norm)
      return clip_to_pixels(images, project(delta, eps, norm))

    # NOTE: on 2 Intel Xeon CPU cores one attack step of ResNet-20 costs about 2.6
    # clean train steps, where one forward and backward pass should cost about 1
    # (BENCHMARKS.md, "Cost of an adversarial train step"). The cause is unknown.
    return jax.lax.fori_loop(0, num_steps, step, delta)

  def one_run(delta):
    delta = iterate(delta)
    logits = logits_fn(images + delta)
    return delta, per_example_loss(logits), succeeded(logits)

  def start(restart):
    if restart == 0 and init_delta is not None:
      return init_delta.astype(jnp.float32)
    if not random_init:
      return jnp.zeros_like(images)
    return random_start(jax.random.fold_in(key, restart), images.shape, eps, norm)

  if restarts == 1:
    # Nothing to compare, so skip the extra forward pass that scores a run.
    return images + iterate(start(0))
  best_delta, best_loss, best_success = one_run(start(0))
  for restart in range(1, restarts):
    delta, loss, success = one_run(start(restart))
    better = (success & ~best_success) | ((success == best_success) & (loss > best_loss))
    mask = better.reshape((-1,) + (1,) * (images.ndim - 1))
    best_delta = jnp.where(mask, delta, best_delta)
    best_loss = jnp.where(better, loss, best_loss)
    best_success = best_success | success
  return images + best_delta


def fgsm(
    logits_fn: LogitsFn,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array | None = None,
    *,
    eps: float,
    step_size: float | None = None,
    norm: str = "linf",
    random_init: bool = False,
    targeted: bool = False,
) -> jax.Array:
  """Fast gradient sign method (Goodfellow et al. 2015): one gradient step.

  With `random_init=True` and `step_size=1.25 * eps` this is the "FGSM with
  random start" of Wong, Rice and Kolter (2020, "Fast is better than free").

  Args:
    logits_fn: function from images to logits.
    images: float[batch, height, width, channels] in [0, 1].
    labels: int[batch] true (or, if `targeted`, target) classes.
    key: PRNG key, needed with `random_init`.
    eps: radius of the perturbation ball, in pixel units.
    step_size: step length; default `eps`.
    norm: 'linf' (the sign step) or 'l2' (the normalized-gradient step).
    random_init: start from a uniform point of the eps-ball.
    targeted: move towards `labels`.

  Returns:
    Adversarial images within eps of `images` and in [0, 1].
  """
  return pgd(
      logits_fn,
      images,
      labels,
      key,
      eps=eps,
      step_size=eps if step_size is None else step_size,
      num_steps=1,
      norm=norm,
      random_init=random_init,
      restarts=1,
      targeted=targeted,
  )
