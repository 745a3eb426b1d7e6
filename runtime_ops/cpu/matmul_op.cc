// BlockMatMul on CPU (docs/ops.md, ops/matmul_io.h): validation shared with CUDA, weight repacking
// at kernel creation when the weights are constant initializers, and the kernel of
// cpu/matmul_kernel.h on the path chosen at creation (cpu/isa.h).
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "bct/block_math.h"
#include "bct/op_common.h"
#include "cpu/kernel_table.h"
#include "cpu/matmul_epilogue.h"
#include "cpu/matmul_kernel.h"
#include "cpu/row_kernels.h"
#include "ops/coded_codes.h"
#include "ops/matmul_io.h"
#include "ops/ops.h"
#include "ops/packed_zero_points.h"
#include "ops/scale_factor.h"

namespace bct {
namespace matmul_op {
namespace {

// True when the node wires an input at index (an empty name means an omitted optional input).
bool InputWired(const Ort::ConstKernelInfo& info, size_t index) {
  return index < info.GetInputCount() && !info.GetInputName(index).empty();
}

matmul::Shape KernelShape(const MatMulAttrs& attrs) {
  matmul::Shape shape;
  shape.K = attrs.K();
  shape.N = attrs.N;
  shape.bits = attrs.block.bits;
  shape.block_size = attrs.block.block_size;
  shape.symmetric = attrs.block.symmetric;
  shape.act_bits = attrs.act_bits;
  return shape;
}

matmul::ParallelFor OrtParallelFor(const Ort::KernelContext& ctx) {
  return [&ctx](std::size_t total, const std::function<void(std::size_t)>& task) {
    ParallelFor(ctx, static_cast<int64_t>(total), 1, [&task](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) task(static_cast<std::size_t>(i));
    });
  };
}

bool AllFinite(const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i])) return false;
  }
  return true;
}

// Rows of Y that overflowed although their A is finite (docs/ops.md, "Range"): the kernels sum
// activation values times unscaled weight codes (or integer dot products times a_scale) before the
// weight scale, so a partial sum can overflow (even to the wrong sign) where Y itself is in range.
// Such a row is computed again from A scaled by 2**-e (e: the exponent of its largest |value|), and
// its non-finite outputs are replaced by that result times 2**e. Scaling by a power of two changes
// no rounding in the normal range (run-time quantization included: same codes, scales times 2**-e),
// so the recomputed outputs are what float32 arithmetic of unlimited range gives, rounded once at the
// end. Outputs that were finite are never touched: normal results keep their bits. Called only when
// matmul::Compute reports a non-finite output, so a normal call pays no scan of Y here.
void RecomputeOverflowedRows(const matmul::PackedWeights& packed, const float* x, const matmul::ActivationCodes* own,
                             int64_t rows, int64_t K, int64_t N, int64_t num_blocks, int64_t act_row_bytes,
                             const float* bias, float* y) {
  std::vector<float> row, scales, bias_scaled, y_row;
  for (int64_t m = 0; m < rows; ++m) {
    float* out = y + m * N;
    if (AllFinite(out, N)) continue;
    const float* values = own != nullptr ? own->scales + m * num_blocks : x + m * K;
    const int64_t count = own != nullptr ? num_blocks : K;
    if (!AllFinite(values, count)) continue;  // a non-finite A: NaN / inf as docs/ops.md states
    float largest = 0.f;
    for (int64_t i = 0; i < count; ++i) largest = std::max(largest, std::fabs(values[i]));
    int e = 0;
    std::frexp(largest, &e);
    if (e <= 0) continue;  // A is not what overflows (weights or bias are): nothing to rescale
    std::vector<float>& scaled = own != nullptr ? scales : row;
    scaled.resize(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) scaled[i] = std::ldexp(values[i], -e);
    if (bias != nullptr) {
      bias_scaled.resize(static_cast<size_t>(N));
      for (int64_t n = 0; n < N; ++n) bias_scaled[n] = std::ldexp(bias[n], -e);
    }
    y_row.resize(static_cast<size_t>(N));
    matmul::ActivationCodes own_row;
    if (own != nullptr) {
      own_row.codes = own->codes + m * act_row_bytes;
      own_row.scales = scales.data();
    }
    matmul::Compute(packed, own != nullptr ? nullptr : row.data(), 1, bias != nullptr ? bias_scaled.data() : nullptr,
                    y_row.data(), matmul::SerialFor, own != nullptr ? &own_row : nullptr);
    for (int64_t n = 0; n < N; ++n) {
      if (!std::isfinite(out[n])) out[n] = std::ldexp(y_row[n], e);
    }
  }
}

