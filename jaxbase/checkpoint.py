"""Checkpoints of the whole training state with orbax-checkpoint.

A work directory contains the directories of two orbax managers:

- `checkpoints/` keeps the latest `keep` checkpoints, written every
  `every_steps` steps, at the end, and on SIGTERM/SIGINT;
- `checkpoints_best/` keeps the one with the highest eval accuracy.

Each checkpoint has two items: `state` (the TrainState pytree: params,
batch_stats, opt_state, step, RNG key) and `meta` (JSON: the run config, model
and data set names, parameter shapes, the data position, and a checksum of
every state leaf). orbax writes each checkpoint to a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous
checkpoints readable, and orbax deletes the temporary directory on the next
start. A checkpoint whose files were damaged later is caught on restore:
tensorstore fails on truncated or undecodable files, and the checksums catch
changed bytes that still decode.
"""

import datetime
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
# Damaged checkpoints are moved here, out of orbax's sight, rather than deleted.
DAMAGED_DIR = "checkpoints_damaged"


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model or data of the current run."""


class DamagedCheckpointError(CheckpointMismatchError):
  """A checkpoint whose files are missing, truncated, or differ from what was saved.

  Attributes:
    reason: what is wrong with the checkpoint, without the advice on earlier
      checkpoints that the full message adds.
  """

  def __init__(self, reason: str, hint: str = ""):
    super().__init__(f"{reason} {hint}".strip())
    self.reason = reason


def _words(leaf: jax.Array) -> jax.Array:
  """Reinterprets the bytes of an array as a flat uint32 vector (zero-extending narrower types)."""
  leaf = jnp.asarray(leaf)
  width = leaf.dtype.itemsize
  if leaf.dtype == jnp.bool_:
    return leaf.astype(jnp.uint32).ravel()
  if width == 8:
    return jax.lax.bitcast_convert_type(leaf, jnp.uint32).ravel()
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _fletcher(tree: Any) -> Any:
  """Sums each leaf's words, plain and weighted by position (as Fletcher's checksum does), mod 2**32."""

  def checksum(leaf):
    words = _words(leaf)
    positions = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words), jnp.sum(words * positions)])

  return jax.tree.map(checksum, tree)


def state_checksums(state: Any) -> dict[str, list[int]]:
  """Maps each state leaf's path to two uint32 checksums of its bytes.

  The sums run on the device in one jitted call, so a save costs one pass over
  the state and no host copy. Any single changed word changes both sums. Two
  changes cancel out only by arithmetic coincidence, which is rare. This is a
  check against damaged files, not against deliberate tampering.
  """
  sums = jax.device_get(_fletcher(state))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  return {
      "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): [
          int(v) for v in value
      ]
      for path, value in flat
  }


def param_shapes(params: Any) -> dict[str, list[int]]:
  """Maps each parameter path ('stage1/block0/conv1/kernel') to its shape."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {
      "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): list(np.shape(leaf))
      for path, leaf in flat
  }


def describe_mismatch(
    saved: dict[str, list[int]], current: dict[str, list[int]], limit: int = 10
) -> str:
  """Lists parameters missing on either side or with different shapes, at most `limit` of each."""
  lines = []
  only_saved = sorted(set(saved) - set(current))
  only_current = sorted(set(current) - set(saved))
  reshaped = sorted(k for k in set(saved) & set(current) if list(saved[k]) != list(current[k]))
  for title, names, show in (
      ("in the checkpoint only", only_saved, lambda k: f"{k} {saved[k]}"),
      ("in the new model only", only_current, lambda k: f"{k} {current[k]}"),
      (
          "with different shapes (checkpoint vs model)",
          reshaped,
          lambda k: f"{k} {saved[k]} vs {current[k]}",
      ),
  ):
    if names:
      more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
      lines.append(f"  {len(names)} {title}{more}: " + ", ".join(show(k) for k in names[:limit]))
  return "\n".join(lines)


