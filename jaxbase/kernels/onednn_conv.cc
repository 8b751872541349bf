// XLA FFI handlers for float32 2D convolution (NHWC activations, HWIO kernel)
// backed by oneDNN primitives: forward, backward-data and backward-weights.
// jaxbase/kernels/build.py compiles this file against oneDNN (the
// onednn-cpu-gomp wheel: oneDNN 3.2 with the GNU OpenMP runtime) and jaxlib's
// FFI headers. jaxbase/kernels/conv.py registers the handlers and calls them.
//
// Every handler takes the attributes stride_h, stride_w, pad_top, pad_bottom,
// pad_left, pad_right and omp_threads (int64). Output shapes come from the
// result buffers.
//
// Weight layout: the HWIO buffer is described to oneDNN with format_tag::hwio
// (logical dims {O, I, KH, KW}, physical order KH, KW, I, O). The forward
// primitive reads HWIO directly (oneDNN 3.2 picks its brgconv kernel for it).
// The backward primitives choose their own blocked weight layout and the
// handlers reorder between it and HWIO, because with HWIO weights oneDNN falls
// back to gemm-based backward kernels, which measured 2-8x slower.
//
// Threads: oneDNN's OpenMP runtime starts one thread team per calling thread.
// omp_threads > 0 sets the team size of the calling thread
// (omp_set_num_threads), so that N CPU devices times omp_threads threads fit
// the cores; 0 keeps OpenMP's default.
// NOTE: XLA may also run independent calls of one device at once (a profile
// showed backward-data and backward-weights calls overlapping on two
// threads), so with omp_threads 0 the teams can exceed the core count.

#include <omp.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;
using DataType = memory::data_type;

namespace {

struct ConvParams {
  int64_t n, c, h, w;     // input NHWC
  int64_t o, oh, ow;      // output channels and spatial size
  int64_t kh, kw;         // kernel size
  int64_t sh, sw;         // strides
  int64_t pt, pb, pl, pr; // explicit padding
  int64_t threads;        // OpenMP team size (0: default)

  std::array<int64_t, 16> Key() const {
    return {n, c, h, w, o, oh, ow, kh, kw, sh, sw, pt, pb, pl, pr, threads};
  }
  memory::desc SrcDesc() const {
    return memory::desc({n, c, h, w}, DataType::f32, Tag::nhwc);
  }
  memory::desc DstDesc() const {
    return memory::desc({n, o, oh, ow}, DataType::f32, Tag::nhwc);
  }
  memory::desc UserWeightsDesc() const {
    return memory::desc({o, c, kh, kw}, DataType::f32, Tag::hwio);
  }
  // Forward reads HWIO; backward lets oneDNN pick a blocked layout.
  memory::desc PrimitiveWeightsDesc(bool backward) const {
    return memory::desc({o, c, kh, kw}, DataType::f32, backward ? Tag::any : Tag::hwio);
  }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }

};

dnnl::engine &Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// One stream per calling thread, because XLA may run several devices (and so
// several handler calls) at once and a stream is not meant to be shared.
dnnl::stream &Stream() {
  thread_local dnnl::stream strm(Engine());
  return strm;
}

// Sets the OpenMP team size of the calling thread. It runs before the
// primitive lookup, because oneDNN sizes a primitive's work split for the
// thread count at creation time.
void ApplyOmpThreads(int64_t threads) {
  if (threads > 0 && omp_get_max_threads() != threads) {
    omp_set_num_threads(static_cast<int>(threads));
  }
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const ConvParams &p) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, p.SrcDesc(), p.PrimitiveWeightsDesc(false),
      p.DstDesc(), p.Strides(), p.PadL(), p.PadR());
}

// Forward descriptor used only as the hint for a backward primitive, so it
// gets the same weight layout freedom as the backward primitive.
dnnl::convolution_forward::primitive_desc ForwardHintDesc(const ConvParams &p) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, p.SrcDesc(), p.PrimitiveWeightsDesc(true),
      p.DstDesc(), p.Strides(), p.PadL(), p.PadR());
}

