"""Multi-process start-up: `jax.distributed.initialize` from flags or environment variables.

A run spans several processes (one per host, or several on one machine) when
each process calls `initialize` before any other JAX call. After that,
`jax.devices()` lists the devices of every process, the training mesh spans
them all, and each process feeds its own rows of every global batch.

Three modes, chosen by `resolve`:

- off (the default): one process, no coordinator.
- explicit: a coordinator address (`host:port`, where process 0 listens), the
  number of processes and this process's id, from the arguments or from
  JAXBASE_COORDINATOR_ADDRESS, JAXBASE_NUM_PROCESSES and JAXBASE_PROCESS_ID.
- auto (`auto=True` or JAXBASE_DISTRIBUTED=auto): plain
  `jax.distributed.initialize()`, which reads the cluster's own settings on
  Cloud TPU VMs, SLURM, Open MPI and the other environments JAX detects.

JAXBASE_INIT_TIMEOUT (or `timeout_seconds`) bounds the wait for the other
processes, 300 s by default.
"""

import dataclasses
import os
import socket
import time
from collections.abc import Mapping

import jax
from absl import logging

ENV_COORDINATOR_ADDRESS = "JAXBASE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXBASE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXBASE_PROCESS_ID"
ENV_INIT_TIMEOUT = "JAXBASE_INIT_TIMEOUT"
ENV_DISTRIBUTED = "JAXBASE_DISTRIBUTED"
DEFAULT_TIMEOUT_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class Settings:
  """Settings for joining a multi-process run.

  Attributes:
    mode: 'off', 'explicit' or 'auto'.
    coordinator_address: 'host:port' of process 0 (explicit mode only).
    num_processes: processes in the run (explicit mode only).
    process_id: this process's index in [0, num_processes) (explicit mode only).
    timeout_seconds: how long to wait for the coordinator and the other processes.
  """

  mode: str = "off"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS


def _parse_int(value: str | int | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
        f"invalid coordinator address {address!r}; expected host:port, e.g. 10.0.0.2:8476"
    )
  return host.strip("[]"), int(port)


def resolve(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_seconds: int | None = None,
    auto: bool = False,
    environ: Mapping[str, str] = os.environ,
) -> Settings:
  """Combines arguments and environment variables into checked `Settings`; arguments win.

  Raises:
    ValueError: on an incomplete or inconsistent explicit setup (an address
      without a process count or id, an id out of range, a malformed address)
      or a timeout that is not positive.
  """
  coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR_ADDRESS) or None
  if num_processes is None:
    num_processes = _parse_int(environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _parse_int(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  if timeout_seconds is None:
    timeout_seconds = _parse_int(environ.get(ENV_INIT_TIMEOUT), ENV_INIT_TIMEOUT)
  timeout_seconds = DEFAULT_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds
  if timeout_seconds <= 0:
    raise ValueError(f"the initialization timeout must be positive, got {timeout_seconds} s")
  auto = auto or environ.get(ENV_DISTRIBUTED, "").lower() == "auto"

  if coordinator_address is None:
    if num_processes is not None or process_id is not None:
      raise ValueError(
          "a process count or process id was given without a coordinator address; set "
          f"--coordinator_address (or {ENV_COORDINATOR_ADDRESS}) to host:port of process 0"
      )
    return Settings(mode="auto" if auto else "off", timeout_seconds=timeout_seconds)

  _split_address(coordinator_address)
  if num_processes is None or process_id is None:
    raise ValueError(
        f"coordinator address {coordinator_address} needs the process count and this "
        f"process's id: set --num_processes and --process_id (or {ENV_NUM_PROCESSES} "
        f"and {ENV_PROCESS_ID})"
    )
  if num_processes < 1:
    raise ValueError(f"the process count must be at least 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ValueError(
        f"process id {process_id} is out of range for {num_processes} processes; "
        f"use 0 to {num_processes - 1}"
    )
  return Settings(
      mode="explicit",
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      timeout_seconds=timeout_seconds,
  )


def wait_for_coordinator(address: str, timeout_seconds: float) -> None:
  """Retries a TCP connection to `address` until it succeeds or the timeout passes.

  Raises:
    TimeoutError: naming the address, when nothing accepts connections there in time.
  """
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, timeout_seconds)):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        raise TimeoutError(
            f"timed out after {timeout_seconds:g} s waiting for the coordinator at {address} "
            f"({error}); start process 0 with the same address, check the host and port, "
            "or raise the timeout"
        ) from None
    time.sleep(0.5)