# Config keys that may change between a run and its resume: they affect logging,
# checkpointing, evaluation batching, device layout or where files are read, but
# not the trajectory of the training state.
RESUMABLE_KEYS = frozenset(
    {
        "log_every_steps",
        "eval_every_epochs",
        # A run stopped by a non-finite step may resume with on_nonfinite='skip':
        # up to that step both modes train alike.
        "on_nonfinite",
        "max_consecutive_skips",
        "eval_batch_size",
        "parallel",
        "checkpoint.keep",
        "checkpoint.every_steps",
        "checkpoint.every_epochs",
        "data.path",
        "data.data_dir",
        "data.cache_dir",
        "data.default_file",
        # Read only when a fine-tuning run starts, so a moved pretraining
        # directory does not block resuming.
        "init.checkpoint",
    }
)


# Config keys added after some checkpoints were written. A saved config without
# such a key was trained with this value, so it compares as if it held it.
ADDED_KEY_DEFAULTS = {
    "optim.accumulation_steps": 1,
    "data.length_multiple": 0,
    "data.sort_window": 0,
}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
  """Lists the keys outside RESUMABLE_KEYS whose values differ, as 'key: saved -> current'.

  A key that the saved config lacks, because the run was saved by a version
  of jaxbase without it, matches when the current value is its value in
  `defaults`: the new option is off, as it was then.
  """
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  defaults_flat = _flatten(defaults or {})
  lines = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if key in RESUMABLE_KEYS:
      continue
    if key not in saved_flat:
      saved_flat[key] = defaults_flat.get(key, ADDED_KEY_DEFAULTS.get(key, "<missing>"))
    old, new = saved_flat[key], current_flat.get(key, "<missing>")
    if old != new:
      lines.append(f"{key}: {old!r} in the checkpoint, {new!r} now")
  return lines