// A primitive plus the weight buffer and reorder it needs when its weight
// layout differs from HWIO. Cached per thread, so the scratch weight buffer is
// never shared between concurrent calls.
struct CachedConv {
  dnnl::primitive prim;
  bool needs_reorder = false;
  memory weights;         // primitive-layout weights (only if needs_reorder)
  dnnl::reorder reorder;  // HWIO -> primitive layout, or the reverse for wgrad
};

enum class Kind { kForward, kBackwardData, kBackwardWeights };

CachedConv &Lookup(Kind kind, const ConvParams &p) {
  thread_local std::map<std::pair<int, std::array<int64_t, 16>>,
                        std::unique_ptr<CachedConv>> cache;
  auto key = std::make_pair(static_cast<int>(kind), p.Key());
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;

  auto entry = std::make_unique<CachedConv>();
  memory::desc prim_weights;
  if (kind == Kind::kForward) {
    auto pd = ForwardDesc(p);
    entry->prim = dnnl::convolution_forward(pd);
    prim_weights = pd.weights_desc();
  } else if (kind == Kind::kBackwardData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, p.SrcDesc(),
        p.PrimitiveWeightsDesc(true), p.DstDesc(), p.Strides(), p.PadL(), p.PadR(),
        ForwardHintDesc(p));
    entry->prim = dnnl::convolution_backward_data(pd);
    prim_weights = pd.weights_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, p.SrcDesc(),
        p.PrimitiveWeightsDesc(true), p.DstDesc(), p.Strides(), p.PadL(), p.PadR(),
        ForwardHintDesc(p));
    entry->prim = dnnl::convolution_backward_weights(pd);
    prim_weights = pd.diff_weights_desc();
  }

  const memory::desc user_weights = p.UserWeightsDesc();
  if (prim_weights != user_weights) {
    entry->needs_reorder = true;
    entry->weights = memory(prim_weights, Engine());
    memory user(user_weights, Engine(), DNNL_MEMORY_NONE);
    entry->reorder = kind == Kind::kBackwardWeights
                         ? dnnl::reorder(entry->weights, user)
                         : dnnl::reorder(user, entry->weights);
  }
  return *cache.emplace(key, std::move(entry)).first->second;
}

ffi::Error CheckRank(const char *name, size_t rank) {
  if (rank != 4) {
    return ffi::Error::InvalidArgument(std::string(name) + " must have rank 4, got " +
                                       std::to_string(rank));
  }
  return ffi::Error::Success();
}

template <typename Fn>
ffi::Error RunGuarded(Fn &&fn) {
  try {
    fn();
    return ffi::Error::Success();
  } catch (const dnnl::error &e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  } catch (const std::exception &e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
}

// Checks that input, kernel and output shapes describe one convolution.
ffi::Error CheckShapes(const ConvParams &p, ffi::Span<const int64_t> k,
                       ffi::Span<const int64_t> y) {
  if (k[2] != p.c || y[0] != p.n || y[3] != p.o) {
    return ffi::Error::InvalidArgument(
        "convolution shapes do not match: input channels " + std::to_string(p.c) +
        ", kernel input channels " + std::to_string(k[2]) + ", batch " +
        std::to_string(p.n) + " and " + std::to_string(y[0]));
  }
  return ffi::Error::Success();
}

ConvParams MakeParams(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, int64_t threads) {
  return ConvParams{x[0], x[3], x[1], x[2], k[3], y[1], y[2], k[0],
                    k[1], sh,   sw,   pt,   pb,   pl,   pr,   threads};
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                           ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                           int64_t threads) {
  for (auto [name, rank] : {std::pair{"x", x.dimensions().size()},
                            std::pair{"kernel", k.dimensions().size()},
                            std::pair{"y", y->dimensions().size()}}) {
    if (auto err = CheckRank(name, rank); err.failure()) return err;
  }
  ConvParams p = MakeParams(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw,
                            pt, pb, pl, pr, threads);
  if (auto err = CheckShapes(p, k.dimensions(), y->dimensions()); err.failure()) return err;
  return RunGuarded([&] {
    ApplyOmpThreads(threads);
    CachedConv &c = Lookup(Kind::kForward, p);
    auto &strm = Stream();
    memory xm(p.SrcDesc(), Engine(), x.typed_data());
    memory ym(p.DstDesc(), Engine(), y->typed_data());
    memory km(p.UserWeightsDesc(), Engine(), k.typed_data());
    if (c.needs_reorder) {
      c.reorder.execute(strm, km, c.weights);
      km = c.weights;
    }
    c.prim.execute(strm, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, ym}});
    strm.wait();
  });
}