def check_port_free(address: str) -> None:
  """Raises OSError naming `address` when another program already listens on its port.

  Process 0 runs the coordinator on that port, and JAX aborts the process
  without a Python exception when it cannot bind it.
  """
  _, port = _split_address(address)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    # Like the coordinator's server, accept a port whose old connections are in TIME_WAIT.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(("", port))
    except OSError as error:
      raise OSError(
          error.errno,
          f"process 0 cannot run the coordinator at {address}: port {port} is in use "
          f"({error.strerror}); choose a free port for --coordinator_address",
      ) from None


def initialize(settings: Settings) -> None:
  """Joins the multi-process run that `settings` describes; does nothing in mode 'off'.

  Call it before any other JAX call. In explicit mode, process 0 first checks
  that the coordinator's port is free, and the other processes wait until it
  accepts connections, so a wrong address fails with a message naming it.

  NOTE: JAX aborts the process, without a Python exception, when the
  coordinator is reachable but the other processes do not all join within the
  timeout (seen with jax 0.10.2). Its log then reports DEADLINE_EXCEEDED.

  Raises:
    TimeoutError: when the coordinator cannot be reached in time.
    OSError: when process 0 finds the coordinator's port in use.
    RuntimeError: when auto mode finds no cluster environment.
  """
  if settings.mode == "off":
    return
  if settings.mode == "auto":
    logging.info("Initializing jax.distributed from the cluster environment")
    try:
      jax.distributed.initialize(initialization_timeout=settings.timeout_seconds)
    except ValueError as error:
      raise RuntimeError(
          f"jax.distributed found no cluster environment ({error}); pass "
          "--coordinator_address, --num_processes and --process_id instead"
      ) from error
  else:
    start = time.monotonic()
    if settings.process_id == 0:
      check_port_free(settings.coordinator_address)
    else:
      wait_for_coordinator(settings.coordinator_address, settings.timeout_seconds)
    remaining = max(1, int(settings.timeout_seconds - (time.monotonic() - start)))
    logging.info(
        "Process %d of %d joining the coordinator at %s (timeout %d s)",
        settings.process_id,
        settings.num_processes,
        settings.coordinator_address,
        remaining,
    )
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=remaining,
    )
  logging.info(
      "Process %d of %d: %d local and %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def check_devices(expected_device_count: int | None = None) -> None:
  """Checks, before training, that the devices found fit a data-parallel run.

  Every process must hold the same number of devices, because each one feeds
  an equal share of the global batch to its own devices.

  Args:
    expected_device_count: the global device count the run was configured
      for, or None (or 0) to accept any count.

  Raises:
    ValueError: naming the counts found and the expected ones.
  """
  local, total, processes = jax.local_device_count(), jax.device_count(), jax.process_count()
  if local * processes != total:
    raise ValueError(
        f"process {jax.process_index()} has {local} devices, but the {processes} processes "
        f"have {total} devices together; give every process the same number of devices "
        "(on CPU: the same --xla_force_host_platform_device_count in XLA_FLAGS)"
    )
  if expected_device_count and total != expected_device_count:
    raise ValueError(
        f"found {total} devices ({processes} process(es) with {local} each), but the run "
        f"expects {expected_device_count}; check the process count and the devices per host"
    )
