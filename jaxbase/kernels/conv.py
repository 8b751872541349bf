"""2D convolutions that run on oneDNN on the CPU backend and on XLA elsewhere.

`conv_general_dilated` takes the arguments of `lax.conv_general_dilated`, so a
Flax module passes it as `nn.Conv(..., conv_general_dilated=...)`. On the CPU
backend, a float32 NHWC/HWIO convolution without dilation or groups runs as
three oneDNN primitives (forward, backward-data, backward-weights) called
through the XLA FFI and tied together by `jax.custom_vjp`. Everything else (a
GPU or TPU backend, bfloat16, dilation, groups, other layouts) calls
`lax.conv_general_dilated` unchanged.

Why: XLA's CPU convolutions, above all the weight gradient, ran at 0.08-0.56x
the speed of PyTorch's oneDNN kernels on the same shapes (BENCHMARKS.md,
"Single convolutions: where the gap is"), and no XLA option routes them to
oneDNN.

The implementation is chosen per call by `impl`: "auto" (oneDNN when the
library is available, XLA otherwise, with one warning saying why), "onednn"
(raise when the library is unavailable) or "xla". The choice happens at trace
time. A module attribute or function argument that carries `impl` is part of
what `jax.jit` caches, but the JAXBASE_CPU_CONV environment variable is not, so
changing it does not retrace a function that was already traced.

With jaxlib 0.10.2, XLA's float32 CPU input gradient is wrong where the
padding is wider than the kernel (a 5x5 input, a 3x3 kernel and padding
((4, 4), (5, 1)) gave errors up to 1.2 against central differences). The
oneDNN path matches them (tests/test_kernels_conv.py).

Limits of the oneDNN path: no forward-mode differentiation (`jax.jvp`) and no
second derivatives, because the backward pass is itself an FFI call without a
derivative. `vmap` runs the calls one batch element at a time.
"""

import ctypes
import functools
import os
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxbase.kernels import build

IMPLS = ("auto", "onednn", "xla")
_NHWC_HWIO = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)
_TARGETS = {
    "jaxbase_onednn_conv_fwd": "OnednnConvForward",
    "jaxbase_onednn_conv_bwd_data": "OnednnConvBackwardData",
    "jaxbase_onednn_conv_bwd_weights": "OnednnConvBackwardWeights",
}


@functools.cache
def _load() -> str | None:
  """Builds, loads and registers the handlers once; returns why not, or None on success."""
  try:
    library = ctypes.CDLL(str(build.build()))
  except (build.KernelUnavailableError, OSError) as error:
    return str(error)
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return None


def unavailable_reason() -> str | None:
  """Returns why the oneDNN convolutions cannot run here, or None when they can."""
  return _load()


@functools.cache
def _warn_fallback(reason: str) -> None:
  logging.warning(
      "oneDNN convolutions are unavailable, so CPU convolutions use XLA's slower kernels: %s",
      reason,
  )


def _omp_threads() -> int:
  """OpenMP team size per call: the cores shared among the local CPU devices.

  XLA runs each CPU device's step on its own thread, and every such thread
  gets its own oneDNN thread team. Without a limit, N devices would start N
  teams of all cores each. With one device it returns 0, which keeps OpenMP's
  default.
  """
  devices = jax.local_device_count("cpu")
  if devices <= 1:
    return 0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, (cores or 1) // devices)


def _attrs(strides, padding, threads):
  (top, bottom), (left, right) = padding
  return dict(
      stride_h=np.int64(strides[0]),
      stride_w=np.int64(strides[1]),
      pad_top=np.int64(top),
      pad_bottom=np.int64(bottom),
      pad_left=np.int64(left),
      pad_right=np.int64(right),
      omp_threads=np.int64(threads),
  )


def _call(target, result_shape, *operands, strides, padding, threads):
  # Inside shard_map with check_vma=True, the result varies over the mesh axes
  # its operands vary over (conv_general_dilated made those axes the same).
  operand_type = jax.typeof(operands[0])
  if operand_type.mat.varying:
    result = operand_type.update(shape=result_shape, dtype=jnp.float32, weak_type=False)
  else:
    result = jax.ShapeDtypeStruct(result_shape, jnp.float32)
  return jax.ffi.ffi_call(target, result, vmap_method="sequential")(
      *operands, **_attrs(strides, padding, threads)
  )


