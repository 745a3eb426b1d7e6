// BlockAttention on CPU (docs/ops.md): Q and K quantized along the head size (the activation
// quantizer of cpu/act_quantize.h, or K's own codes when they are in the op's symmetric blocks), V as
// float32 rows (dequantized when given as codes). K is laid out once per call as BlockActMatMul lays
// out B (VNNI-packed, or K-major), so a task (a run of up to 16 query rows of one batch and query
// head; query heads of a group share their KV head) computes its strip of block dots [rows, Sk] with
// BlockActMatMul's dot kernels (the same values as nl::act_dot), then runs the streaming softmax x V of
// bct/attention_math.h over it through Kernels(isa).attention_rows. Only a strip of dots per task is
// stored, never the probability matrix. An encoder's [B, S, H * Dh] Q, K, V and Y are used in place:
// Q and K rows are quantized in storage order; the dots read a run's query rows and K is packed from
// rows H apart, V rows are read H rows apart and Y rows written H * Dh floats apart.
#include <algorithm>
#include <memory>
#include <vector>

#include "bct/attention_math.h"
#include "bct/op_common.h"
#include "cpu/act_matmul_vnni.h"
#include "cpu/kernel_table.h"
#include "cpu/row_kernels.h"
#include "ops/attention_io.h"
#include "ops/ops.h"

namespace bct {
namespace nonlinear {
namespace {

template <class T>
std::unique_ptr<T[]> Buffer(int64_t count) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(1, count))]);
}

