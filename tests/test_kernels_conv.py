"""The oneDNN convolutions equal XLA's, and every case they do not cover falls back to XLA."""

import logging
import os
import platform
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from jaxbase import hostdevices, models
from jaxbase.kernels import build
from jaxbase.kernels import conv

NHWC = ("NHWC", "HWIO", "NHWC")
_REASON = conv.unavailable_reason()
needs_onednn = pytest.mark.skipif(
    _REASON is not None, reason=f"oneDNN convolutions are unavailable here: {_REASON}"
)


def _inputs(shape=(4, 9, 9, 5), kernel=(3, 3, 5, 7), seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, shape), jax.random.normal(kw, kernel)


def _loss(impl, strides, padding):
  def loss(x, w):
    y = conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, impl=impl)
    return jnp.sum(jnp.sin(y))

  return loss


def _uses_ffi(fn, *args) -> bool:
  return "ffi_call" in str(jax.make_jaxpr(fn)(*args))


@needs_onednn
@pytest.mark.parametrize(
    "strides,padding",
    [
        ((1, 1), "SAME"),
        ((2, 2), "SAME"),
        ((1, 1), "VALID"),
        ((2, 1), ((0, 1), (2, 0))),
        ((4, 4), "VALID"),  # A ViT patch embedding.
    ],
)
def test_value_and_gradients_equal_xla(strides, padding):
  x, w = _inputs()
  got = jax.jit(jax.value_and_grad(_loss("onednn", strides, padding), (0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(_loss("xla", strides, padding), (0, 1)))(x, w)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)
  assert _uses_ffi(_loss("onednn", strides, padding), x, w)
  assert not _uses_ffi(_loss("xla", strides, padding), x, w)


@needs_onednn
@pytest.mark.parametrize("padding", ["SAME", ((2, 0), (1, 3))])
def test_non_square_input_and_kernel(padding):
  """Height and width differ in the input, the kernel and the strides, so no swap goes unseen."""
  x, w = _inputs(shape=(2, 7, 10, 3), kernel=(3, 5, 3, 4))
  loss_onednn = _loss("onednn", (2, 1), padding)
  got = jax.jit(jax.value_and_grad(loss_onednn, (0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(_loss("xla", (2, 1), padding), (0, 1)))(x, w)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)
  assert _uses_ffi(loss_onednn, x, w)


@needs_onednn
def test_mismatched_channels_raise_like_xla():
  x, _ = _inputs()
  w = jnp.ones((3, 3, 4, 7))  # 4 input channels for an input with 5.
  with pytest.raises(ValueError) as xla_error:
    lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  with pytest.raises(ValueError) as our_error:
    conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, impl="onednn")
  assert str(our_error.value) == str(xla_error.value)


def _numpy_conv(x, w, padding):
  """Stride-1 convolution of NHWC `x` with HWIO `w` by explicit sums, in float64."""
  x = np.pad(x.astype(np.float64), ((0, 0), *padding, (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i : i + oh, j : j + ow, :] @ w[i, j].astype(np.float64)
  return out


@needs_onednn
def test_input_gradient_with_wide_padding():
  """oneDNN matches central differences where XLA's float32 CPU input gradient is wrong.

  With jaxlib 0.10.2, `lax.conv_general_dilated` gives an input gradient 3.75
  away from oneDNN's on these inputs, while its float64 gradient agrees with
  central differences.
  """
  padding = ((4, 4), (5, 1))
  x, w = (np.asarray(a) for a in _inputs(shape=(2, 5, 5, 2), kernel=(3, 3, 2, 2)))
  grad = jax.grad(_loss("onednn", (1, 1), padding))(x, w)
  reference = np.zeros(x.shape)
  step = 1e-6
  for index in np.ndindex(x.shape):
    delta = np.zeros(x.shape)
    delta[index] = step
    plus = np.sum(np.sin(_numpy_conv(x + delta, w, padding)))
    minus = np.sum(np.sin(_numpy_conv(x - delta, w, padding)))
    reference[index] = (plus - minus) / (2 * step)
  np.testing.assert_allclose(grad, reference, atol=1e-4)


@needs_onednn
def test_one_by_one_kernel_is_a_matmul():
  x, w = _inputs(kernel=(1, 1, 5, 7))
  y = conv.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=NHWC, impl="onednn")
  np.testing.assert_allclose(y, jnp.einsum("nhwc,co->nhwo", x, w[0, 0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["bfloat16", "rhs_dilation", "lhs_dilation", "groups", "nchw", "conv1d", "negative_padding"],
)
def test_cases_outside_onednn_run_on_xla(case):
  x, w = _inputs(kernel=(3, 3, 5, 5))
  kwargs = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
  if case == "bfloat16":
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  elif case == "rhs_dilation":
    kwargs["rhs_dilation"] = (2, 2)
  elif case == "lhs_dilation":
    kwargs.update(lhs_dilation=(2, 2), padding=((1, 1), (1, 1)))
  elif case == "groups":
    w = w[:, :, :1, :]
    kwargs["feature_group_count"] = 5
  elif case == "nchw":
    x = jnp.transpose(x, (0, 3, 1, 2))
    kwargs["dimension_numbers"] = ("NCHW", "HWIO", "NCHW")
  elif case == "conv1d":
    x, w = x[:, 0], w[0]
    kwargs.update(window_strides=(1,), dimension_numbers=("NWC", "WIO", "NWC"))
  elif case == "negative_padding":
    kwargs["padding"] = ((-1, 0), (0, 0))

  def ours(x, w):
    return conv.conv_general_dilated(x, w, impl="onednn", **kwargs)

  assert not _uses_ffi(ours, x, w)
  np.testing.assert_array_equal(ours(x, w), lax.conv_general_dilated(x, w, **kwargs))


@needs_onednn
@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_gradient_of_replicated_kernel_equals_xla(check_vma):
  """With check_vma=True the kernel gradient is summed over devices, as XLA's is."""
  x, w = _inputs(shape=(8, 6, 6, 5))
  mesh = Mesh(jax.devices()[:8], ("data",))

  def sharded_grad(impl):
    def per_device(x, w):
      return jax.grad(lambda w: _loss(impl, (1, 1), "SAME")(x, w))(w)

    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P("data"), P()),
            out_specs=P() if check_vma else P("data"),
            check_vma=check_vma,
        )
    )(x, w)

  chex.assert_trees_all_close(sharded_grad("onednn"), sharded_grad("xla"), rtol=2e-5, atol=2e-5)


@needs_onednn
def test_vmap_equals_the_batched_call():
  x, w = _inputs(shape=(6, 7, 7, 5))

  def batched(x):
    return jax.vmap(
        lambda x: conv.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=NHWC, impl="onednn"
        )
    )(x)

  assert _uses_ffi(batched, x.reshape(2, 3, 7, 7, 5))
  per_group = batched(x.reshape(2, 3, 7, 7, 5))
  whole = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  np.testing.assert_allclose(per_group.reshape(whole.shape), whole, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("name", ["resnet20", "cnn_small", "fastnet_s"])
def test_model_gradients_equal_xla(name):
  """A whole model's loss and gradients agree between the two kernels."""
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  if name == "cnn_small":
    images = images[..., :1]
  labels = jnp.arange(4) % 10

  def value_and_grad(impl):
    config = ml_collections.ConfigDict({"name": name, "conv_impl": impl})
    if name == "cnn_small":
      config.update(mean=(0.5,), std=(0.25,))
    model = models.build_model(config, 10, axis_name=None)
    variables = model.init(jax.random.key(0), images, train=False)

    def loss(params):
      logits, _ = model.apply(
          {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
      )
      return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  chex.assert_trees_all_close(value_and_grad("onednn"), value_and_grad("xla"), rtol=1e-4, atol=1e-5)


def test_unavailable_library_falls_back_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(conv, "_load", lambda: "no C++ compiler found")
  conv._warn_fallback.cache_clear()
  x, w = _inputs()
  with caplog.at_level(logging.WARNING):
    y = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  assert "no C++ compiler found" in caplog.text
  np.testing.assert_array_equal(
      y, lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  )
  assert conv.resolve("auto") == "xla"
  with pytest.raises(build.KernelUnavailableError, match="no C.. compiler found.*'xla'"):
    conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, impl="onednn")


def test_bad_implementation_names_are_rejected(monkeypatch):
  x, w = _inputs()
  with pytest.raises(ValueError, match="'fast'.*auto, onednn, xla"):
    conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, impl="fast")
  monkeypatch.setenv("JAXBASE_CPU_CONV", "mkl")
  with pytest.raises(ValueError, match="JAXBASE_CPU_CONV='mkl'"):
    conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  with pytest.raises(ValueError, match="model.conv_impl 'gpu'"):
    models.build_model(ml_collections.ConfigDict({"name": "resnet20", "conv_impl": "gpu"}), 10)