ffi::Error ConvBackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                                ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                                int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                                int64_t threads) {
  for (auto [name, rank] : {std::pair{"dy", dy.dimensions().size()},
                            std::pair{"kernel", k.dimensions().size()},
                            std::pair{"dx", dx->dimensions().size()}}) {
    if (auto err = CheckRank(name, rank); err.failure()) return err;
  }
  ConvParams p = MakeParams(dx->dimensions(), k.dimensions(), dy.dimensions(), sh, sw,
                            pt, pb, pl, pr, threads);
  if (auto err = CheckShapes(p, k.dimensions(), dy.dimensions()); err.failure()) return err;
  return RunGuarded([&] {
    ApplyOmpThreads(threads);
    CachedConv &c = Lookup(Kind::kBackwardData, p);
    auto &strm = Stream();
    memory dym(p.DstDesc(), Engine(), dy.typed_data());
    memory dxm(p.SrcDesc(), Engine(), dx->typed_data());
    memory km(p.UserWeightsDesc(), Engine(), k.typed_data());
    if (c.needs_reorder) {
      c.reorder.execute(strm, km, c.weights);
      km = c.weights;
    }
    c.prim.execute(strm, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, km},
                          {DNNL_ARG_DIFF_SRC, dxm}});
    strm.wait();
  });
}

ffi::Error ConvBackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                   ffi::ResultBuffer<ffi::F32> dk, int64_t sh,
                                   int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                                   int64_t pr, int64_t threads) {
  for (auto [name, rank] : {std::pair{"x", x.dimensions().size()},
                            std::pair{"dy", dy.dimensions().size()},
                            std::pair{"dkernel", dk->dimensions().size()}}) {
    if (auto err = CheckRank(name, rank); err.failure()) return err;
  }
  ConvParams p = MakeParams(x.dimensions(), dk->dimensions(), dy.dimensions(), sh, sw,
                            pt, pb, pl, pr, threads);
  if (auto err = CheckShapes(p, dk->dimensions(), dy.dimensions()); err.failure()) return err;
  return RunGuarded([&] {
    ApplyOmpThreads(threads);
    CachedConv &c = Lookup(Kind::kBackwardWeights, p);
    auto &strm = Stream();
    memory xm(p.SrcDesc(), Engine(), x.typed_data());
    memory dym(p.DstDesc(), Engine(), dy.typed_data());
    memory dkm(p.UserWeightsDesc(), Engine(), dk->typed_data());
    memory target = c.needs_reorder ? c.weights : dkm;
    c.prim.execute(strm, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym},
                          {DNNL_ARG_DIFF_WEIGHTS, target}});
    if (c.needs_reorder) c.reorder.execute(strm, c.weights, dkm);
    strm.wait();
  });
}

}  // namespace

#define CONV_ATTRS                 \
  .Attr<int64_t>("stride_h")       \
      .Attr<int64_t>("stride_w")   \
      .Attr<int64_t>("pad_top")    \
      .Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")   \
      .Attr<int64_t>("pad_right")   \
      .Attr<int64_t>("omp_threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, ConvBackwardDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, ConvBackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
