"""Tests for jaxbase.checkpoint: checksums, damage detection and the fallback to older checkpoints."""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbase import checkpoint as checkpoint_lib
from jaxbase.train.state import TrainState


def _state(step: int) -> TrainState:
  params = {
      "dense": {"kernel": jnp.arange(600.0).reshape(20, 30) / (step + 1), "bias": jnp.ones(30)}
  }
  return TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      batch_stats={"mean": jnp.full((4,), float(step))},
      opt_state=optax.sgd(0.1, momentum=0.9).init(params),
      key=jax.random.PRNGKey(0),
  )


def _meta(state):
  return {"param_shapes": checkpoint_lib.param_shapes(state.params), "config": {}}


@pytest.fixture
def saved(tmp_path):
  """A work directory with checkpoints of steps 1, 2 and 3."""
  workdir = str(tmp_path / "run")
  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=5)
  for step in (1, 2, 3):
    checkpointer.save(step, _state(step), _meta(_state(step)), force=True)
  checkpointer.close()
  return workdir


def _step_dir(workdir, step):
  return os.path.join(workdir, checkpoint_lib.LATEST_DIR, str(step))


def _array_files(workdir, step):
  """The data files that hold the arrays (orbax's metadata files start with '_' or are JSON)."""
  pattern = os.path.join(_step_dir(workdir, step), "state", "**", "d", "*")
  return [path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path)]


def _flip_bytes(workdir, step):
  # Flip one byte in the middle of every array file. The files stay decodable
  # in part, so only the checksums catch some of these changes.
  for path in _array_files(workdir, step):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x55
    open(path, "wb").write(bytes(data))


def _flip_largest_file(workdir, step):
  # The largest file contains the array values; a flipped byte there still decodes.
  path = max(_array_files(workdir, step), key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x55
  open(path, "wb").write(bytes(data))


def _truncate_arrays(workdir, step):
  for path in _array_files(workdir, step):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _truncate_meta(workdir, step):
  path = os.path.join(_step_dir(workdir, step), "meta", "metadata")
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])


def _remove_state(workdir, step):
  shutil.rmtree(os.path.join(_step_dir(workdir, step), "state"))


def test_checksums_change_with_any_word():
  state = _state(1)
  before = checkpoint_lib.state_checksums(state)
  kernel = state.params["dense"]["kernel"]
  changed = state.replace(
      params={
          "dense": {
              **state.params["dense"],
              "kernel": kernel.at[7, 3].set(jnp.nextafter(kernel[7, 3], jnp.inf)),
          }
      }
  )
  after = checkpoint_lib.state_checksums(changed)
  differing = [path for path in before if before[path] != after[path]]
  assert differing == ["params/dense/kernel"]
  # Swapping two values keeps the plain sum but not the position-weighted one.
  swapped = state.replace(params={"dense": {**state.params["dense"], "kernel": kernel[::-1]}})
  swapped_sums = checkpoint_lib.state_checksums(swapped)["params/dense/kernel"]
  assert swapped_sums[0] == before["params/dense/kernel"][0]
  assert swapped_sums[1] != before["params/dense/kernel"][1]


def test_restore_intact_checkpoint_verifies(saved):
  checkpointer = checkpoint_lib.Checkpointer(saved)
  state, meta = checkpointer.restore(_state(0), 3)
  checkpointer.close()
  assert int(state.step) == 3
  assert set(meta["checksums"]) == set(checkpoint_lib.state_checksums(_state(3)))
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_flip_bytes, "damaged or incomplete"),
        (_flip_largest_file, "arrays differ from what was saved"),
        (_truncate_arrays, "damaged or incomplete"),
        (_truncate_meta, "failed to read the metadata of the checkpoint of step 3"),
        (_remove_state, "damaged or incomplete"),
    ],
)
def test_damaged_latest_falls_back_with_warning(saved, caplog, damage, message):
  damage(saved, 3)
  checkpointer = checkpoint_lib.Checkpointer(saved, keep=5)
  with caplog.at_level(logging.WARNING):
    state, meta, step = checkpointer.restore_latest_usable(_state(0))
  assert step == 2
  assert int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, state, _state(2))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("Skipping a damaged checkpoint" in w and message in w for w in warnings), warnings
  # The damaged checkpoint is kept for inspection, out of the manager's sight.
  assert checkpointer.latest_step() == 2
  moved = os.listdir(os.path.join(saved, checkpoint_lib.DAMAGED_DIR))
  assert len(moved) == 1
  assert moved[0].startswith("checkpoints-3-")
  # Step 3 can be saved again, so a resumed run writes its own checkpoint there.
  assert checkpointer.save(3, _state(3), _meta(_state(3)), force=True)
  checkpointer.close()


def test_every_checkpoint_damaged_raises(saved):
  for step in (1, 2, 3):
    _truncate_meta(saved, step)
  checkpointer = checkpoint_lib.Checkpointer(saved, keep=5)
  with pytest.raises(checkpoint_lib.DamagedCheckpointError, match=r"steps 3, 2, 1"):
    checkpointer.restore_latest_usable(_state(0))
  checkpointer.close()


def test_restore_of_renamed_checkpoint_rejected(saved):
  os.rename(_step_dir(saved, 3), _step_dir(saved, 4))
  checkpointer = checkpoint_lib.Checkpointer(saved, keep=5)
  with pytest.raises(checkpoint_lib.DamagedCheckpointError, match="contains the state of step 3"):
    checkpointer.restore(_state(0), 4)
  checkpointer.close()


def test_no_checkpoint_returns_none(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
  assert checkpointer.restore_latest_usable(_state(0)) is None
  checkpointer.close()
