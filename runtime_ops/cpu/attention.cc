// BlockAttention on CPU (docs/ops.md): Q and K quantized along the head size (the activation
// quantizer of cpu/act_quantize.h, or K's own codes when they are in the op's symmetric blocks), V as
// float32 rows (dequantized when given as codes; a decoder step reads an 8-bit cache's V codes as they are). K is laid out once per call as BlockActMatMul lays
// out B (VNNI-packed, or K-major), so a task (a run of up to 16 query rows of one batch and query
// head; query heads of a group share their KV head) computes its strip of block dots [rows, Sk] with
// BlockActMatMul's dot kernels (the same values as nl::act_dot), then runs the streaming softmax x V of
// bct/attention_math.h over it through Kernels(isa).attention_rows. Only a strip of dots per task is
// stored, never the probability matrix. An encoder's [B, S, H * Dh] Q, K, V and Y are used in place:
// Q and K rows are quantized in storage order; the dots read a run's query rows and K is packed from
// rows H apart, V rows are read H rows apart and Y rows written H * Dh floats apart. Q and K (and V) may
// be parts of one packed projection [B, S, (Hq + Hkv [+ Hkv]) * Dh]: Q's and K's rows are then quantized
// together into one buffer laid out as the projection (a position's Q rows, then its K rows), and read
// from there as from the packed tensors with more rows per position. A decoder step (one query row per
// head) runs the query heads of a KV head together, in one parallel section of two tasks per KV head
// (each appends, prepares and packs half the head's keys; the second to finish runs the head's queries);
// with an 8-bit cache packed for the VNNI dots the packing reads the past K rows and copies them to the
// present cache in the same pass, and V's past rows are read from the past cache (their copy in the
// present cache, like K's, is stored non-temporally: the step does not read it back).
// The buffers are per-thread scratch (cpu/thread_scratch.h): a step allocates nothing.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>

#include "bct/attention_math.h"
#include "bct/op_common.h"
#include "cpu/act_matmul_vnni.h"
#include "cpu/kernel_table.h"
#include "cpu/row_kernels.h"
#include "cpu/thread_scratch.h"
#include "ops/attention_io.h"
#include "ops/ops.h"

#if BCT_X86_SIMD
#include <immintrin.h>
#endif

namespace bct {
namespace nonlinear {
namespace {

// Least work (in values) per task of the parallel loops.
constexpr int64_t kMinTaskValues = 32768;

#if BCT_X86_SIMD
// n float16 scales as float32, 16 at a time (the conversion is exact); with act, a non-finite scale
// becomes the NaN act_scale gives (x - x is 0 only for a finite x).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void HalvesToFloatAvx512(const uint16_t* in, int64_t n, bool act,
                                                                               float* out) {
  const __m512 nan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 x = _mm512_maskz_cvtph_ps(m, _mm256_maskz_loadu_epi16(m, in + i));  // maskz: GCC 12 warns on cvtph_ps
    if (act) x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_EQ_OQ), nan, x);
    _mm512_mask_storeu_ps(out + i, m, x);
  }
}
#endif

// scale_value(kind, scales, first + i) for i < n, through act_scale when act (the scales of Q x K^T's
// operands); the AVX-512 paths convert float16 scales in vectors.
void ScalesOf(cpu::Isa isa, ScaleKind kind, const void* scales, int64_t first, int64_t n, bool act, float* out) {
#if BCT_X86_SIMD
  if (kind == ScaleKind::kFloat16 && isa >= cpu::Isa::kAvx512) {
    HalvesToFloatAvx512(static_cast<const uint16_t*>(scales) + first, n, act, out);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float value = scale_value(kind, scales, first + i);
    out[i] = act ? act_scale(value) : value;
  }
}

// bytes from src to dst, dst's whole 64-byte lines by non-temporal stores (SSE2: every x86-64 path), for
// a copy that the call does not read back.
void StreamCopy(uint8_t* dst, const uint8_t* src, int64_t bytes) {
#if BCT_X86_SIMD
  const int64_t head = std::min<int64_t>(bytes, (64 - static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) & 63)) & 63);
  std::memcpy(dst, src, static_cast<size_t>(head));
  int64_t i = head;
  for (; i + 64 <= bytes; i += 64) {
    for (int q = 0; q < 4; ++q) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16 * q),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16 * q)));
    }
  }
  std::memcpy(dst + i, src + i, static_cast<size_t>(bytes - i));
  _mm_sfence();  // the streamed lines ordered before what follows