class AttentionCpuKernel : public AttentionKernelBase {
 public:
  AttentionCpuKernel(const OrtKernelInfo* info, const NodeRef& node)
      : AttentionKernelBase(info, node), isa_(cpu::KernelIsa(node_)), kernels_(cpu::Kernels(isa_)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      AttentionGeometry g = CheckAttention(ctx, node_, attrs_);
      float* y_out = ctx.GetOutput(0, g.y_shape).GetTensorMutableData<float>();
      const int64_t dh = g.dh, bs = attrs_.block_size;
      const int64_t nb = num_blocks(dh, bs);
      const int64_t q_rows = g.batch * g.q_heads * g.sq, kv_rows = g.batch * g.kv_heads * g.sk;
      const int64_t group = std::max<int64_t>(1, std::min<int64_t>(64, 4096 / dh));  // rows per quantizer call
      std::unique_ptr<float[]> q_step;
      if (g.step) {
        q_step = Buffer<float>(q_rows * dh);
        AppendStep(ctx, &g, q_step.get());
      }
      if (q_rows == 0) return;
      // Q, K, V rows in storage order: heads first, or [B, S, H * Dh] (g.packed); Y packed also for a
      // packed step (whose Q and present cache are heads first).
      const bool y_packed = g.packed || (g.step && g.step_dims.packed);

      auto qq = Buffer<int8_t>(q_rows * dh);
      auto qs = Buffer<float>(q_rows * nb);
      ParallelFor(ctx, q_rows, group, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; r += group) {
          const int64_t count = std::min(group, end - r);
          QuantizeRows(g.q + r * dh, count, dh, qq.get() + r * dh, qs.get() + r * nb);
        }
      });

      // K as signed codes [rows, dh] + float32 scales [rows, nb]; V as float32 rows.
      auto kq = Buffer<int8_t>(kv_rows * dh);
      auto ks = Buffer<float>(kv_rows * nb);
      const bool direct = KeyCodesDirect();
      const cpu::PackedRows k_rows(RowFormatOf(g.k, dh), g.k.codes, g.k.scales, g.k.zero_points);
      const cpu::PackedRows v_rows(RowFormatOf(g.v, dh), g.v.codes, g.v.scales, g.v.zero_points);
      std::unique_ptr<float[]> v_float = g.v.quantized ? Buffer<float>(kv_rows * dh) : nullptr;
      ParallelFor(ctx, kv_rows, group, [&](int64_t begin, int64_t end) {
        std::vector<float> rows(g.k.quantized && !direct ? static_cast<size_t>(group * dh) : 0);
        for (int64_t r = begin; r < end; r += group) {
          const int64_t count = std::min(group, end - r);
          if (direct) {
            for (int64_t t = r; t < r + count; ++t) {
              nl::signed_codes_of_row(g.k.codes + t * g.k.row_bytes, dh, attrs_.kv_bits, g.k.row_bytes, g.k.scale_kind,
                                      g.k.scales, t * nb, nb, kq.get() + t * dh, ks.get() + t * nb);
            }
          } else if (g.k.quantized) {
            k_rows.DequantizeRange(r, count, rows.data());
            QuantizeRows(rows.data(), count, dh, kq.get() + r * dh, ks.get() + r * nb);
          } else {
            QuantizeRows(g.k.x + r * dh, count, dh, kq.get() + r * dh, ks.get() + r * nb);
          }
          if (g.v.quantized) v_rows.DequantizeRange(r, count, v_float.get() + r * dh);
        }
      });
      const float* values = g.v.quantized ? v_float.get() : g.v.x;

      // K in BlockActMatMul's B layout, one batch per KV head: VNNI-packed or K-major [dh, sk] / [nb, sk].
      const int64_t kv_heads = g.batch * g.kv_heads;
      const bool vnni_dots = kernels_.act_dot_vnni;
      vnni::PackedB packed;
      std::vector<int8_t> k_major(vnni_dots ? 0 : static_cast<size_t>(kv_rows * dh));
      std::vector<float> k_major_scales(vnni_dots ? 0 : static_cast<size_t>(kv_rows * nb));
      if (vnni_dots) vnni::InitPackedB(packed, kv_heads, g.sk, dh, bs);
      auto key_row = [&](int64_t head, int64_t key) {  // storage row of key `key` of head b * Hkv + h
        return nl::attention_row_index(g.packed, g.kv_heads, g.sk, head / g.kv_heads, head % g.kv_heads, key);
      };
      ParallelFor(ctx, kv_rows, 256, [&](int64_t begin, int64_t end) {
        if (vnni_dots) {  // runs of keys inside one head
          for (int64_t r = begin; r < end;) {
            const int64_t head = r / g.sk, key = r % g.sk;
            const int64_t count = std::min(end - r, g.sk - key), src = key_row(head, key);
            vnni::PackRows(packed, head, key, count, kq.get() + src * dh, ks.get() + src * nb,
                           g.packed ? g.kv_heads : 1);
            r += count;
          }
          return;
        }
        for (int64_t r = begin; r < end; ++r) {
          const int64_t head = r / g.sk, key = r % g.sk, src = key_row(head, key);
          int8_t* col = k_major.data() + head * dh * g.sk + key;
          for (int64_t d = 0; d < dh; ++d) col[d * g.sk] = kq[static_cast<size_t>(src * dh + d)];
          float* sc = k_major_scales.data() + head * nb * g.sk + key;
          for (int64_t b = 0; b < nb; ++b) sc[b * g.sk] = ks[static_cast<size_t>(src * nb + b)];
        }
      });

      // Query rows in runs of at most `run` rows inside one (batch, query head).
      const int64_t per_group = g.q_heads / g.kv_heads;
      const int64_t run = std::max<int64_t>(1, std::min<int64_t>(g.sq, 16));
      const int64_t runs_per_head = (g.sq + run - 1) / run;
      const int64_t tasks = g.batch * g.q_heads * runs_per_head;
      const int64_t work = std::max<int64_t>(1, g.sk * dh * run);
      ParallelFor(ctx, tasks, std::max<int64_t>(1, 65536 / work), [&](int64_t begin, int64_t end) {
        std::vector<float> dots(static_cast<size_t>(run * g.sk));
        std::vector<int32_t> acc(vnni_dots ? 0 : static_cast<size_t>(g.sk));
        std::vector<uint8_t> scratch(vnni_dots ? static_cast<size_t>(4 * nb * packed.groups * 4) : 0);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t head_index = task / runs_per_head;  // b * Hq + h
          const int64_t b = head_index / g.q_heads, h = head_index % g.q_heads;
          const int64_t i0 = (task % runs_per_head) * run;
          const int64_t rows = std::min(run, g.sq - i0);
          const int64_t kv_h = h / per_group, kv_head = b * g.kv_heads + kv_h;
          const int64_t row = nl::attention_row_index(g.packed, g.q_heads, g.sq, b, h, i0);
          const int8_t* q_codes = qq.get() + row * dh;
          const float* q_scales = qs.get() + row * nb;
          const int64_t q_step = g.packed ? g.q_heads : 1;  // rows between the run's query rows
          if (vnni_dots) {
            vnni::DotRows(packed, kv_head, q_codes, q_scales, rows, scratch.data(), dots.data(), g.sk, q_step);
          } else {
            for (int64_t r = 0; r < rows; ++r) {
              kernels_.act_dot_row(q_codes + r * q_step * dh, q_scales + r * q_step * nb,
                                   k_major.data() + kv_head * dh * g.sk,
                                   k_major_scales.data() + kv_head * nb * g.sk, g.sk, dh, bs, nb, acc.data(),
                                   dots.data() + r * g.sk);
            }
          }
          const int64_t key0 = nl::attention_row_index(g.packed, g.kv_heads, g.sk, b, kv_h, 0);
          nl::AttentionKeys kv;
          kv.codes = kq.get() + key0 * dh;
          kv.scales = ks.get() + key0 * nb;
          kv.values = values + key0 * dh;
          kv.dh = dh;
          kv.nb = nb;
          kv.block_size = bs;
          kv.key_step = g.packed ? g.kv_heads : 1;
          kv.value_step = kv.key_step;
          const float* mask = g.mask != nullptr ? g.mask + b * g.mask_strides[0] + h * g.mask_strides[1] : nullptr;
          const int64_t y_row = nl::attention_row_index(y_packed, g.q_heads, g.sq, b, h, i0);
          kernels_.attention_rows(nullptr, nullptr, dots.data(), rows, i0, g.sq, g.sk, attrs_.causal, kv,
                                  attrs_.scale, mask, g.mask_strides[2], g.mask_strides[3], y_out + y_row * dh,
                                  y_packed ? g.q_heads * dh : dh);
        }
      });
    });
  }

 private:
  // The step (inputs 8..11): Q's rows heads first with rotary into q_rows_out; the present cache
  // (outputs 1..4) as the past's rows followed by the new ones (rotary on K, quantized when the cache
  // holds codes); g then reads Q and the present cache as a plain BlockAttention would.
  void AppendStep(Ort::KernelContext& ctx, AttentionGeometry* gp, float* q_rows_out) const {
    AttentionGeometry& g = *gp;
    const nl::AttentionStepDims& d = g.step_dims;
    const AttentionPresent present = PresentOutputs(ctx, node_, g);
    const int64_t dh = g.dh, q_rows = g.batch * g.q_heads * g.sq;
    for (int64_t r = 0; r < q_rows; ++r) nl::step_input_row(d, g.q, g.q_heads, r, true, g.cos, g.sin, q_rows_out + r * dh);
    const bool codes = g.k.quantized;
    const int64_t row_nbytes = codes ? g.k.row_bytes : dh * static_cast<int64_t>(sizeof(float));
    const int64_t scale_nbytes = codes ? g.k.num_blocks * static_cast<int64_t>(ScaleItemSize(g.k.scale_kind)) : 0;
    const int64_t heads = g.batch * g.kv_heads;
    ParallelFor(ctx, heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> row(static_cast<size_t>(dh));
      for (int64_t bh = begin; bh < end; ++bh) {
        for (int which = 0; which < 2; ++which) {
          const AttentionKV& past = which == 0 ? g.k : g.v;
          const float* fresh = which == 0 ? g.k_new : g.v_new;
          auto* dst = static_cast<uint8_t*>(which == 0 ? present.k : present.v);
          auto* dst_scales = static_cast<uint8_t*>(which == 0 ? present.k_scales : present.v_scales);
          const auto* src = codes ? past.codes : reinterpret_cast<const uint8_t*>(past.x);
          std::copy(src + bh * d.past * row_nbytes, src + (bh + 1) * d.past * row_nbytes, dst + bh * g.sk * row_nbytes);
          if (codes) {
            const auto* src_scales = static_cast<const uint8_t*>(past.scales);
            std::copy(src_scales + bh * d.past * scale_nbytes, src_scales + (bh + 1) * d.past * scale_nbytes,
                      dst_scales + bh * g.sk * scale_nbytes);
          }
          for (int64_t i = 0; i < g.sq; ++i) {
            const int64_t t = bh * g.sk + d.past + i;  // present row
            nl::step_input_row(d, fresh, g.kv_heads, bh * g.sq + i, which == 0, g.cos, g.sin, row.data());
            if (codes) {
              nl::quantize_cache_row(row.data(), dh, attrs_.kv_bits, attrs_.kv_block_size, g.k.scale_kind, row_nbytes,
                                     dst + t * row_nbytes, dst_scales, t * g.k.num_blocks);
            } else {
              std::copy(row.begin(), row.end(), reinterpret_cast<float*>(dst) + t * dh);
            }
          }
        }
      }
    });
    g.q = q_rows_out;
    for (AttentionKV* kv : {&g.k, &g.v}) {
      const bool is_k = kv == &g.k;
      if (codes) {
        kv->codes = static_cast<const uint8_t*>(is_k ? present.k : present.v);
        kv->scales = is_k ? present.k_scales : present.v_scales;
      } else {
        kv->x = static_cast<const float*>(is_k ? present.k : present.v);
      }
    }
  }

  void QuantizeRows(const float* x, int64_t rows, int64_t k, int8_t* q, float* scales) const {
    cpu::ActCodes out;
    out.codes = q;
    out.row_stride = k;
    out.block_stride = attrs_.block_size;
    out.scales = scales;
    kernels_.quantize_act_rows(x, rows, k, attrs_.act_bits, attrs_.block_size, out);
  }

  cpu::RowFormat RowFormatOf(const AttentionKV& kv, int64_t dh) const {
    cpu::RowFormat fmt = MakeRowFormat<cpu::RowFormat>(attrs_.kv_bits > 0 ? attrs_.kv_bits : 8,
                                                       attrs_.kv_bits > 0 ? attrs_.kv_block_size : 1,
                                                       attrs_.kv_symmetric, kv.scale_kind, dh, kv.row_bytes,
                                                       kv.num_blocks);
    fmt.isa = isa_;
    return fmt;
  }

  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
  const cpu::KernelTable& kernels_;
};

}  // namespace
}  // namespace nonlinear

void AppendAttentionCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<nonlinear::AttentionSchema, nonlinear::AttentionCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
