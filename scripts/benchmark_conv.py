"""Time one convolution's forward pass and its two gradients, in jaxbase and optionally PyTorch.

  python scripts/benchmark_conv.py
  python scripts/benchmark_conv.py --shapes 32x32x16,16x16x32,8x8x64 --batch_size 128 --compare_torch

scripts/benchmark.py measures how fast a whole train step runs. This script
measures which part of a convolution takes the time. For each
HEIGHTxWIDTHxCHANNELS shape it times, on one device of the current backend, a
KxK SAME convolution with as many output channels as input channels (NHWC
activations, HWIO kernel):
- `fwd`: the convolution;
- `dgrad`: the gradient with respect to its input, given the output gradient;
- `wgrad`: the gradient with respect to its kernel, given the output gradient;
- `fwd+grads`: the forward pass and both gradients in one program.
The convolution is jaxbase's (`jaxbase.kernels.conv`): oneDNN on the CPU
backend by default, XLA's kernels with --conv_impl=xla. It also names what
each program was lowered to (a YNNPACK fusion, XLA's own convolution, or a
custom call such as jaxbase's oneDNN handlers) and counts the transposes XLA
added. With
--compare_torch, PyTorch times the same operations with channels-last tensors
(`torch.ops.aten.convolution_backward` for the gradients alone).
"""

import json
import os
import re
import statistics
import time

from absl import app, flags
import jax
import numpy as np

from jaxbase.kernels import conv as kernel_conv

_SHAPES = flags.DEFINE_list(
    "shapes", ["32x32x16", "16x16x32", "8x8x64"], "HEIGHTxWIDTHxCHANNELS shapes, comma-separated."
)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_KERNEL = flags.DEFINE_integer("kernel_size", 3, "Square kernel size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", False, "Also time PyTorch (needs torch).")
_CONV_IMPL = flags.DEFINE_enum(
    "conv_impl",
    "auto",
    list(kernel_conv.IMPLS),
    "Convolution kernels: auto (oneDNN on CPU when available), onednn or xla.",
)
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON to this file.")

OPS = ("fwd", "dgrad", "wgrad", "fwd+grads")
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def parse_shape(text: str) -> tuple[int, int, int]:
  """Parses HEIGHTxWIDTHxCHANNELS into three positive integers."""
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise app.UsageError(
        f"invalid --shapes entry {text!r}; expected HEIGHTxWIDTHxCHANNELS, e.g. 32x32x16"
    )
  height, width, channels = (int(p) for p in parts)
  return height, width, channels


def jax_ops(impl: str = "auto"):
  """Returns the four timed programs, each called as f(x, kernel, output gradient).

  `impl` picks the convolution kernels as in `jaxbase.kernels.conv`.
  """

  def _conv(x, kernel):
    return kernel_conv.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=_DIMENSIONS, impl=impl
    )

  def fwd(x, kernel, _):
    return _conv(x, kernel)

  def dgrad(x, kernel, grad):
    return jax.vjp(lambda x_: _conv(x_, kernel), x)[1](grad)[0]

  def wgrad(x, kernel, grad):
    return jax.vjp(lambda k_: _conv(x, k_), kernel)[1](grad)[0]

  def both(x, kernel, grad):
    out, vjp = jax.vjp(_conv, x, kernel)
    return out, vjp(grad)

  return dict(zip(OPS, (fwd, dgrad, wgrad, both)))


def lowering(compiled_text: str) -> dict:
  """Summarizes the convolution kernels and the transposes in compiled HLO text.

  Kernels are read from the entry computation only, because a YNNPACK fusion
  wraps a convolution in a computation of its own. Transposes are counted in
  every computation, because XLA fuses them into loop fusions.
  """
  entry = compiled_text[compiled_text.find("\nENTRY") :]
  kinds = []
  for line in entry.splitlines():
    if "ynn_fusion" in line and " fusion(" in line:
      kinds.append("ynn_fusion")
    elif re.search(r"= \S+ convolution\(", line):
      kinds.append("convolution")
    elif " custom-call(" in line:
      target = re.search(r'custom_call_target="([^"]+)"', line)
      kinds.append(f"custom-call {target.group(1) if target else '?'}")
  return {
      "kernels": kinds,
      "transposes": len(re.findall(r"= \S+ transpose\(", compiled_text)),
  }


