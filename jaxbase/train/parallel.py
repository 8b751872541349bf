"""The data-parallel launcher: runs per-replica steps over all devices.

Two launchers run the same per-replica function and give the same numbers:
`jax.shard_map` over a one-axis `Mesh` named `'data'` (the default; it spans
hosts), and `jax.pmap` with `axis_name='data'`. The state is replicated and the
global batch is split along its first axis, one equal slice per device.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbase.train.steps import AXIS

MODES = ("shard_map", "pmap")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a one-axis mesh named 'data' over `devices` (default: all global devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (AXIS,))


class DataParallel:
  """Places state and batches on the devices and compiles per-replica steps.

  Attributes:
    mode: 'shard_map' or 'pmap'.
    mesh: the device mesh (also used to count devices in pmap mode).
    num_devices: devices over all processes.
  """

  def __init__(self, mode: str = "shard_map", devices: Sequence[jax.Device] | None = None):
    if mode not in MODES:
      raise ValueError(f"unknown parallel mode {mode!r}; known modes: {', '.join(MODES)}")
    self.mode = mode
    self.mesh = make_mesh(devices)
    self.num_devices = self.mesh.size
    self.local_devices = [
        d for d in self.mesh.devices.flat if d.process_index == jax.process_index()
    ]
    if mode == "pmap" and devices is not None and len(devices) != jax.device_count():
      raise ValueError("pmap mode runs on all devices; pass devices=None")
    self._replicated = NamedSharding(self.mesh, P())
    self._batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def check_batch_size(self, global_batch_size: int, name: str = "batch_size") -> int:
    """Returns the per-device batch size, or raises if the devices can't share the batch evenly."""
    if global_batch_size % self.num_devices:
      raise ValueError(
          f"{name}={global_batch_size} is not divisible by the {self.num_devices} devices; "
          f"use a multiple of {self.num_devices}, e.g. "
          f"{max(1, round(global_batch_size / self.num_devices)) * self.num_devices}"
      )
    return global_batch_size // self.num_devices

  # Placement.

  def replicate(self, tree: Any) -> Any:
    """Puts a host or single-device pytree on every device."""
    if self.mode == "pmap":
      count = len(self.local_devices)
      stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * count), tree)
      # An identity pmap places slice i on local device i, as pmap's inputs are laid out.
      return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)
    return jax.device_put(tree, self._replicated)

  def unreplicate(self, tree: Any) -> Any:
    """Returns one copy of a replicated pytree (the launcher's own output)."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: x[0], tree)
    return tree

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Turns this process's slice of the global batch into device arrays split over 'data'."""
    if self.mode == "pmap":
      n = len(self.local_devices)

      def split(x):
        if x.shape[0] % n:
          raise ValueError(f"local batch of {x.shape[0]} is not divisible by the {n} local devices")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

      return jax.tree.map(split, local_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._batch_sharding, x), local_batch
    )

  # Compilation.

  def compile_train_step(self, train_step: Callable) -> Callable:
    """Compiles `train_step(state, batch) -> (state, metrics)`; the input state is donated."""
    if self.mode == "pmap":
      step = jax.pmap(train_step, axis_name=AXIS, donate_argnums=0)
      return lambda state, batch: _first_metrics(step(state, batch))
    # check_vma=False keeps the gradient of replicated params per-replica, as under
    # pmap, so the step's own pmean is the only reduction. With check_vma=True, JAX
    # sums the cotangent of a replicated input over 'data' itself, and the step's
    # pmean would then see N times the mean gradient.
    mapped = jax.shard_map(
        train_step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(mapped, donate_argnums=0)

  def compile_eval_step(self, eval_step: Callable, num_shared_args: int = 0) -> Callable:
    """Compiles `eval_step(state, batch, *shared) -> sums`; sums are totals over all devices.

    Args:
      eval_step: the per-replica function.
      num_shared_args: trailing arguments passed unsplit to every replica (a
        PRNG key, an eps), traced so that new values do not recompile.
    """
    if self.mode == "pmap":
      step = jax.pmap(eval_step, axis_name=AXIS, in_axes=(0, 0) + (None,) * num_shared_args)
      return lambda *args: jax.tree.map(lambda x: x[0], step(*args))
    mapped = jax.shard_map(
        eval_step,
        mesh=self.mesh,
        in_specs=(P(), P(AXIS)) + (P(),) * num_shared_args,
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(mapped)


def _first_metrics(outputs):
  state, metrics = outputs
  return state, jax.tree.map(lambda x: x[0], metrics)
