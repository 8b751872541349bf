"""Compile the oneDNN convolution handlers once per machine and cache the library.

The handlers in onednn_conv.cc are compiled on first use with the system C++
compiler against two things pip installed: oneDNN's headers and library (the
`onednn-cpu-gomp` and `onednn-devel-cpu-gomp` wheels, a dependency of jaxbase
on x86-64 Linux) and jaxlib's FFI headers. The shared library goes to
`$JAXBASE_CACHE_DIR/kernels/<hash>/` (default `~/.cache/jaxbase/kernels`),
where the hash covers the source, the oneDNN and jaxlib header and library
paths and their versions, so an upgrade builds a fresh copy.

`python -m jaxbase.kernels.build` builds it ahead of time and prints its path,
or the reason it cannot be built.
"""

import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
LIBRARY_NAME = "libjaxbase_onednn_conv.so"
ONEDNN_RUNTIME = "onednn-cpu-gomp"
ONEDNN_HEADERS = "onednn-devel-cpu-gomp"


class KernelUnavailableError(RuntimeError):
  """The oneDNN convolution library cannot be built or loaded on this machine."""


def _distribution_file(distribution: str, suffix: str) -> pathlib.Path:
  """Returns the installed file of `distribution` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.files(distribution) or []
  except importlib.metadata.PackageNotFoundError:
    raise KernelUnavailableError(
        f"the {distribution} package is not installed; pip install {distribution}"
    ) from None
  for file in files:
    if ("/" + str(file).replace(os.sep, "/")).endswith(suffix):
      return pathlib.Path(file.locate()).resolve()
  raise KernelUnavailableError(f"{distribution} has no file ending in {suffix}")


def unavailable_platform() -> str | None:
  """Returns why this platform cannot build the library, or None on x86-64 Linux."""
  if sys.platform != "linux" or platform.machine() != "x86_64":
    return (
        f"the oneDNN convolutions are built for x86-64 Linux only, not "
        f"{sys.platform}/{platform.machine()}"
    )
  return None


def onednn_paths() -> tuple[pathlib.Path, pathlib.Path]:
  """Returns (include folder, library folder) of the pip-installed oneDNN."""
  header = _distribution_file(ONEDNN_HEADERS, "/oneapi/dnnl/dnnl.hpp")
  library = _distribution_file(ONEDNN_RUNTIME, "/libdnnl.so.3")
  return header.parents[2], library.parent


def _compile_command(output: pathlib.Path) -> list[str]:
  """Returns the compiler command that builds the handlers into `output`."""
  import jax  # noqa: PLC0415  (only needed to build or find the library)

  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise KernelUnavailableError("no C++ compiler found; install g++ or set CXX")
  if shutil.which(compiler) is None:
    raise KernelUnavailableError(f"the C++ compiler {compiler!r} (CXX) was not found")
  include, library = onednn_paths()
  return [
      compiler,
      "-O2",
      "-std=c++17",
      "-fPIC",
      "-shared",
      f"-I{include}",
      f"-I{jax.ffi.include_dir()}",
      str(SOURCE),
      "-o",
      str(output),
      f"-L{library}",
      "-ldnnl",
      # libgomp.so.1 is the OpenMP runtime the oneDNN wheel uses, so that
      # omp_set_num_threads acts on oneDNN's thread teams with any compiler.
      "-lgomp",
      f"-Wl,-rpath,{library}",
  ]


def cache_dir() -> pathlib.Path:
  root = os.environ.get("JAXBASE_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxbase"
  )
  return pathlib.Path(root) / "kernels"


def _build_key() -> str:
  """Hashes what the compiled library depends on: the source and the libraries it links.

  The compiler is not part of it, so a machine without one can still load a
  library built earlier, e.g. by `python -m jaxbase.kernels.build`.
  """
  import jax  # noqa: PLC0415  (only needed to build or find the library)

  digest = hashlib.sha256(SOURCE.read_bytes())
  include, library = onednn_paths()
  for part in (str(include), str(library), jax.ffi.include_dir()):
    digest.update(part.encode())
  for distribution in ("jaxlib", ONEDNN_RUNTIME, ONEDNN_HEADERS):
    digest.update(importlib.metadata.version(distribution).encode())
  return digest.hexdigest()[:16]


def build() -> pathlib.Path:
  """Returns the path of the compiled library, compiling it if it is not cached yet.

  Raises:
    KernelUnavailableError: on a platform other than x86-64 Linux, without a
      C++ compiler or the oneDNN wheels, or when compilation fails (the
      message contains the compiler's output).
  """
  reason = unavailable_platform()
  if reason is not None:
    raise KernelUnavailableError(reason)
  target = cache_dir() / _build_key() / LIBRARY_NAME
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name and rename, so that concurrent builds (two
  # processes of one run) never load a half-written file.
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    partial = pathlib.Path(scratch) / LIBRARY_NAME
    result = subprocess.run(_compile_command(partial), capture_output=True, text=True, check=False)
    if result.returncode != 0:
      output = (result.stdout + result.stderr)[-4000:] or "(no compiler output)"
      raise KernelUnavailableError(
          f"compiling {SOURCE.name} failed (exit {result.returncode}):\n{output}"
      )
    os.replace(partial, target)
  return target


if __name__ == "__main__":
  try:
    print(build())
  except (KernelUnavailableError, OSError) as error:
    sys.exit(f"the oneDNN convolutions are unavailable: {error}")
