// The work of the CUDA row kernels of BlockGelu, BlockSilu, BlockSoftmax, BlockLayerNorm and
// BlockRMSNorm, as host/device code: gelu.cu, silu.cu, softmax.cu and norm.cu add only the loops
// and the launches, and tests/cuda_threads_on_host.cc runs the same code on the CPU.
//
// Softmax and the norms run one warp per row: a row function takes a Warp, whose lanes each do
// their part of the row (ForLanes) and whose reductions combine the lanes' parts (Max, LaneSum,
// LaneSumSq). The device warp (nonlinear_rows.cuh) combines with shuffles; HostWarp below runs the
// 32 lanes one after the other and combines their parts in the same order.
#pragma once

#include <cmath>
#include <cstdint>

#include "bct/block_math.h"
#include "bct/nonlinear_math.h"

namespace bct {
namespace cuda {

constexpr int kWarpLanes = 32;

// Elementwise kernels: thread i's element.
BCT_HD BCT_INLINE float GeluOne(bool tanh_form, float x) { return tanh_form ? nl::gelu_tanh(x) : nl::gelu_erf(x); }
BCT_HD BCT_INLINE float SiluOne(float x) { return nl::silu(x); }

// Lane `lane`'s part of a row's max (NaNs ignored; -inf if none): elements lane, lane + 32, ...
BCT_HD BCT_INLINE float RowMaxPart(const float* v, int64_t n, int lane) {
  float m = -INFINITY;
  for (int64_t i = lane; i < n; i += kWarpLanes) m = v[i] > m ? v[i] : m;
  return m;
}

// Two lanes' maxima combined (the shuffle tree's step).
BCT_HD BCT_INLINE float CombineMax(float mine, float other) { return other > mine ? other : mine; }

// Spec lane `lane` (< nl::kLanes) of nl::lane_sum / nl::lane_sum_sq about c: elements lane, lane + 8, ...
BCT_HD BCT_INLINE float LaneSumPart(const float* v, int64_t n, int lane) {
  float acc = 0.0f;
  for (int64_t i = lane; i < n; i += nl::kLanes) acc = fadd(acc, v[i]);
  return acc;
}
BCT_HD BCT_INLINE float LaneSumSqPart(const float* v, int64_t n, float c, int lane) {
  float acc = 0.0f;
  for (int64_t i = lane; i < n; i += nl::kLanes) {
    const float d = fsub(v[i], c);
    acc = fadd(acc, fmul(d, d));
  }
  return acc;
}

// The row functions, the arithmetic of nl::softmax_row / nl::layer_norm_row / nl::rms_norm_row.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Warp>
BCT_HD void SoftmaxRow(const Warp& warp, float* v, int64_t d) {
  const float m = warp.Max(v, d);
  warp.ForLanes([&](int lane) {
    for (int64_t i = lane; i < d; i += kWarpLanes) v[i] = nl::exp_f32(fsub(v[i], m));
  });
  const float inv = fdiv(1.0f, warp.LaneSum(v, d));
  warp.ForLanes([&](int lane) {
    for (int64_t i = lane; i < d; i += kWarpLanes) v[i] = fmul(v[i], inv);
  });
}

// The Add of BlockAddLayerNorm / BlockAddRMSNorm: v = v + skip, one rounding per element, copied to
// sum (output 3) when given; the norm row then runs on v.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Warp>
BCT_HD void AddSkipRow(const Warp& warp, const float* skip, float* sum, float* v, int64_t d) {
  warp.ForLanes([&](int lane) {
    for (int64_t i = lane; i < d; i += kWarpLanes) {
      v[i] = fadd(v[i], skip[i]);
      if (sum != nullptr) sum[i] = v[i];
    }
  });
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Warp>
BCT_HD void LayerNormRow(const Warp& warp, const float* scale, const float* bias, float epsilon, float* v, int64_t d) {
  const float count = static_cast<float>(d);
  const float mean = fdiv(warp.LaneSum(v, d), count);
  const float var = fdiv(warp.LaneSumSq(v, d, mean), count);
  const float inv = fdiv(1.0f, nl::fsqrt(fadd(var, epsilon)));
  warp.ForLanes([&](int lane) {
    for (int64_t i = lane; i < d; i += kWarpLanes) {
      const float t = fmul(fmul(fsub(v[i], mean), inv), scale[i]);
      v[i] = bias != nullptr ? fadd(t, bias[i]) : t;
    }
  });
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Warp>
BCT_HD void RMSNormRow(const Warp& warp, const float* scale, float epsilon, float* v, int64_t d) {
  const float count = static_cast<float>(d);
  const float ms = fdiv(warp.LaneSumSq(v, d, 0.0f), count);
  const float inv = fdiv(1.0f, nl::fsqrt(fadd(ms, epsilon)));
  warp.ForLanes([&](int lane) {
    for (int64_t i = lane; i < d; i += kWarpLanes) v[i] = fmul(fmul(v[i], inv), scale[i]);
  });
}

#if !defined(__CUDA_ARCH__)
// A warp on the host: lanes run one after the other; reductions combine the lanes' parts as the
// device warp does (max: the xor-shuffle tree; sums: spec lanes 0..7 through nl::combine_lanes).
struct HostWarp {
  float Max(const float* v, int64_t n) const {
    float m[kWarpLanes];
    for (int lane = 0; lane < kWarpLanes; ++lane) m[lane] = RowMaxPart(v, n, lane);
    for (int offset = kWarpLanes / 2; offset > 0; offset >>= 1) {
      float next[kWarpLanes];
      for (int lane = 0; lane < kWarpLanes; ++lane) next[lane] = CombineMax(m[lane], m[lane ^ offset]);
      for (int lane = 0; lane < kWarpLanes; ++lane) m[lane] = next[lane];
    }
    return m[0];
  }
  float LaneSum(const float* v, int64_t n) const {
    float lanes[nl::kLanes];
    for (int j = 0; j < nl::kLanes; ++j) lanes[j] = LaneSumPart(v, n, j);
    return nl::combine_lanes(lanes);
  }
  float LaneSumSq(const float* v, int64_t n, float c) const {
    float lanes[nl::kLanes];
    for (int j = 0; j < nl::kLanes; ++j) lanes[j] = LaneSumSqPart(v, n, c, j);
    return nl::combine_lanes(lanes);
  }
  template <class F>
  void ForLanes(const F& f) const {
    for (int lane = 0; lane < kWarpLanes; ++lane) f(lane);
  }
};
#endif

}  // namespace cuda
}  // namespace bct