def test_environment_variable_selects_xla(monkeypatch):
  monkeypatch.setenv("JAXBASE_CPU_CONV", "xla")
  x, w = _inputs()
  assert conv.resolve("auto") == "xla"
  assert not _uses_ffi(_loss("auto", (1, 1), "SAME"), x, w)


@needs_onednn
def test_build_failures_name_the_compiler(monkeypatch, tmp_path):
  monkeypatch.setenv("JAXBASE_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(build.KernelUnavailableError, match="no-such-compiler"):
    build.build()
  monkeypatch.setenv("CXX", "false")  # A compiler that always fails.
  with pytest.raises(build.KernelUnavailableError, match="failed .exit 1.:\n.no compiler output"):
    build.build()
  assert not list(tmp_path.rglob(build.LIBRARY_NAME)), "a failed build left a library behind"


@needs_onednn
def test_cached_library_loads_without_a_compiler(monkeypatch):
  built = build.build()
  monkeypatch.setenv("CXX", "/no/such/compiler")
  assert build.build() == built


_MMAPPED_BLOCKS = """
import ctypes, sys
from jaxbase import hostdevices
applied = hostdevices.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in
              ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
               "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
print(applied, libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's malloc")
@pytest.mark.parametrize("mode,env,expected", [
    ("keep", {}, "True 0"),  # The 64 MB block comes from the heap.
    ("keep", {"JAXBASE_MALLOC": "default"}, "False 1"),  # It is mmapped, as usual.
    ("off", {}, "False 1"),
])  # fmt: skip
def test_keep_freed_memory_uses_the_heap(mode, env, expected):
  completed = subprocess.run(
      [sys.executable, "-c", _MMAPPED_BLOCKS, mode],
      env={**os.environ, **env},
      capture_output=True,
      text=True,
      check=True,
  )
  assert completed.stdout.split() == expected.split()
