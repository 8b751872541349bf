"""Detection of non-finite losses and gradients, on the device and on the host.

The train step computes `nonfinite_flags(loss, grads)` inside the jitted step
and drops the update of any step where a flag is set, so a NaN or inf never
reaches the params, BatchNorm statistics or optimizer state. The flags travel
to the host with the other metrics. The loop fetches metrics at log steps and
before every evaluation and checkpoint, and `NonFiniteMonitor` checks them
there, so detection adds no device sync. The cost is that in 'raise' mode the
run stops only at that fetch, and the steps it trained after the bad step are
discarded with it.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

MODES = ("raise", "skip")
# Metric key of the flags vector: bool[1 + number of gradient leaves].
FLAGS_KEY = "nonfinite"


class NonFiniteError(FloatingPointError):
  """A training step produced a NaN or inf loss or gradient."""


def nonfinite_flags(loss: jax.Array, grads: Any) -> jax.Array:
  """Returns bool[1 + leaves]: entry 0 for the loss, then one per gradient leaf, True if non-finite."""
  leaves = [loss, *jax.tree.leaves(grads)]
  return jnp.stack([jnp.logical_not(jnp.all(jnp.isfinite(leaf))) for leaf in leaves])


def flag_names(params: Any) -> list[str]:
  """Names the entries of `nonfinite_flags`: 'loss', then 'gradient of PATH' per parameter."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ["loss"]
  for path, _ in flat:
    parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    names.append("gradient of " + "/".join(parts))
  return names


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(
        f"on_nonfinite must be one of {', '.join(MODES)}, got {mode!r}; 'raise' stops the run "
        "at the first step with a NaN or inf loss or gradient, 'skip' drops that step's update"
    )
  return mode


class NonFiniteMonitor:
  """Checks fetched step metrics for non-finite flags, and raises or counts them.

  Args:
    mode: 'raise' or 'skip'.
    names: `flag_names(params)`, to name the first non-finite value.
    steps_per_epoch: to report the epoch and batch of a bad step.
    max_consecutive_skips: in 'skip' mode, raise after this many skipped
      steps in a row, because the run has then diverged.
    skipped_steps: skipped steps counted before a resume.
  """

  def __init__(
      self,
      mode: str,
      names: list[str],
      steps_per_epoch: int,
      *,
      max_consecutive_skips: int = 10,
      skipped_steps: int = 0,
  ):
    self.mode = check_mode(mode)
    self.names = names
    self.steps_per_epoch = steps_per_epoch
    self.max_consecutive_skips = max_consecutive_skips
    self.skipped_steps = skipped_steps
    self._consecutive = 0

  def _describe(self, step: int, flags: np.ndarray) -> str:
    bad = np.flatnonzero(flags)
    epoch, batch = divmod(step - 1, self.steps_per_epoch)
    first = self.names[bad[0]] if bad[0] < len(self.names) else f"value {bad[0]}"
    others = f" (and {len(bad) - 1} other non-finite values)" if len(bad) > 1 else ""
    return (
        f"step {step} (epoch {epoch + 1}, batch {batch + 1} of {self.steps_per_epoch}) "
        f"produced a non-finite {first}{others}"
    )

  def check(self, fetched: list[dict[str, Any]], first_step: int) -> list[dict[str, Any]]:
    """Checks the metrics of steps `first_step, first_step + 1, ...` (counted from 1).

    Args:
      fetched: host metrics of consecutive steps, each with a FLAGS_KEY entry.
      first_step: the number of the step whose metrics are `fetched[0]`.

    Returns:
      The metrics of the finite steps, without FLAGS_KEY, for averaging.

    Raises:
      NonFiniteError: in 'raise' mode at the first non-finite step, naming it;
        in 'skip' mode after `max_consecutive_skips` skipped steps in a row.
    """
    finite = []
    for offset, metrics in enumerate(fetched):
      step = first_step + offset
      flags = np.asarray(metrics[FLAGS_KEY])
      if not flags.any():
        self._consecutive = 0
        finite.append({k: v for k, v in metrics.items() if k != FLAGS_KEY})
        continue

      description = self._describe(step, flags)
      if self.mode == "raise":
        raise NonFiniteError(
            f"{description}; its update was not applied and no later state was saved. Check "
            "the data of that batch, rerun the same command with --config.on_nonfinite=skip "
            "to resume and skip such steps, or start a new --workdir with a lower optim.lr or "
            "with optim.clip_norm set (a resumed run keeps the config of its checkpoint)."
        )
      self.skipped_steps += 1
      self._consecutive += 1
      # Log the first few in full, then every 100th, so a noisy run does not flood the log.
      if self.skipped_steps <= 10 or self.skipped_steps % 100 == 0:
        logging.warning("Skipped %s; %d step(s) skipped so far.", description, self.skipped_steps)
      if self._consecutive >= self.max_consecutive_skips:
        raise NonFiniteError(
            f"{self._consecutive} steps in a row up to step {step} produced non-finite values "
            f"(the last: {description}), so the run has diverged. Start a new --workdir with "
            "a lower optim.lr or with optim.clip_norm set: a resumed run keeps the config of "
            "its checkpoint."
        )
    return finite
