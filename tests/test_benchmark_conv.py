"""scripts/benchmark_conv.py times the programs it names and reads XLA's lowering correctly."""

import importlib.util
import pathlib

from absl import app
import numpy as np
import pytest

from jaxbase.kernels import conv as kernel_conv

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmark_conv.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_conv", _PATH)
benchmark_conv = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(benchmark_conv)


def _direct(x, kernel, grad):
  """Forward pass and both gradients of a SAME, stride-1 convolution, by explicit sums."""
  size = kernel.shape[0]
  half = size // 2
  padded = np.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
  height, width = x.shape[1:3]
  out = np.zeros(grad.shape)
  wgrad = np.zeros(kernel.shape)
  dgrad_padded = np.zeros(padded.shape)
  for i in range(size):
    for j in range(size):
      window = padded[:, i : i + height, j : j + width, :]
      out += window @ kernel[i, j]
      wgrad[i, j] = np.einsum("nhwc,nhwo->co", window, grad)
      dgrad_padded[:, i : i + height, j : j + width, :] += grad @ kernel[i, j].T
  dgrad = dgrad_padded[:, half : half + height, half : half + width, :]
  return out, dgrad, wgrad


@pytest.mark.parametrize("impl", ["xla", "onednn"])
def test_programs_match_explicit_sums(impl):
  if impl == "onednn" and kernel_conv.unavailable_reason() is not None:
    pytest.skip(f"oneDNN convolutions are unavailable here: {kernel_conv.unavailable_reason()}")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  grad = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
  out, dgrad, wgrad = _direct(x.astype(np.float64), kernel.astype(np.float64), grad)
  ops = benchmark_conv.jax_ops(impl)
  tolerance = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ops["fwd"](x, kernel, grad), out, **tolerance)
  np.testing.assert_allclose(ops["dgrad"](x, kernel, grad), dgrad, **tolerance)
  np.testing.assert_allclose(ops["wgrad"](x, kernel, grad), wgrad, **tolerance)
  both_out, (both_dgrad, both_wgrad) = ops["fwd+grads"](x, kernel, grad)
  np.testing.assert_allclose(both_out, out, **tolerance)
  np.testing.assert_allclose(both_dgrad, dgrad, **tolerance)
  np.testing.assert_allclose(both_wgrad, wgrad, **tolerance)


def test_lowering_kernels_and_transposes():
  text = """
%fused_computation (p: f32[4,3]) -> f32[3,4] {
  %p = f32[4,3]{1,0} parameter(0)
  %transpose.1 = f32[3,4]{0,1} transpose(%p), dimensions={1,0}
  ROOT %copy.1 = f32[3,4]{1,0} copy(%transpose.1)
}

%ynn_body (a: f32[1,4,4,3], b: f32[3,3,3,3]) -> f32[1,4,4,3] {
  ROOT %conv.0 = f32[1,4,4,3]{3,2,1,0} convolution(%a, %b), window={size=3x3}
}

ENTRY %main (x: f32[1,4,4,3], k: f32[3,3,3,3]) -> f32[1,4,4,3] {
  %t = f32[3,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation
  %ynn_fusion = f32[1,4,4,3]{3,2,1,0} fusion(%x, %k), kind=kCustom, calls=%ynn_body
  %convolution = f32[1,4,4,3]{3,2,1,0} convolution(%x, %k), window={size=3x3}
  ROOT %c = f32[1,4,4,3]{3,2,1,0} custom-call(%x), custom_call_target="__onednn$convolution"
}
"""
  assert benchmark_conv.lowering(text) == {
      "kernels": ["ynn_fusion", "convolution", "custom-call __onednn$convolution"],
      "transposes": 1,
  }


def test_parse_shape_valid_and_invalid():
  assert benchmark_conv.parse_shape("32x16X8") == (32, 16, 8)
  for bad in ("32x32", "32x0x16", "axbxc"):
    with pytest.raises(app.UsageError, match=f"invalid --shapes entry '{bad}'"):
      benchmark_conv.parse_shape(bad)
