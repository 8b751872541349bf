"""Prepare the host for CPU training: cores as XLA devices, malloc that keeps memory; before jax."""

import ctypes
import os
import platform

MAX_CPU_DEVICES = 8
# NOTE: on a 2-core machine with two runs side by side, each split into 2 CPU
# devices, one run stopped in an all-reduce twice: once XLA aborted it after its
# 40 s collective timeout ("Termination timeout ... exceeded"), and once, with
# that timeout raised, it hung with its process idle. The cause is not known.
# Run one training per machine, or set
# XLA_FLAGS=--xla_force_host_platform_device_count=1 for the extra ones.


def use_cpu_cores_as_devices() -> int | None:
  """Splits the host CPU into several XLA devices unless XLA_FLAGS already sets a count.

  On a CPU backend, one XLA device leaves cores idle during a step. Data
  parallelism over several host devices measured 1.35x the single-device
  throughput for ResNet-20 at batch 128 on 2 cores (235 against 174 img/s).
  NOTE: that was with XLA's own convolutions. With the oneDNN convolutions
  (`jaxbase.kernels.conv`), which use every core of one device, a single
  device ran ResNet-20 and ResNet-56 2-10% faster than two in short runs
  (BENCHMARKS.md, "Fused BatchNorm on 2 AMD EPYC cores"). This default may change.
  The count is the largest power of two not above the core count, at most
  MAX_CPU_DEVICES, so common batch sizes divide evenly. The flag affects only
  the CPU platform, so GPU and TPU runs are unchanged. Set
  `--xla_force_host_platform_device_count` in XLA_FLAGS to choose another count.
  It must run before jax is imported; later calls have no effect on a live backend.

  Returns:
    The count it set, or None when XLA_FLAGS already had one.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return None
  cores = os.cpu_count() or 1
  count = min(MAX_CPU_DEVICES, 1 << (cores.bit_length() - 1))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  return count


# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory in the process instead of returning it.

  XLA's CPU runtime allocates each step's temporary buffer (tens of MB for a
  ResNet-20 step) and frees it at the end. glibc serves blocks that large with
  mmap and returns them with munmap, so every step faults its pages in again.
  The threads of several CPU devices also get arenas of their own. With one
  arena, no mmap-served blocks and no trimming, the next step reuses the same
  pages: the ResNet-20 step at batch 128 on 2 devices with oneDNN
  convolutions went from about 550 to about 750 images per second on 2 cores
  (BENCHMARKS.md, "Memory allocator"). The cost is that the process keeps its
  peak heap size until it exits, which suits a training run.

  It changes glibc's settings only, so it does nothing under another C
  library or when JAXBASE_MALLOC=default is set. Call it before jax is
  imported, because threads that already have an arena keep it.

  Returns:
    True when the settings were applied.
  """
  if os.environ.get("JAXBASE_MALLOC", "") == "default":
    return False
  if platform.system() != "Linux":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # Only glibc has it.
  except (OSError, AttributeError):
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
