"""Checkpoints of the whole training state with orbax-checkpoint.

A work directory contains the directories of two orbax managers:

- `checkpoints/` keeps the latest `keep` checkpoints, written every
  `every_steps` steps, at the end, and on SIGTERM/SIGINT;
- `checkpoints_best/` keeps the one with the highest eval accuracy.

Each checkpoint has two items: `state` (the TrainState pytree: params,
batch_stats, opt_state, step, RNG key) and `meta` (JSON: the run config, model
and data set names, parameter shapes and the data position). orbax writes to a
temporary directory and renames it when complete, so a crash mid-save leaves
the previous checkpoints readable.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model or data of the current run."""


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


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Lists the keys outside RESUMABLE_KEYS whose values differ, as 'key: saved -> current'."""
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  lines = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if key in RESUMABLE_KEYS:
      continue
    old, new = saved_flat.get(key, "<missing>"), current_flat.get(key, "<missing>")
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

  def best_step(self) -> int | None:
    """Returns the step of the checkpoint with the highest eval accuracy, or None."""
    return self._best.best_step()

  def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Saves `state` at `step` when `step` is a multiple of the period (or `force`); returns whether it saved."""
    due = force or (self.every_steps > 0 and step % self.every_steps == 0)
    if not due or step in self._latest.all_steps():
      return False
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
    """Reads the JSON metadata of a checkpoint without touching the arrays."""
    manager, step = self._resolve_step(step, which)
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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
      )
    except (ValueError, OSError) as error:
      # tensorstore reports missing or truncated array files as ValueError.
      earlier = [s for s in manager.all_steps() if s < step]
      fallback = (
          f"Earlier checkpoints: steps {', '.join(map(str, earlier))}; move "
          f"{os.path.join(manager.directory, str(step))} out of {manager.directory} to resume "
          f"from step {max(earlier)}."
          if earlier
          else "There is no earlier checkpoint to fall back to."
      )
      raise CheckpointMismatchError(
          f"failed to read the checkpoint of step {step} in {manager.directory}; its files "
          f"are damaged or incomplete ({error}). {fallback}"
      ) from error
    logging.info("Restored the %s checkpoint of step %d from %s", which, step, manager.directory)
    return restored["state"], meta

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()