#else
  std::memcpy(dst, src, static_cast<size_t>(bytes));
#endif
}

// The calling thread's packed keys (cpu/act_matmul_vnni.h); one call at a time holds it.
vnni::PackedB& CallPackedB() {
  thread_local vnni::PackedB packed;
  return packed;
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
      const bool direct = KeyCodesDirect();
      const bool vnni_dots = kernels_.act_dot_vnni;
      // 8-bit keys in the op's own blocks are packed for the VNNI dots straight from the cache's codes.
      const bool pack_codes = vnni_dots && direct && attrs_.kv_bits == 8 && !g.packed;  // heads-first cache codes
      // Q, K, V rows in storage order: heads first, or [B, S, H * Dh] (g.packed); Y packed also for a
      // packed step (whose Q and present cache are heads first).
      const bool y_packed = g.packed || (g.step && g.step_dims.packed);
      // A decoder step (one query row per head, heads-first keys) whose mask is the same for every head
      // runs the query heads of a KV head together (step 3 below) in one parallel section, which also
      // appends the new rows to the present cache; any other step appends them first.
      const int64_t per_group = g.q_heads / g.kv_heads;
      const bool heads_together = !g.packed && g.sq == 1 && g.mask_strides[1] == 0 && per_group > 1;
      const int64_t kv_heads = g.batch * g.kv_heads;
      // There, with K packed from the cache's codes, the packing reads the past K rows and also copies
      // them to the present cache (vnni::PackCodeRows with copy): each past K byte is read once.
      const bool pack_copies = heads_together && g.step && pack_codes;
      // There V in 8-bit symmetric codes is read as codes by attention_rows (no float32 copy of V).
      const int64_t value_nb = g.v.num_blocks;
      const bool value_codes = heads_together && g.v.quantized && attrs_.kv_bits == 8 && attrs_.kv_symmetric &&
                               g.v.zero_points == nullptr && g.v.row_bytes == dh && dh <= nl::kAttentionMaxValueCodesDh;
      // A step's attention_rows then reads V's past rows from the past cache (just read by their copy to
      // the present cache, which is stored non-temporally: nothing in the call reads it back).
      const bool values_from_past = value_codes && g.step;
      // Q and K of one projection (g.k_in_q): their codes in one buffer, rows as in the projection (V's
      // rows of a Q, K, V projection left unused); rows of codes between positions of Q and of K.
      const bool qk_together = g.k_in_q;
      const int64_t positions = g.batch * g.sq;
      const int64_t q_code_stride = qk_together ? g.q_stride : g.q_heads;
      const int64_t k_code_stride = qk_together ? g.k_stride : g.kv_heads;
      auto code_row = [&](int64_t stride, int64_t heads, int64_t seq, int64_t b, int64_t h, int64_t i) {
        return g.packed ? (b * seq + i) * stride + h : (b * heads + h) * seq + i;
      };

      // The call's buffers, in per-thread scratch of the calling thread (cpu/thread_scratch.h): a decoder
      // step allocates nothing. K as signed codes [rows, dh] + float32 scales [rows, nb]; V as float32 rows,
      // or only its scales as float32 when attention_rows reads V's codes (value_codes).
      cpu::ScratchPlan plan;
      const size_t at_q_step = plan.Add<float>(g.step ? q_rows * dh : 0);
      const int64_t q_code_rows = qk_together ? positions * g.q_stride : q_rows;
      const size_t at_qq = plan.Add<int8_t>(q_code_rows * dh);
      const size_t at_qs = plan.Add<float>(q_code_rows * nb);
      const size_t at_kq = plan.Add<int8_t>(pack_codes || qk_together ? 0 : kv_rows * dh);
      const size_t at_ks = plan.Add<float>(qk_together ? 0 : kv_rows * nb);
      const size_t at_values = plan.Add<float>(g.v.quantized && !value_codes ? kv_rows * dh : 0);
      const size_t at_value_scales = plan.Add<float>(value_codes ? kv_rows * value_nb : 0);
      const size_t at_k_major = plan.Add<int8_t>(vnni_dots ? 0 : kv_rows * dh);
      const size_t at_k_major_scales = plan.Add<float>(vnni_dots ? 0 : kv_rows * nb);
      const size_t at_chunks_done = plan.Add<std::atomic<int32_t>>(heads_together ? kv_heads : 0);
      uint8_t* base = plan.Carve<cpu::ScratchSlot::kAttentionCall>();
      StepCache step;
      if (g.step) step = BeginStep(ctx, &g, cpu::ScratchPlan::At<float>(base, at_q_step));
      if (g.step && (!heads_together || q_rows == 0)) {
        // Past rows copied, new rows rotated and quantized (~8x a copied value each).
        const int64_t head_work = g.dh * (g.sk + 8 * g.sq);
        ParallelFor(ctx, g.batch * g.kv_heads, std::max<int64_t>(1, kMinTaskValues / head_work),
                    [&](int64_t b, int64_t e) { AppendRows(g, step, b * g.sk, e * g.sk); });
      }
      if (q_rows == 0) return;
      int8_t* qq = cpu::ScratchPlan::At<int8_t>(base, at_qq);
      float* qs = cpu::ScratchPlan::At<float>(base, at_qs);
      int8_t* kq = qk_together ? qq + g.q_heads * dh : cpu::ScratchPlan::At<int8_t>(base, at_kq);
      float* ks = qk_together ? qs + g.q_heads * nb : cpu::ScratchPlan::At<float>(base, at_ks);
      float* v_float = cpu::ScratchPlan::At<float>(base, at_values);
      float* v_scales = cpu::ScratchPlan::At<float>(base, at_value_scales);
      int8_t* k_major = cpu::ScratchPlan::At<int8_t>(base, at_k_major);
      float* k_major_scales = cpu::ScratchPlan::At<float>(base, at_k_major_scales);

      if (qk_together) {  // each position's Q and K rows: contiguous, and all of them without V
        const int64_t qk_rows = g.q_heads + g.kv_heads;
        const bool contiguous = g.q_stride == qk_rows;
        ParallelFor(ctx, positions, std::max<int64_t>(1, group / qk_rows), [&](int64_t begin, int64_t end) {
          if (contiguous) {
            for (int64_t r = begin * qk_rows; r < end * qk_rows; r += group) {
              QuantizeRows(g.q + r * dh, std::min(group, end * qk_rows - r), dh, qq + r * dh, qs + r * nb);
            }
            return;
          }
          for (int64_t p = begin; p < end; ++p) {
            const int64_t r = p * g.q_stride;
            QuantizeRows(g.q + r * dh, qk_rows, dh, qq + r * dh, qs + r * nb);
          }
        });
      } else {
        ParallelFor(ctx, q_rows, group, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; r += group) {
            const int64_t count = std::min(group, end - r);
            QuantizeRows(g.q + r * dh, count, dh, qq + r * dh, qs + r * nb);
          }
        });
      }

      // Three steps over the keys and queries, written for ranges so that they run either as three
      // parallel loops or, for a decoder step, as one task per KV head (below).
      // 1. K rows r in [begin, end) as signed codes kq + float32 scales ks; V rows as float32 rows.
      const cpu::PackedRows k_rows(RowFormatOf(g.k, dh), g.k.codes, g.k.scales, g.k.zero_points);
      const cpu::PackedRows v_rows(RowFormatOf(g.v, dh), g.v.codes, g.v.scales, g.v.zero_points);
      auto prepare_keys = [&](int64_t begin, int64_t end) {
        float* rows = g.k.quantized && !direct
                          ? cpu::ThreadScratch<float, cpu::ScratchSlot::kAttentionTask>(static_cast<size_t>(group * dh))
                          : nullptr;
        for (int64_t r = begin; r < end; r += group) {
          const int64_t count = std::min(group, end - r);
          if (pack_codes) {  // the VNNI packing reads the cache's codes itself: only the scales here
            ScalesOf(isa_, g.k.scale_kind, g.k.scales, r * nb, count * nb, true, ks + r * nb);
          } else if (direct) {
            for (int64_t t = r; t < r + count; ++t) {
              nl::signed_codes_of_row(g.k.codes + t * g.k.row_bytes, dh, attrs_.kv_bits, g.k.row_bytes, g.k.scale_kind,
                                      g.k.scales, t * nb, nb, kq + t * dh, ks + t * nb);
            }
          } else if (g.k.quantized) {
            k_rows.DequantizeRange(r, count, rows);
            QuantizeRows(rows, count, dh, kq + r * dh, ks + r * nb);
          } else {
            QuantizeRows(g.k.x + r * dh, count, dh, kq + r * dh, ks + r * nb);
          }
          if (value_codes) {
            ScalesOf(isa_, g.v.scale_kind, g.v.scales, r * value_nb, count * value_nb, false, v_scales + r * value_nb);
          } else if (g.v.quantized) {
            v_rows.DequantizeRange(r, count, v_float + r * dh);
          }
        }
      };
      const float* values = g.v.quantized ? v_float : g.v.x;

      // 2. K rows [begin, end) in BlockActMatMul's B layout, one batch per KV head: VNNI-packed or K-major
      // [dh, sk] / [nb, sk]. The packed form lives in the calling thread's own PackedB, whose storage
      // later calls reuse (a reference, so that the tasks on other threads read this one).
      vnni::PackedB& packed = CallPackedB();
      // pack_keys stores every key of every head: only the padding past sk is zeroed when every block
      // is of whole groups of 4 codes (as PackRows and PackCodeRows store them).
      if (vnni_dots) vnni::InitPackedB(packed, kv_heads, g.sk, dh, bs, dh % bs == 0 && bs % 4 == 0);
      auto key_row = [&](int64_t head, int64_t key) {  // storage row of key `key` of head b * Hkv + h
        return code_row(k_code_stride, g.kv_heads, g.sk, head / g.kv_heads, head % g.kv_heads, key);
      };
      auto pack_keys = [&](int64_t begin, int64_t end) {
        if (vnni_dots) {  // runs of keys inside one head, read H rows apart when packed
          for (int64_t r = begin; r < end;) {
            const int64_t head = r / g.sk, key = r % g.sk;
            int64_t count = std::min(end - r, g.sk - key);
            const int64_t src = key_row(head, key);
            const int64_t past = pack_copies ? g.step_dims.past : 0;
            if (key < past) {  // past rows: read from the past cache, copied to the present one as packed
              count = std::min(count, past - key);
              vnni::PackCodeRows(packed, head, key, count, step.past_k.codes + (head * past + key) * dh, ks + src * nb,
                                 static_cast<uint8_t*>(step.present.k) + src * dh);
            } else if (pack_codes) {
              vnni::PackCodeRows(packed, head, key, count, g.k.codes + src * dh, ks + src * nb);
            } else {
              vnni::PackRows(packed, head, key, count, kq + src * dh, ks + src * nb, g.packed ? k_code_stride : 1);
            }
            r += count;
          }
          return;
        }
        for (int64_t r = begin; r < end; ++r) {
          const int64_t head = r / g.sk, key = r % g.sk, src = key_row(head, key);
          int8_t* col = k_major + head * dh * g.sk + key;
          for (int64_t d = 0; d < dh; ++d) col[d * g.sk] = kq[src * dh + d];
          float* sc = k_major_scales + head * nb * g.sk + key;
          for (int64_t b = 0; b < nb; ++b) sc[b * g.sk] = ks[src * nb + b];
        }
      };

      // 3. Query tasks [begin, end): runs of up to 16 query rows inside one (batch, query head); or, for a
      // decoder step with the heads together, the query heads of one KV head, as rows 0.. of one run (one
      // query row sees all sk keys even when causal, and the mask row does not move), so the group's rows
      // share each load of K and V; task t is then KV head t. Either way every row runs the same
      // operations: the same bits.
      const int64_t heads_per_task = heads_together ? per_group : 1;
      const int64_t run = heads_together ? per_group : std::max<int64_t>(1, std::min<int64_t>(g.sq, 16));
      const int64_t runs_per_head = heads_together ? 1 : (g.sq + run - 1) / run;
      const int64_t tasks = g.batch * (g.q_heads / heads_per_task) * runs_per_head;
      auto run_tasks = [&](int64_t begin, int64_t end) {
        cpu::ScratchPlan task_plan;
        const size_t at_dots = task_plan.Add<float>(run * g.sk);
        const size_t at_acc = task_plan.Add<int32_t>(vnni_dots ? 0 : g.sk);
        const size_t at_scratch = task_plan.Add<uint8_t>(vnni_dots ? 4 * nb * packed.groups * 4 : 0);
        uint8_t* task_base = task_plan.Carve<cpu::ScratchSlot::kAttentionTask>();
        float* dots = cpu::ScratchPlan::At<float>(task_base, at_dots);
        int32_t* acc = cpu::ScratchPlan::At<int32_t>(task_base, at_acc);
        uint8_t* scratch = cpu::ScratchPlan::At<uint8_t>(task_base, at_scratch);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t head_index = (task / runs_per_head) * heads_per_task;  // b * Hq + h (first head)
          const int64_t b = head_index / g.q_heads, h = head_index % g.q_heads;
          const int64_t i0 = (task % runs_per_head) * run;
          const int64_t rows = heads_together ? per_group : std::min(run, g.sq - i0);
          const int64_t kv_h = h / per_group, kv_head = b * g.kv_heads + kv_h;
          const int64_t row = code_row(q_code_stride, g.q_heads, g.sq, b, h, i0);
          const int8_t* q_codes = qq + row * dh;
          const float* q_scales = qs + row * nb;
          const int64_t q_step = g.packed ? q_code_stride : 1;  // rows between the run's query rows
          if (vnni_dots) {
            vnni::DotRows(packed, kv_head, q_codes, q_scales, rows, scratch, dots, g.sk, q_step);
          } else {
            for (int64_t r = 0; r < rows; ++r) {
              kernels_.act_dot_row(q_codes + r * q_step * dh, q_scales + r * q_step * nb, k_major + kv_head * dh * g.sk,
                                   k_major_scales + kv_head * nb * g.sk, g.sk, dh, bs, nb, acc, dots + r * g.sk);
            }
          }
          const int64_t key0 = code_row(k_code_stride, g.kv_heads, g.sk, b, kv_h, 0);
          nl::AttentionKeys kv;  // the dots are given: attention_rows reads no key codes (none with pack_codes)
          kv.codes = pack_codes ? nullptr : kq + key0 * dh;
          kv.scales = ks + key0 * nb;
          if (value_codes) {  // a decoder step (never packed): V's codes, read a tile at a time
            kv.values = nullptr;
            kv.value_codes = g.v.codes + key0 * dh;
            if (values_from_past) {  // past rows from the past cache [B * Hkv, past, dh], the new row after
              const int64_t past = g.step_dims.past;
              kv.value_codes = step.past_v.codes + kv_head * past * dh;
              kv.value_codes_rest = g.v.codes + (key0 + past) * dh;
              kv.value_codes_split = past;
            }
            kv.value_scales = v_scales + key0 * value_nb;
            kv.value_nb = value_nb;
            kv.value_block_size = attrs_.kv_block_size;
          } else {
            kv.values = values + (g.packed ? b * g.sk * g.v_stride + kv_h : key0) * dh;
          }
          kv.dh = dh;
          kv.nb = nb;
          kv.block_size = bs;
          kv.key_step = g.packed ? k_code_stride : 1;
          kv.value_step = g.packed ? g.v_stride : 1;
          const float* mask = g.mask != nullptr ? g.mask + b * g.mask_strides[0] + h * g.mask_strides[1] : nullptr;
          // Y rows of the run: consecutive positions (H * Dh floats apart when packed), or with the heads
          // together consecutive heads of position 0, Dh floats apart in either layout.
          const int64_t y_row = nl::attention_row_index(y_packed, g.q_heads, g.sq, b, h, i0);
          const int64_t y_stride = y_packed && !heads_together ? g.q_heads * dh : dh;
          kernels_.attention_rows(nullptr, nullptr, dots, rows, i0, g.sq, g.sk, attrs_.causal, kv, attrs_.scale, mask,
                                  g.mask_strides[2], g.mask_strides[3], y_out + y_row * dh, y_stride);
        }
      };

      // Each parallel loop hands out at least ~kMinTaskValues values of work per task: smaller loops cost
      // less than waking the thread pool does, and run on this thread.
      if (heads_together) {
        // A decoder step in one parallel section of kKeyChunks tasks per KV head, each appending, preparing
        // and packing a chunk of its keys; the task that completes a head's last chunk then runs that head's
        // query rows (the counter's acquire-release makes the other chunks' keys visible to it). So two
        // threads share 3 KV heads evenly where a task per head would leave one idle a third of the time.
        constexpr int64_t kKeyChunks = 2;
        auto* chunks_done = cpu::ScratchPlan::At<std::atomic<int32_t>>(base, at_chunks_done);
        for (int64_t h = 0; h < kv_heads; ++h) new (chunks_done + h) std::atomic<int32_t>(0);
        const int64_t chunk_work = std::max<int64_t>(1, g.sk * dh * (per_group + 2) / kKeyChunks);
        // A head's chunk c starts at the multiple of 16 keys nearest c * sk / kKeyChunks: the packed keys
        // of a chunk then start at a whole strip of 16 columns (cache lines stored whole).
        auto chunk_start = [&](int64_t c) {
          return c == kKeyChunks ? g.sk : std::min(g.sk, (g.sk * c / kKeyChunks + 8) / 16 * 16);
        };
        ParallelFor(ctx, kv_heads * kKeyChunks, std::max<int64_t>(1, kMinTaskValues / chunk_work), [&](int64_t b, int64_t e) {
          for (int64_t unit = b; unit < e; ++unit) {
            const int64_t head = unit / kKeyChunks, chunk = unit % kKeyChunks;
            const int64_t first = head * g.sk + chunk_start(chunk);
            const int64_t last = head * g.sk + chunk_start(chunk + 1);
            if (g.step) AppendRows(g, step, first, last, !pack_copies, values_from_past);
            prepare_keys(first, last);
            pack_keys(first, last);
            if (chunks_done[head].fetch_add(1, std::memory_order_acq_rel) == kKeyChunks - 1) run_tasks(head, head + 1);
          }
        });
      } else {
        if (!qk_together) {  // (with Q and K together, the keys are quantized and V is float32 rows)
          ParallelFor(ctx, kv_rows, std::max(group, kMinTaskValues / dh), [&](int64_t b, int64_t e) { prepare_keys(b, e); });
        }
        ParallelFor(ctx, kv_rows, 2 * kMinTaskValues / dh, [&](int64_t b, int64_t e) { pack_keys(b, e); });
        const int64_t work = std::max<int64_t>(1, g.sk * dh * run);
        ParallelFor(ctx, tasks, std::max<int64_t>(1, 4 * kMinTaskValues / work), [&](int64_t b, int64_t e) { run_tasks(b, e); });
      }
      cpu::ScratchPlan::Trim<cpu::ScratchSlot::kAttentionCall>();
      if (packed.codes.capacity() > cpu::kKeptScratchBytes) packed = vnni::PackedB();
    });
  }

 private:
  // A step's present cache (outputs 1..4) and the past it copies (inputs 1..6).
  struct StepCache {
    AttentionPresent present;
    AttentionKV past_k, past_v;
    int64_t row_nbytes = 0, scale_nbytes = 0;  // one cache row's bytes, and its scales' bytes (codes)
  };

  // The step (inputs 8..11): Q's rows heads first with rotary into q_rows_out; the present cache
  // outputs, which g then reads as a plain BlockAttention reads K and V (AppendRows fills them: the
  // past's rows followed by the new ones).
  StepCache BeginStep(Ort::KernelContext& ctx, AttentionGeometry* gp, float* q_rows_out) const {
    AttentionGeometry& g = *gp;
    StepCache c;
    c.present = PresentOutputs(ctx, node_, g);
    c.past_k = g.k;
    c.past_v = g.v;
    const bool codes = g.k.quantized;
    c.row_nbytes = codes ? g.k.row_bytes : g.dh * static_cast<int64_t>(sizeof(float));
    c.scale_nbytes = codes ? g.k.num_blocks * static_cast<int64_t>(ScaleItemSize(g.k.scale_kind)) : 0;
    const int64_t q_rows = g.batch * g.q_heads * g.sq;
    for (int64_t r = 0; r < q_rows; ++r) {
      nl::step_input_row(g.step_dims, g.q, g.q_heads, r, true, g.cos, g.sin, q_rows_out + r * g.dh);
    }
    g.q = q_rows_out;
    for (AttentionKV* kv : {&g.k, &g.v}) {
      const bool is_k = kv == &g.k;
      if (codes) {
        kv->codes = static_cast<const uint8_t*>(is_k ? c.present.k : c.present.v);
        kv->scales = is_k ? c.present.k_scales : c.present.v_scales;
      } else {
        kv->x = static_cast<const float*>(is_k ? c.present.k : c.present.v);
      }
    }
    return c;
  }

  // Present rows [begin, end) of [B * Hkv, Sk] of K and V: a past row copied, a new row rotated (K) and
  // quantized when the cache holds codes. Any ranges that tile the rows give the same bytes.
  // Without past_k_codes, K's past codes are left to the caller (pack_keys copies them as it packs them);
  // with stream_v, V's past codes are stored non-temporally (StreamCopy).
  void AppendRows(const AttentionGeometry& g, const StepCache& c, int64_t begin, int64_t end,
                  bool past_k_codes = true, bool stream_v = false) const {
    const nl::AttentionStepDims& d = g.step_dims;
    const int64_t dh = g.dh, rb = c.row_nbytes, sb = c.scale_nbytes;
    const bool codes = g.k.quantized;
    float* row = cpu::ThreadScratch<float, cpu::ScratchSlot::kAttentionTask>(static_cast<size_t>(dh));
    for (int64_t t = begin; t < end;) {
      const int64_t bh = t / g.sk, j0 = t % g.sk;
      const int64_t j1 = std::min(g.sk, j0 + (end - t));  // this head's rows [j0, j1)
      const int64_t copied = std::max<int64_t>(0, std::min(j1, d.past) - j0);  // past rows among them
      for (int which = 0; which < 2; ++which) {
        const AttentionKV& past = which == 0 ? c.past_k : c.past_v;
        const float* fresh = which == 0 ? g.k_new : g.v_new;
        auto* dst = static_cast<uint8_t*>(which == 0 ? c.present.k : c.present.v);
        auto* dst_scales = static_cast<uint8_t*>(which == 0 ? c.present.k_scales : c.present.v_scales);
        if (copied > 0) {
          const auto* src = (codes ? past.codes : reinterpret_cast<const uint8_t*>(past.x)) + (bh * d.past + j0) * rb;
          if (which == 1 && stream_v) {
            StreamCopy(dst + t * rb, src, copied * rb);
          } else if (which == 1 || past_k_codes) {
            std::copy(src, src + copied * rb, dst + t * rb);
          }
          if (codes) {
            const auto* src_scales = static_cast<const uint8_t*>(past.scales) + (bh * d.past + j0) * sb;
            std::copy(src_scales, src_scales + copied * sb, dst_scales + t * sb);
          }
        }
        for (int64_t j = j0 + copied; j < j1; ++j) {  // new rows: position i = j - past
          const int64_t present_row = bh * g.sk + j;
          nl::step_input_row(d, fresh, g.kv_heads, bh * g.sq + (j - d.past), which == 0, g.cos, g.sin, row);
          if (codes) {
            nl::quantize_cache_row(row, dh, attrs_.kv_bits, attrs_.kv_block_size, g.k.scale_kind, rb,
                                   dst + present_row * rb, dst_scales, present_row * g.k.num_blocks);
          } else {
            std::copy(row, row + dh, reinterpret_cast<float*>(dst) + present_row * dh);
          }
        }
      }
      t += j1 - j0;
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
