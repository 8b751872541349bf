"""The machine and package versions a measurement ran with, and JAX's compilation cache."""

import datetime
import importlib.metadata
import os
import platform

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def cpu_name() -> str:
  """Returns the CPU model from /proc/cpuinfo, or what `platform` reports elsewhere."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def describe() -> str:
  """Describes this machine's CPU, Python and package versions, and today's date, in one line.

  It reads the machine it runs on, so call it where the measurement ran. It
  names the CPU only, because every recorded number so far ran on the CPU
  backend; a GPU or TPU run should state its accelerator next to it.
  """
  packages = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in PACKAGES)
  return (
      f"{os.cpu_count()} x {cpu_name()} (CPU), Python {platform.python_version()}, {packages}; "
      f"{datetime.date.today().isoformat()}"
  )


def enable_compilation_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache, so repeated runs of one program compile once.

  Runs that differ only in seed or data compile to the same program, so a
  study's later seeds load it from disk. The default folder is
  `$JAXBASE_CACHE_DIR/xla` or `~/.cache/jaxbase/xla`.

  Returns:
    The cache folder.
  """
  import jax  # noqa: PLC0415

  if path is None:
    root = os.environ.get("JAXBASE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxbase"
    )
    path = os.path.join(root, "xla")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program: the small ones of a study compile in under a second
  # each, but there are many of them.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