def _forward(x, w, strides, padding, threads):
  n, h, width, _ = x.shape
  kh, kw, _, out = w.shape
  oh = (h + padding[0][0] + padding[0][1] - kh) // strides[0] + 1
  ow = (width + padding[1][0] + padding[1][1] - kw) // strides[1] + 1
  return _call(
      "jaxbase_onednn_conv_fwd",
      (n, oh, ow, out),
      x,
      w,
      strides=strides,
      padding=padding,
      threads=threads,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def onednn_conv(x, w, strides, padding, threads=0):
  """Convolves float32 NHWC `x` with HWIO `w` on oneDNN.

  Args:
    x: float32[n, h, w, c] input.
    w: float32[kh, kw, c, o] kernel.
    strides: (stride_h, stride_w).
    padding: ((top, bottom), (left, right)), non-negative.
    threads: OpenMP threads per call; 0 keeps OpenMP's default.

  Returns:
    float32[n, oh, ow, o].
  """
  return _forward(x, w, strides, padding, threads)


def _onednn_conv_fwd(x, w, strides, padding, threads):
  return _forward(x, w, strides, padding, threads), (x, w)


def _onednn_conv_bwd(strides, padding, threads, residuals, dy):
  x, w = residuals
  kwargs = dict(strides=strides, padding=padding, threads=threads)
  dx = _call("jaxbase_onednn_conv_bwd_data", x.shape, dy, w, **kwargs)
  dw = _call("jaxbase_onednn_conv_bwd_weights", w.shape, x, dy, **kwargs)
  return dx, dw


onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def _onednn_arguments(
    lhs,
    rhs,
    window_strides,
    padding,
    *,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    preferred_element_type,
    precision,
):
  """Returns (strides, explicit padding) when oneDNN handles this call, else None."""
  if lhs.ndim != 4 or rhs.ndim != 4:
    return None
  # Invalid strides go to XLA, which names them in its error.
  if len(window_strides) != 2 or any(int(s) < 1 for s in window_strides):
    return None

  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return None
  del precision  # oneDNN computes float32 convolutions in full float32.
  if preferred_element_type not in (None, jnp.float32):
    return None
  if feature_group_count != 1 or batch_group_count != 1:
    return None
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return None
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC_HWIO:
    return None

  # Mismatched channels, empty arrays and windows larger than the padded input
  # go to XLA, which raises its own error or returns the empty result.
  if rhs.shape[2] != lhs.shape[3] or 0 in lhs.shape or 0 in rhs.shape:
    return None

  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in padding for p in pair):
    return None
  for size, (lo, hi), window in zip(lhs.shape[1:3], padding, rhs.shape[:2]):
    if size + lo + hi < window:
      return None
  return tuple(int(s) for s in window_strides), padding


def default_impl() -> str:
  """Returns the implementation that "auto" means: JAXBASE_CPU_CONV, or "auto" when unset."""
  impl = os.environ.get("JAXBASE_CPU_CONV") or "auto"
  if impl not in IMPLS:
    raise ValueError(f"JAXBASE_CPU_CONV={impl!r} is not one of {', '.join(IMPLS)}")
  return impl


def _check_impl(impl: str) -> str:
  """Returns `impl` with "auto" replaced by `default_impl()`; raises on an unknown name."""
  if impl not in IMPLS:
    raise ValueError(f"unknown convolution implementation {impl!r}; use one of {', '.join(IMPLS)}")
  return default_impl() if impl == "auto" else impl


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    impl: str = "auto",
):
  """`lax.conv_general_dilated`, run on oneDNN where `impl` and the arguments allow.

  Args:
    impl: "auto" (oneDNN on the CPU backend when available, else XLA),
      "onednn" (as auto, but raise when oneDNN is unavailable) or "xla".
      "auto" defers to the JAXBASE_CPU_CONV environment variable when set.
    Other arguments: as `lax.conv_general_dilated`.
  """
  impl = _check_impl(impl)
  options = dict(
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
  )
  # Arguments are inspected only where oneDNN could run, so that XLA raises its
  # own errors elsewhere, and the library is loaded only for calls it can take.
  if impl != "xla" and jax.default_backend() == "cpu":
    arguments = _onednn_arguments(lhs, rhs, window_strides, padding, **options)
    if arguments is not None and resolve(impl) == "onednn":
      strides, explicit_padding = arguments
      lhs, rhs = vary_alike(lhs, rhs)
      return onednn_conv(lhs, rhs, strides, explicit_padding, _omp_threads())
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)


def vary_alike(*operands):
  """Casts the operands to vary over the union of their varying mesh axes.

  Inside `jax.shard_map` with check_vma=True, an FFI call needs operands of
  one varying type. Casting outside the custom_vjp lets JAX's own transpose of
  the cast sum the kernel gradient over the axes it was broadcast along.
  """
  varying = frozenset().union(*(jax.typeof(op).mat.varying for op in operands))
  if not varying:
    return operands
  return tuple(
      lax.pcast(op, tuple(sorted(varying - jax.typeof(op).mat.varying)), to="varying")
      for op in operands
  )


def resolve(impl: str = "auto", dtype: Any = jnp.float32) -> str:
  """Returns the kernels an NHWC convolution of `dtype` gets with `impl` here: 'onednn' or 'xla'.

  With "auto", an unavailable library logs one warning and gives 'xla'.

  Raises:
    ValueError: on an unknown `impl`.
    KernelUnavailableError: for "onednn" on the CPU backend when the library
      cannot be built or loaded.
  """
  impl = _check_impl(impl)
  # NOTE: the backend is the default one, not the platform being compiled for,
  # so a CPU-placed jit on a GPU host gets XLA's kernels.
  if impl == "xla" or jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32:
    return "xla"
  reason = _load()
  if reason is None:
    return "onednn"
  if impl == "onednn":
    raise build.KernelUnavailableError(
        f"convolution implementation 'onednn' was requested, but {reason}; "
        "use 'auto' or 'xla' to run on XLA's kernels"
    )
  _warn_fallback(reason)
  return "xla"


def conv_fn(impl: str = "auto"):
  """Returns `conv_general_dilated` bound to `impl`, for `nn.Conv(conv_general_dilated=...)`."""
  _check_impl(impl)
  return functools.partial(conv_general_dilated, impl=impl)