class Checkpointer:
  """Saves and restores TrainStates in a work directory.

  Args:
    workdir: the run's work directory.
    keep: how many of the latest checkpoints to keep.
    every_steps: save period in steps for `maybe_save`; 0 saves only when
      forced (at the end and on a signal).
  """

  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 0):
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    if every_steps < 0:
      raise ValueError(f"checkpoint.every_steps must be >= 0, got {every_steps}")
    self.workdir = os.path.abspath(workdir)
    self.every_steps = every_steps
    self._latest = ocp.CheckpointManager(
        os.path.join(self.workdir, LATEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True
        ),
        item_names=("state", "meta"),
    )
    self._best = ocp.CheckpointManager(
        os.path.join(self.workdir, BEST_DIR),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1,
            best_fn=lambda metrics: metrics["eval_accuracy"],
            best_mode="max",
            cleanup_tmp_directories=True,
            create=True,
        ),
        item_names=("state", "meta"),
    )

  def latest_step(self) -> int | None:
    """Returns the step of the newest complete checkpoint, or None."""
    return self._latest.latest_step()

  def all_steps(self) -> list[int]:
    """Returns the steps of every complete checkpoint in `checkpoints/`, in ascending order."""
    return sorted(self._latest.all_steps())

  def best_step(self) -> int | None:
    """Returns the step of the checkpoint with the highest eval accuracy, or None."""
    return self._best.best_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Saves `state` at `step` when `step` is a multiple of the period (or `force`); returns whether it saved."""
    due = force or (self.every_steps > 0 and step % self.every_steps == 0)
    if not due or step in self._latest.all_steps():
      return False
    meta = {**meta, "checksums": state_checksums(state)}
    self._latest.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    return True

  def save_best(self, step: int, state: Any, meta: dict[str, Any], eval_accuracy: float) -> None:
    """Offers `state` to the best-by-accuracy slot; orbax keeps it only if it is the best so far."""
    if step in self._best.all_steps():
      return
    meta = {**meta, "checksums": state_checksums(state)}
    self._best.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics={"eval_accuracy": float(eval_accuracy)},
        force=True,
    )

  def _manager(self, which: str) -> ocp.CheckpointManager:
    if which not in ("latest", "best"):
      raise ValueError(f"unknown checkpoint {which!r}; use 'latest' or 'best'")
    return self._latest if which == "latest" else self._best

  def _resolve_step(self, step: int | None, which: str) -> tuple[ocp.CheckpointManager, int]:
    """Returns the manager of `which` and `step`, defaulting to its newest or best step."""
    manager = self._manager(which)
    if step is None:
      step = manager.latest_step() if which == "latest" else manager.best_step()
    if step is None:
      raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
    return manager, step

  def restore_meta(self, step: int | None = None, which: str = "latest") -> dict[str, Any]:
    """Reads the JSON metadata of a checkpoint without touching the arrays.

    Raises:
      FileNotFoundError: when there is no checkpoint.
      DamagedCheckpointError: when the metadata is missing or not valid JSON.
    """
    manager, step = self._resolve_step(step, which)
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except (ValueError, OSError, KeyError) as error:  # json.JSONDecodeError is a ValueError.
      raise DamagedCheckpointError(
          f"failed to read the metadata of the checkpoint of step {step} in "
          f"{manager.directory}; its files are damaged or incomplete ({_short_message(error)})."
      ) from error
    if not isinstance(meta, dict):
      raise DamagedCheckpointError(
          f"the metadata of the checkpoint of step {step} in {manager.directory} is a "
          f"{type(meta).__name__}, not a JSON object; its files are damaged."
      )
    return meta

  def restore(
      self, template: Any, step: int | None = None, which: str = "latest"
  ) -> tuple[Any, dict[str, Any]]:
    """Restores a state shaped and placed like `template`, after checking it fits.

    Args:
      template: a TrainState (or abstract one) with the current run's shapes,
        dtypes and shardings.
      step: which step to restore; default the newest (or the best).
      which: 'latest' or 'best'.

    Returns:
      `(state, meta)`.

    Raises:
      FileNotFoundError: when there is no checkpoint.
      CheckpointMismatchError: when the checkpoint's parameters differ from the
        template's; the message lists them.
      DamagedCheckpointError: when the files are unreadable, or the arrays read
        back differ from the checksums saved with them.
    """
    manager, step = self._resolve_step(step, which)
    meta = self.restore_meta(step, which)

    saved_shapes = meta.get("param_shapes", {})
    current_shapes = param_shapes(template.params)
    mismatch = describe_mismatch(saved_shapes, current_shapes)
    if mismatch:
      saved_model = meta.get("config", {}).get("model", {}).get("name", "?")
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {manager.directory} was written by model "
          f"{saved_model!r} and does not match the model of this run:\n{mismatch}\n"
          "Use a new --workdir for the new model, or restore the config it was trained with "
          f"(see {os.path.join(self.workdir, 'config.json')}). The checkpoint was left as it is."
      )

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
        template,
    )
    try:
      restored = manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
      )["state"]
    # NOTE: orbax raises a bare Exception for unreadable array chunks, and
    # ValueError, OSError or KeyError for other damage, so this catches broadly.
    # Shape and model mismatches were ruled out above.
    except Exception as error:  # pylint: disable=broad-exception-caught
      raise DamagedCheckpointError(
          f"failed to read the checkpoint of step {step} in {manager.directory}; its files "
          f"are damaged or incomplete ({_short_message(error)}).",
          self._fallback_hint(manager, step),
      ) from error
    self._verify(restored, meta, step, manager)
    logging.info("Restored the %s checkpoint of step %d from %s", which, step, manager.directory)
    return restored, meta

  def _fallback_hint(self, manager: ocp.CheckpointManager, step: int) -> str:
    earlier = [s for s in manager.all_steps() if s < step]
    if not earlier:
      return "There is no earlier checkpoint to fall back to."
    return (
        f"Earlier checkpoints: steps {', '.join(map(str, sorted(earlier)))}; move "
        f"{os.path.join(manager.directory, str(step))} out of {manager.directory} to resume "
        f"from step {max(earlier)}."
    )

  def _verify(self, state: Any, meta: dict[str, Any], step: int, manager) -> None:
    """Raises DamagedCheckpointError unless the restored state matches the saved checksums."""
    saved = meta.get("checksums")
    if saved is None:
      logging.warning(
          "The checkpoint of step %d in %s has no checksums (written by an older jaxbase), "
          "so its arrays were not verified.",
          step,
          manager.directory,
      )
      return
    restored = state_checksums(state)
    changed = sorted(
        path for path in set(saved) | set(restored) if saved.get(path) != restored.get(path)
    )
    if changed:
      more = f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""
      raise DamagedCheckpointError(
          f"the checkpoint of step {step} in {manager.directory} was read, but {len(changed)} "
          f"arrays differ from what was saved: {', '.join(changed[:5])}{more}; its files are "
          "damaged.",
          self._fallback_hint(manager, step),
      )
    saved_step = getattr(state, "step", None)
    if saved_step is not None and int(jax.device_get(saved_step)) != step:
      raise DamagedCheckpointError(
          f"the checkpoint in {os.path.join(manager.directory, str(step))} contains the state "
          f"of step {int(jax.device_get(saved_step))}; the directory was renamed or its files "
          "were mixed up.",
          self._fallback_hint(manager, step),
      )

  def set_aside(self, step: int, which: str = "latest") -> str:
    """Moves a damaged checkpoint out of the manager's directory, into DAMAGED_DIR; returns where.

    NOTE: every process renames the directory. On a shared file system in a
    multi-host run, only process 0 should, after a barrier.
    """
    manager = self._manager(which)
    source = os.path.join(manager.directory, str(step))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = os.path.join(
        self.workdir, DAMAGED_DIR, f"{os.path.basename(manager.directory)}-{step}-{stamp}"
    )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    manager.reload()
    return target

  def restore_latest_usable(
      self, template: Any, check_meta: Callable[[dict[str, Any]], None] | None = None
  ) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest checkpoint that reads back intact, setting damaged ones aside.

    Each damaged checkpoint is reported with a warning and moved into
    DAMAGED_DIR (never deleted), then the previous one is tried.

    Args:
      template: as for `restore`.
      check_meta: called with each candidate's metadata before its arrays are
        read; it raises to reject the run (e.g. on a config change), and that
        error propagates.

    Returns:
      `(state, meta, step)`, or None when there is no checkpoint at all.

    Raises:
      DamagedCheckpointError: when checkpoints exist but every one is damaged.
      CheckpointMismatchError: when a checkpoint does not fit the template.
    """
    damaged = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
        if check_meta is not None:
          check_meta(meta)
        state, meta = self.restore(template, step)
        return state, meta, step
      except DamagedCheckpointError as error:
        target = self.set_aside(step)
        damaged.append(step)
        logging.warning(
            "Skipping a damaged checkpoint: %s Moved it to %s; trying the previous checkpoint.",
            error.reason,
            target,
        )
    if damaged:
      raise DamagedCheckpointError(
          f"every checkpoint in {self._latest.directory} is damaged (steps "
          f"{', '.join(map(str, damaged))}); they were moved to "
          f"{os.path.join(self.workdir, DAMAGED_DIR)}. Running again starts from step 0."
      )
    return None

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and for orbax's clean-up of unfinished saves, then closes."""
    for manager in (self._latest, self._best):
      # orbax 0.12 starts removing unfinished temporary directories in a thread when a
      # manager is made, and its close() does not wait for that thread. A process that
      # exits right after close() then prints the thread's traceback at shutdown.
      await_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
      if await_cleanup is not None:
        await_cleanup()
      manager.close()


def _short_message(error: Exception, limit: int = 300) -> str:
  """Returns the start of an error message; tensorstore appends kilobytes of JSON spec to its own."""
  text = str(error).strip()
  text = text.split(" [tensorstore_spec")[0].split("See full TensorStore details")[0]
  lines = text.splitlines()
  text = lines[0] if lines else ""
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(error).__name__}: {text}"