// One call's validated inputs and allocated result, shared by the CPU and CUDA kernels.
class MatMulCpuKernel {
 public:
  MatMulCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), attrs_(ReadMatMulAttrs(info, node)), isa_(cpu::KernelIsa(node_)) {
    Ort::ConstKernelInfo kernel_info(info);
    const bool zero_points_wired = InputWired(kernel_info, kZeroPoints);
    if (attrs_.block.symmetric && zero_points_wired) {
      node_.Fail("input 'W_zero_points' must be absent when attribute 'symmetric' is 1");
    }
    if (!attrs_.block.symmetric && !zero_points_wired) {
      node_.Fail("input 'W_zero_points' is required when attribute 'symmetric' is 0");
    }
    if (ReadZeroPointsPacked(info, node_, attrs_.block.symmetric)) {  // unpacked once, here
      unpacked_zero_points_ =
          UnpackConstantZeroPoints(info, node_, kZeroPoints, "W_zero_points", kScales, "W_scales", attrs_.block.bits);
      zero_points_packed_ = true;
    }
    float factor = 0.0f;
    if (ReadScaleFactor(info, node_, &factor)) {  // float8e4m3 W_scales, widened once, here
      widened_scales_ = WidenConstantScales(info, node_, kScales, "W_scales", factor);
      scales_widened_ = true;
    }
    const InputTensor scales = scales_widened_ ? widened_scales_.view : ConstantInput(kernel_info, kScales);
    const InputTensor zero_points =
        zero_points_packed_ ? unpacked_zero_points_.view : ConstantInput(kernel_info, kZeroPoints);
    const bool constant_scales = scales.present && (attrs_.block.symmetric || zero_points.present);
    if (ReadCodesCoded(info, node_)) {
      // Decoded once, repacked into the kernel's layout, then freed: the view stays for validation.
      DecodedCodes decoded = DecodeConstantCodes(info, node_, kCodes, "W_codes", attrs_.block.bits, attrs_.N, attrs_.K());
      if (!constant_scales) {
        node_.Fail("inputs 'W_scales' (and 'W_zero_points') must be constant initializers when 'codes_coding' is set");
      }
      packed_ = PackWeights(decoded.view, scales, zero_points);
      coded_view_ = decoded.view;
      coded_view_.data = nullptr;
      coded_ = true;
    } else {
      const InputTensor codes = ConstantInput(kernel_info, kCodes);
      if (codes.present && constant_scales) {
        packed_ = PackWeights(codes, scales, zero_points);  // once: constant initializers
      }
    }
    if (zero_points_packed_ && packed_ != nullptr) {  // packed_ holds them: keep only the view's shape
      std::vector<uint8_t>().swap(unpacked_zero_points_.values);
      unpacked_zero_points_.view.data = nullptr;
    }
    if (scales_widened_ && packed_ != nullptr) {  // packed_ holds them too
      std::vector<float>().swap(widened_scales_.values);
      widened_scales_.view.data = nullptr;
    }
    if (packed_ != nullptr) {  // constant weights: each call validates these views, not the inputs
      constant_weights_ = {coded_ ? coded_view_ : ConstantInput(kernel_info, kCodes),
                           scales_widened_ ? widened_scales_.view : scales,
                           zero_points_packed_ ? unpacked_zero_points_.view : zero_points};
      for (InputTensor* view : {&constant_weights_.codes, &constant_weights_.scales, &constant_weights_.zero_points}) {
        view->data = nullptr;  // packed_ is what the kernel reads
      }
    }
  }

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      // Constant weights were validated and packed at creation: a decoder step makes hundreds of calls,
      // so their inputs are not fetched through the C API again (the views keep their dtype and shape).
      const bool constant = packed_ != nullptr;
      const InputTensor* codes_view = constant ? &constant_weights_.codes : coded_ ? &coded_view_ : nullptr;
      const InputTensor* zero_points_view = constant              ? &constant_weights_.zero_points
                                            : zero_points_packed_ ? &unpacked_zero_points_.view
                                                                  : nullptr;
      const InputTensor* scales_view =
          constant ? &constant_weights_.scales : scales_widened_ ? &widened_scales_.view : nullptr;
      const MatMulCall call = PrepareCall(ctx, node_, attrs_, codes_view, zero_points_view, scales_view);
      const Activation& a = call.a;
      const nonlinear::Result& r = call.r;
      const int64_t rows = a.rows;
      const int64_t K = attrs_.K(), N = attrs_.N;
      if (rows == 0) return;
      std::unique_ptr<matmul::PackedWeights> per_call;
      const matmul::PackedWeights* packed = packed_.get();
      if (packed == nullptr) {  // weights computed at run time: repack for this call
        per_call = PackWeights(call.codes, call.scales, call.zero_points);
        packed = per_call.get();
      }
      const matmul::ParallelFor parallel_for = OrtParallelFor(ctx);
      // A: float as given; codes in the kernel's own format as they are; other codes dequantized.
      const float* x = a.x;
      std::unique_ptr<float[]> dequantized;
      matmul::ActivationCodes own;
      std::vector<float> own_scales;
      const bool use_codes = IsOwnActivationFormat(attrs_, a);
      if (use_codes) {  // scales through act_scale, as the run-time quantizer stores them
        const float* given = static_cast<const float*>(a.scales);
        own_scales.resize(static_cast<size_t>(rows * attrs_.num_blocks()));
        for (size_t i = 0; i < own_scales.size(); ++i) own_scales[i] = act_scale(given[i]);
        own.codes = a.codes;
        own.scales = own_scales.data();
      } else if (a.codes != nullptr) {
        dequantized.reset(new float[static_cast<size_t>(rows * K)]);
        cpu::RowFormat in_fmt = nonlinear::OperandRowFormat<cpu::RowFormat>(attrs_.in, a, K);
        in_fmt.isa = isa_;
        const cpu::PackedRows source(in_fmt, a.codes, a.scales, a.zero_points);
        ParallelFor(ctx, rows, std::max<int64_t>(1, 8192 / K), [&](int64_t begin, int64_t end) {
          source.DequantizeRange(begin, end - begin, dequantized.get() + begin * K);
        });
        x = dequantized.get();
      }
      // P, the product (bias included): straight into Y when Y is float with N columns, else into a
      // buffer from which the epilogue reads; when Y is quantized, rows of P go from the kernel (still
      // in cache) to the epilogue and the requantization.
      const Epilogue epilogue = attrs_.epilogue;
      const int64_t width = attrs_.out_width();
      const float* bias = call.bias.present ? call.bias.As<float>() : nullptr;
      const int64_t act_row_bytes = use_codes ? row_bytes(K, attrs_.act_bits) : 0;
      cpu::RowFormat out_fmt;
      if (r.quantized) {
        out_fmt = nonlinear::ResultRowFormat<cpu::RowFormat>(attrs_.out, r);
        out_fmt.isa = isa_;
      }
      const cpu::MutablePackedRows sink(out_fmt, r.codes, r.scales, r.zero_points);
      const cpu::KernelTable& kernels = cpu::Kernels(isa_);
      // Product rows [begin, end) at rows_p (row stride N): epilogue into Y (float) or into the rows
      // themselves (GELU in place) or a group buffer (SiLU gating halves the width and reads both
      // halves), then one QuantizeRange per group of rows.
      const int64_t group = std::max<int64_t>(1, std::min<int64_t>(64, 4096 / width));
      auto finish_rows = [&](int64_t begin, int64_t end, float* rows_p) {
        const bool in_place = width == N;
        std::vector<float> staged(r.quantized && epilogue != Epilogue::kNone && !in_place
                                      ? static_cast<size_t>(group * width)
                                      : 0);
        for (int64_t row0 = begin; row0 < end; row0 += group) {
          const int64_t count = std::min(group, end - row0);
          float* group_p = rows_p + (row0 - begin) * N;
          const float* y = group_p;
          if (epilogue != Epilogue::kNone) {
            float* out = !r.quantized ? r.y + row0 * width : in_place ? group_p : staged.data();
            cpu::ApplyEpilogueRows(kernels, epilogue, group_p, count, N, out);
            y = out;
          }
          if (r.quantized) sink.QuantizeRange(y, row0, count);
        }
      };
      if (r.quantized) {
        const matmul::RowSink rows_done = [&](int64_t begin, int64_t end, float* rows_p, bool finite) {
          if (!finite) {
            matmul::ActivationCodes own_rows;
            if (use_codes) {
              own_rows.codes = own.codes + begin * act_row_bytes;
              own_rows.scales = own.scales + begin * attrs_.num_blocks();
            }
            RecomputeOverflowedRows(*packed, use_codes ? nullptr : x + begin * K, use_codes ? &own_rows : nullptr,
                                    end - begin, K, N, attrs_.num_blocks(), act_row_bytes, bias, rows_p);
          }
          finish_rows(begin, end, rows_p);
        };
        matmul::Compute(*packed, x, rows, bias, nullptr, parallel_for, use_codes ? &own : nullptr, &rows_done);
        return;
      }
      const bool product_in_y = width == N;
      std::unique_ptr<float[]> buffer(product_in_y ? nullptr : new float[static_cast<size_t>(rows * N)]);
      float* p = product_in_y ? r.y : buffer.get();
      const bool finite = matmul::Compute(*packed, x, rows, bias, p, parallel_for, use_codes ? &own : nullptr);
      if (!finite) {
        RecomputeOverflowedRows(*packed, x, use_codes ? &own : nullptr, rows, K, N, attrs_.num_blocks(), act_row_bytes,
                                bias, p);
      }
      if (epilogue == Epilogue::kNone) return;
      ParallelFor(ctx, rows, std::max<int64_t>(1, 8192 / N),
                  [&](int64_t begin, int64_t end) { finish_rows(begin, end, p + begin * N); });
    });
  }

 private:
  std::unique_ptr<matmul::PackedWeights> PackWeights(const InputTensor& codes, const InputTensor& scales,
                                                     const InputTensor& zero_points) const {
    matmul::WeightInputs weights;
    matmul::Shape shape = KernelShape(attrs_);
    weights.scale_kind = CheckWeights(node_, attrs_, codes, scales, zero_points, &shape.zero_point_kind);
    weights.codes = codes.As<uint8_t>();
    weights.scales = scales.data;
    weights.zero_points = zero_points.present ? static_cast<const uint8_t*>(zero_points.data) : nullptr;
    return matmul::Pack(shape, weights, isa_);
  }

  NodeRef node_;
  MatMulAttrs attrs_;
  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
  std::unique_ptr<matmul::PackedWeights> packed_;
  bool coded_ = false;       // W_codes entropy-coded: packed_ holds them, decoded at creation
  InputTensor coded_view_;  // their shape for each call's validation (no data: packed_ is used)
  bool zero_points_packed_ = false;  // W_zero_points packed at the code width: unpacked at creation
  UnpackedZeroPoints unpacked_zero_points_;
  bool scales_widened_ = false;  // W_scales float8e4m3 with a scale_factor: widened at creation
  WidenedScales widened_scales_;
  struct {
    InputTensor codes, scales, zero_points;
  } constant_weights_;  // with packed_: the weight inputs' dtype and shape (no data), for each call's checks
};

}  // namespace
}  // namespace matmul_op

void AppendMatMulCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<matmul_op::MatMulSchema, matmul_op::MatMulCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