def _median_seconds(call, steps, warmup):
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark_jax(shape, batch, kernel_size, steps, warmup):
  """Times the four programs for one shape on the first device."""
  height, width, channels = shape
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.standard_normal((batch, height, width, channels), np.float32))
  kernel = jax.device_put(
      rng.standard_normal((kernel_size, kernel_size, channels, channels), np.float32)
  )
  grad = jax.device_put(rng.standard_normal((batch, height, width, channels), np.float32))
  results = {}
  for name, fn in jax_ops(_CONV_IMPL.value).items():
    compiled = jax.jit(fn).lower(x, kernel, grad).compile()
    seconds = _median_seconds(
        lambda: jax.block_until_ready(compiled(x, kernel, grad)), steps, warmup
    )
    results[name] = {"median_ms": 1e3 * seconds, **lowering(compiled.as_text())}
  return results


def benchmark_torch(shape, batch, kernel_size, steps, warmup):
  """Times the same operations in PyTorch with channels-last tensors."""
  import torch  # Imported here: torch is an optional extra.

  torch.set_num_threads(os.cpu_count() or 1)
  height, width, channels = shape
  fmt = torch.channels_last
  x = torch.randn(batch, channels, height, width).to(memory_format=fmt)
  weight = torch.randn(channels, channels, kernel_size, kernel_size).to(memory_format=fmt)
  grad = torch.randn(batch, channels, height, width).to(memory_format=fmt)
  pad = [kernel_size // 2] * 2

  def backward(mask):
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], pad, [1, 1], False, [0, 0], 1, mask
    )

  def fwd():
    torch.nn.functional.conv2d(x, weight, padding=pad)

  def both():
    torch.nn.functional.conv2d(x, weight, padding=pad)
    backward([True, True, False])

  calls = {
      "fwd": fwd,
      "dgrad": lambda: backward([True, False, False]),
      "wgrad": lambda: backward([False, True, False]),
      "fwd+grads": both,
  }
  with torch.no_grad():
    return {
        name: {"median_ms": 1e3 * _median_seconds(call, steps, warmup)}
        for name, call in calls.items()
    }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  shapes = [parse_shape(s) for s in _SHAPES.value]
  for name, value in (("--batch_size", _BATCH.value), ("--steps", _STEPS.value)):
    if value < 1:
      raise app.UsageError(f"{name} must be at least 1, got {value}")
  if _KERNEL.value < 1 or _KERNEL.value % 2 == 0:
    raise app.UsageError(f"--kernel_size must be odd and positive, got {_KERNEL.value}")
  if _COMPARE_TORCH.value:
    try:
      import torch  # noqa: F401, PLC0415
    except ImportError as error:
      raise app.UsageError(
          f"--compare_torch needs PyTorch ({error}); install it with pip install -e '.[torch]'"
      ) from error

  print(
      f"{_KERNEL.value}x{_KERNEL.value} SAME convolution, batch {_BATCH.value}, float32, "
      f"1 {jax.default_backend()} device, {kernel_conv.resolve(_CONV_IMPL.value)} kernels, "
      f"median of {_STEPS.value} calls"
  )
  header = f"{'shape':<12}{'op':<11}{'jax ms':>9}"
  if _COMPARE_TORCH.value:
    header += f"{'torch ms':>10}{'jax/torch speed':>17}"
  print(header + "  XLA lowering")
  all_results = []
  for shape in shapes:
    args = (shape, _BATCH.value, _KERNEL.value, _STEPS.value, _WARMUP.value)
    result = {"shape": list(shape), "batch_size": _BATCH.value, "jax": benchmark_jax(*args)}
    if _COMPARE_TORCH.value:
      result["torch"] = benchmark_torch(*args)
    for op in OPS:
      ours = result["jax"][op]
      line = f"{'x'.join(map(str, shape)):<12}{op:<11}{ours['median_ms']:>9.2f}"
      if "torch" in result:
        theirs = result["torch"][op]["median_ms"]
        ours["speed_over_torch"] = theirs / ours["median_ms"]
        line += f"{theirs:>10.2f}{ours['speed_over_torch']:>17.2f}"
      kernels = ", ".join(sorted(set(ours["kernels"]))) or "-"
      count = ours["transposes"]
      print(f"{line}  {kernels}; {count} transpose{'' if count == 1 else 's'}")
    all_results.append(result)

  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(
          {
              "backend": jax.default_backend(),
              "jax_version": jax.__version__,
              "conv_kernels": kernel_conv.resolve(_CONV_IMPL.value),
              "kernel_size": _KERNEL.value,
              "steps": _STEPS.value,
              "results": all_results,
          },
          f,
          indent=2,
      )


if __name__ == "__main__":
  app.run(main)
