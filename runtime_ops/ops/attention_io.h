// BlockAttention (docs/ops.md): attributes, validation and shape inference shared by its CPU and
// CUDA kernels. Inputs: 0 Q float32 [B, Hq, Sq, Dh]; 1..3 K (float32 [B, Hkv, Sk, Dh], or with
// kv_bits > 0 uint8 codes [B, Hkv, Sk, row_bytes(Dh)], scales [B, Hkv, Sk, nb] of any scale kind
// and zero points iff kv_symmetric = 0); 4..6 V in the same form as K; 7 an optional float32 additive
// mask broadcastable to [B, Hq, Sq, Sk]. Output: float32 [B, Hq, Sq, Dh].
// The decoder step: with 8 K_new and 9 V_new (float32), inputs 1..6 are the past cache, the op
// appends the new rows (quantized when the cache holds codes) and emits the present cache as outputs
// 1 K, 2 V and, with codes, 3 K scales, 4 V scales; 10 cos and 11 sin [Bc, Sq, R] or
// [Bc, 1, Sq, R] apply rotary to Q and K_new first; Q, K_new, V_new and Y may be [B, S, H * Dh]
// (attribute q_heads gives Hq; Hkv is the past's).
// Without the step, a Q of rank 3 [B, Sq, Hq * Dh] (q_heads gives Hq) takes float32 K and V
// [B, Sk, Hkv * Dh] (Hkv = their last dim / Dh) and gives Y [B, Sq, Hq * Dh]: an encoder's head
// split / merge in the op. With attribute kv_heads and K absent, Q's tensor is [B, S, (Hq + Hkv) * Dh]
// holding K's heads after Q's (V given as [B, S, Hkv * Dh]), or with V absent too
// [B, S, (Hq + 2 Hkv) * Dh] holding Q, K, V: one packed projection read in place.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bct/attention_math.h"
#include "bct/op_common.h"
#include "ops/act_matmul_io.h"
#include "ops/block_io.h"
#include "ops/nonlinear_families.h"
#include "ops/nonlinear_io.h"

namespace bct {
namespace nonlinear {

struct AttentionAttrs {
  int act_bits = 8;
  int64_t block_size = 32;
  float scale = 1.0f;
  bool causal = false;
  int kv_bits = 0;  // 0: K and V are float32
  int64_t kv_block_size = 0;
  bool kv_symmetric = true;
  int64_t q_heads = 0;  // > 0: Q may be [B, Sq, q_heads * Dh]
  int64_t kv_heads = 0;  // > 0 with K absent: K (and V when absent) are heads of Q's tensor
};

inline AttentionAttrs ReadAttentionAttrs(const OrtKernelInfo* info, const NodeRef& node) {
  AttentionAttrs a;
  ReadActFormat(info, node, &a.act_bits, &a.block_size);
  a.scale = AttrFloat(info, "scale", 1.0f);
  if (!(a.scale == a.scale) || a.scale == 1.0f / 0.0f || a.scale == -1.0f / 0.0f) {
    node.Fail("attribute 'scale' must be finite");
  }
  a.causal = ReadFlag(info, node, "causal", 0);
  const int64_t kv_bits = AttrInt(info, "kv_bits", 0);
  CheckBitsAttr(node, "kv_bits", kv_bits);
  a.kv_bits = static_cast<int>(kv_bits);
  a.kv_symmetric = ReadFlag(info, node, "kv_symmetric", 1);
  a.q_heads = AttrInt(info, "q_heads", 0);
  if (a.q_heads < 0) node.Fail("attribute 'q_heads' must be >= 0, got " + std::to_string(a.q_heads));
  a.kv_heads = AttrInt(info, "kv_heads", 0);
  if (a.kv_heads < 0) node.Fail("attribute 'kv_heads' must be >= 0, got " + std::to_string(a.kv_heads));
  if (a.kv_heads > 0 && a.q_heads < 1) node.Fail("attribute 'kv_heads' needs attribute 'q_heads'");
  if (a.kv_bits > 0) {
    a.kv_block_size = AttrInt(info, "kv_block_size", 0);
    if (a.kv_block_size < 1 || a.kv_block_size > kMaxActBlockSize) {
      node.Fail("attribute 'kv_block_size' must be in 1.." + std::to_string(kMaxActBlockSize) +
                " when kv_bits > 0, got " + std::to_string(a.kv_block_size));
    }
  }
  return a;
}

// K or V of one call: float rows, or packed codes along Dh.
struct AttentionKV {
  bool quantized = false;
  const float* x = nullptr;
  const uint8_t* codes = nullptr;
  const void* scales = nullptr;
  const uint8_t* zero_points = nullptr;
  ScaleKind scale_kind = ScaleKind::kFloat32;
  int64_t row_bytes = 0;
  int64_t num_blocks = 0;
};

struct AttentionGeometry {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, sq = 0, sk = 0, dh = 0;
  const float* q = nullptr;
  AttentionKV k, v;  // with a step: the past cache (sk counts past and new rows)
  bool packed = false;  // no step; Q, K, V and Y are [B, S, H * Dh]
  // packed: rows of Dh between consecutive positions of Q, K and V (their heads, or more when they
  // are parts of one packed projection, attribute kv_heads)
  int64_t q_stride = 0, k_stride = 0, v_stride = 0;
  bool k_in_q = false;  // K's heads follow Q's in one tensor (attribute kv_heads, K absent)
  const float* mask = nullptr;
  int64_t mask_strides[4] = {0, 0, 0, 0};  // elements per step of b, h, i, j (0: broadcast)
  // The decoder step (inputs 8..11): new keys / values, rotary tables.
  bool step = false;
  nl::AttentionStepDims step_dims{};
  const float* k_new = nullptr;
  const float* v_new = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  std::vector<int64_t> y_shape;
};

// K or V: [B, Hkv, Sk, Dh] (or its codes), or with packed float32 [B, Sk, Hkv * Dh]; *shape gets
// [B, Hkv, Sk, last dim] either way.
inline AttentionKV ReadAttentionKV(const Ort::KernelContext& ctx, const NodeRef& node, const AttentionAttrs& attrs,
                                   size_t first, const char* name, int64_t batch, int64_t dh, bool packed,
                                   std::vector<int64_t>* shape) {
  const std::string scales_name = std::string(name) + "_scales";
  const std::string zp_name = std::string(name) + "_zero_points";
  const InputTensor x = GetInput(ctx, first);
  const InputTensor scales = GetInput(ctx, first + 1);
  const InputTensor zero_points = GetInput(ctx, first + 2);
  AttentionKV kv;
  if (!x.present) node.Fail(std::string("input '") + name + "' is required");
  if (packed) {
    if (attrs.kv_bits != 0) {
      node.Fail(std::string("input '") + name + "' [B, S, H * Dh] (Q of rank 3, no step) must be float32: kv_bits must be 0");
    }
    if (scales.present || zero_points.present) {
      node.Fail("inputs '" + scales_name + "' and '" + zp_name + "' must be absent (empty names) when Q has rank 3");
    }
    ExpectDtype(node, name, x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (x.shape.size() != 3 || x.shape[0] != batch || x.shape[2] % dh != 0 || x.shape[2] == 0) {
      node.Fail(std::string("input '") + name + "' must be [B " + std::to_string(batch) + ", S, H * Dh] with Dh " +
                std::to_string(dh) + " as Q has rank 3, got shape " + ShapeString(x.shape));
    }
    *shape = {x.shape[0], x.shape[2] / dh, x.shape[1], dh};
    kv.x = x.As<float>();
    return kv;
  }
  if (x.shape.size() != 4) node.Fail(std::string("input '") + name + "' must have rank 4, got shape " + ShapeString(x.shape));
  if (x.shape[0] != batch) {
    node.Fail(std::string("input '") + name + "' batch " + std::to_string(x.shape[0]) + " differs from Q's " +
              std::to_string(batch));
  }
  *shape = x.shape;
  if (attrs.kv_bits == 0) {
    ExpectDtype(node, name, x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (scales.present || zero_points.present) {
      node.Fail("inputs '" + scales_name + "' and '" + zp_name + "' must be absent (empty names) when kv_bits=0");
    }
    if (x.shape[3] != dh) {
      node.Fail(std::string("input '") + name + "' last dim must be Q's head size " + std::to_string(dh) + ", got shape " +
                ShapeString(x.shape));
    }
    kv.x = x.As<float>();
    return kv;
  }
  kv.quantized = true;
  ExpectDtype(node, name, x, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  kv.row_bytes = row_bytes(dh, attrs.kv_bits);
  kv.num_blocks = num_blocks(dh, attrs.kv_block_size);
  if (x.shape[3] != kv.row_bytes) {
    node.Fail(std::string("input '") + name + "' last dim must be row_bytes(Dh " + std::to_string(dh) + ", kv_bits " +
              std::to_string(attrs.kv_bits) + ") = " + std::to_string(kv.row_bytes) + ", got shape " +
              ShapeString(x.shape));
  }
  if (!scales.present) node.Fail("input '" + scales_name + "' is required when kv_bits > 0");
  kv.scale_kind = ScaleKindOfInput(scales, node, scales_name.c_str(), "pow2");
  const std::vector<int64_t> block_shape = {x.shape[0], x.shape[1], x.shape[2], kv.num_blocks};
  if (scales.shape != block_shape) {
    node.Fail("input '" + scales_name + "' must have shape " + ShapeString(block_shape) + ", got " +
              ShapeString(scales.shape));
  }
  if (attrs.kv_symmetric) {
    if (zero_points.present) node.Fail("input '" + zp_name + "' must be absent when kv_symmetric=1");
  } else {
    if (!zero_points.present) node.Fail("input '" + zp_name + "' is required when kv_symmetric=0");
    ExpectDtype(node, zp_name.c_str(), zero_points, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
    if (zero_points.shape != block_shape) {
      node.Fail("input '" + zp_name + "' must have shape " + ShapeString(block_shape) + ", got " +
                ShapeString(zero_points.shape));
    }
    kv.zero_points = zero_points.As<uint8_t>();
  }
  kv.codes = x.As<uint8_t>();
  kv.scales = scales.data;
  return kv;
}

// The step inputs 8..11 (g's Q and past K / V already read): new rows [B, Hkv, Sq, Dh] or
// [B, Sq, Hkv * Dh], rotary tables [Bc, Sq, R] or [Bc, 1, Sq, R].
inline void ReadAttentionStep(const Ort::KernelContext& ctx, const NodeRef& node, const AttentionAttrs& attrs,
                              bool packed, AttentionGeometry* g) {
  if (attrs.kv_bits > 0 && !attrs.kv_symmetric) node.Fail("the step inputs need a symmetric cache (kv_symmetric=1)");
  if (g->k.quantized && g->k.scale_kind == ScaleKind::kFloat8E5M2) {
    node.Fail("the step inputs need past scales of float16, float32 or uint8 pow2, not float8e5m2");
  }
  const std::vector<int64_t> new_shape =
      packed ? std::vector<int64_t>{g->batch, g->sq, g->kv_heads * g->dh} : std::vector<int64_t>{g->batch, g->kv_heads, g->sq, g->dh};
  const char* names[2] = {"K_new", "V_new"};
  const float* rows[2] = {nullptr, nullptr};
  for (size_t n = 0; n < 2; ++n) {
    const InputTensor x = GetInput(ctx, 8 + n);
    if (!x.present) node.Fail(std::string("input '") + names[n] + "' is required with 'K_new'");
    ExpectDtype(node, names[n], x, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (x.shape != new_shape) {
      node.Fail(std::string("input '") + names[n] + "' must have shape " + ShapeString(new_shape) + " (the queries' batch and " +
                "length, the past's heads), got " + ShapeString(x.shape));
    }
    rows[n] = x.As<float>();
  }
  g->k_new = rows[0];
  g->v_new = rows[1];
  nl::AttentionStepDims& d = g->step_dims;
  d = nl::AttentionStepDims{g->batch, g->q_heads, g->kv_heads, g->sq, g->sk, g->dh, packed, 0, 0};
  const InputTensor cos = GetInput(ctx, 10);
  const InputTensor sin = GetInput(ctx, 11);
  if (cos.present != sin.present) node.Fail("inputs 'cos' and 'sin' go together");
  if (cos.present) {
    ExpectDtype(node, "cos", cos, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    ExpectDtype(node, "sin", sin, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    if (cos.shape != sin.shape) node.Fail("inputs 'cos' " + ShapeString(cos.shape) + " and 'sin' " + ShapeString(sin.shape) + " differ");
    const std::vector<int64_t>& c = cos.shape;
    const bool rank4 = c.size() == 4 && c[1] == 1;
    const size_t lead = rank4 ? 2 : 1;
    if (!(c.size() == 3 || rank4) || (c[0] != 1 && c[0] != g->batch) || c[lead] != g->sq || c[lead + 1] < 2 ||
        c[lead + 1] % 2 != 0 || c[lead + 1] > g->dh) {
      node.Fail("input 'cos' must be [B or 1, Sq, R] or [B or 1, 1, Sq, R] with R even and <= Dh " + std::to_string(g->dh) +
                " (Sq " + std::to_string(g->sq) + "), got " + ShapeString(c));
    }
    d.rot = c[lead + 1];
    d.cos_batch_stride = c[0] == 1 ? 0 : g->sq * d.rot;
    g->cos = cos.As<float>();
    g->sin = sin.As<float>();
  }
  g->sk = d.past + g->sq;
}

inline AttentionGeometry CheckAttention(const Ort::KernelContext& ctx, const NodeRef& node,
                                        const AttentionAttrs& attrs) {
  AttentionGeometry g;
  const InputTensor q = GetInput(ctx, 0);
  if (!q.present) node.Fail("input 'Q' is required");
  ExpectDtype(node, "Q", q, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  const bool packed = q.shape.size() == 3;
  g.step = GetInput(ctx, 8).present;
  // K (and V) as heads of Q's tensor: an encoder's packed projection (attribute kv_heads).
  const bool k_in_q = packed && !g.step && !GetInput(ctx, 1).present && attrs.kv_heads > 0;
  const bool v_in_q = k_in_q && !GetInput(ctx, 4).present;
  if (packed) {
    g.packed = !g.step;
    if (attrs.q_heads < 1 || (!k_in_q && q.shape[2] % attrs.q_heads != 0) || q.shape[2] == 0) {
      node.Fail("input 'Q' [B, S, Hq * Dh] " + ShapeString(q.shape) + " needs attribute 'q_heads' dividing its last dim, got " +
                std::to_string(attrs.q_heads));
    }
    g.batch = q.shape[0];
    g.q_heads = attrs.q_heads;
    g.sq = q.shape[1];
    g.dh = q.shape[2] / attrs.q_heads;
  } else {
    if (q.shape.size() != 4) node.Fail("input 'Q' must have rank 4 [B, Hq, Sq, Dh] or 3 [B, Sq, Hq * Dh], got shape " + ShapeString(q.shape));
    g.batch = q.shape[0];
    g.q_heads = q.shape[1];
    g.sq = q.shape[2];
    g.dh = q.shape[3];
  }
  if (k_in_q) {  // Q's tensor holds Q's heads, then K's [, then V's]
    const int64_t heads = attrs.q_heads + (v_in_q ? 2 : 1) * attrs.kv_heads;
    if (q.shape[2] % heads != 0) {
      node.Fail("input 'Q' " + ShapeString(q.shape) + " holding Q" + (v_in_q ? ", K and V" : " and K") +
                " (K absent) needs a last dim divisible by " + std::to_string(heads) + " heads (q_heads " +
                std::to_string(attrs.q_heads) + ", kv_heads " + std::to_string(attrs.kv_heads) + ")");
    }
    g.dh = q.shape[2] / heads;
    g.q_stride = g.k_stride = heads;
  }
  if (g.dh < 1) node.Fail("input 'Q' head size must be >= 1, got shape " + ShapeString(q.shape));
  g.k_in_q = k_in_q;
  g.q = q.As<float>();
  g.y_shape = q.shape;
  if (k_in_q) g.y_shape[2] = attrs.q_heads * g.dh;
  std::vector<int64_t> k_shape, v_shape;
  if (k_in_q) {
    g.k.x = g.q + attrs.q_heads * g.dh;
    k_shape = {g.batch, attrs.kv_heads, g.sq, g.dh};
  } else {
    g.k = ReadAttentionKV(ctx, node, attrs, 1, g.step ? "past_K" : "K", g.batch, g.dh, g.packed, &k_shape);
  }
  if (v_in_q) {
    g.v.x = g.k.x + attrs.kv_heads * g.dh;
    v_shape = k_shape;
    g.v_stride = g.q_stride;
  } else {
    g.v = ReadAttentionKV(ctx, node, attrs, 4, g.step ? "past_V" : "V", g.batch, g.dh, g.packed, &v_shape);
  }
  if (k_shape != v_shape) {
    node.Fail("inputs 'K' " + ShapeString(k_shape) + " and 'V' " + ShapeString(v_shape) + " must have the same shape");
  }
  g.kv_heads = k_shape[1];
  g.sk = k_shape[2];
  if (g.packed && !k_in_q) {
    if (attrs.kv_heads > 0 && attrs.kv_heads != g.kv_heads) {
      node.Fail("attribute 'kv_heads' " + std::to_string(attrs.kv_heads) + " differs from K's heads " + std::to_string(g.kv_heads));
    }
    g.q_stride = g.q_heads;
    g.k_stride = g.kv_heads;
  }
  if (g.packed && !v_in_q) g.v_stride = g.kv_heads;
  if (g.step) ReadAttentionStep(ctx, node, attrs, packed, &g);
  if (g.kv_heads < 1 || g.q_heads % g.kv_heads != 0) {
    node.Fail("Q's heads " + std::to_string(g.q_heads) + " must be a multiple of K's heads " +
              std::to_string(g.kv_heads) + " (grouped-query attention)");
  }
  if (attrs.causal && g.sq > g.sk) {
    node.Fail("causal=1 needs Sq <= Sk (queries are the last Sq positions), got Sq " + std::to_string(g.sq) +
              ", Sk " + std::to_string(g.sk));
  }
  const InputTensor mask = GetInput(ctx, 7);
  if (mask.present) {
    ExpectDtype(node, "mask", mask, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    const int64_t full[4] = {g.batch, g.q_heads, g.sq, g.sk};
    if (mask.shape.size() > 4) node.Fail("input 'mask' must have rank <= 4, got shape " + ShapeString(mask.shape));
    const size_t offset = 4 - mask.shape.size();
    int64_t stride = 1;
    for (size_t i = 4; i-- > 0;) {
      const int64_t dim = i >= offset ? mask.shape[i - offset] : 1;
      if (dim != 1 && dim != full[i]) {
        node.Fail("input 'mask' " + ShapeString(mask.shape) + " does not broadcast to [B, Hq, Sq, Sk] = " +
                  ShapeString(std::vector<int64_t>(full, full + 4)));
      }
      g.mask_strides[i] = dim == 1 ? 0 : stride;
      stride *= dim;
    }
    g.mask = mask.As<float>();
  }
  return g;
}

// The present cache of a step (outputs 1 K, 2 V, 3 K scales, 4 V scales): [B, Hkv, past + Sq, *] in the
// past's types.
struct AttentionPresent {
  void* k = nullptr;  // float32 rows, or codes
  void* k_scales = nullptr;
  void* v = nullptr;
  void* v_scales = nullptr;
};

inline AttentionPresent PresentOutputs(Ort::KernelContext& ctx, const NodeRef& node, const AttentionGeometry& g) {
  const size_t needed = g.k.quantized ? 5 : 3;
  if (ctx.GetOutputCount() < needed) {
    node.Fail("the step inputs need the present cache outputs (" + std::to_string(needed - 1) +
              " after Y: K, V and with codes K scales, V scales)");
  }
  const int64_t width = g.k.quantized ? g.k.row_bytes : g.dh;
  const std::vector<int64_t> rows = {g.batch, g.kv_heads, g.sk, width};
  const std::vector<int64_t> blocks = {g.batch, g.kv_heads, g.sk, g.k.num_blocks};
  AttentionPresent p;
  p.k = ctx.GetOutput(1, rows).GetTensorMutableRawData();
  p.v = ctx.GetOutput(2, rows).GetTensorMutableRawData();
  if (g.k.quantized) {
    p.k_scales = ctx.GetOutput(3, blocks).GetTensorMutableRawData();
    p.v_scales = ctx.GetOutput(4, blocks).GetTensorMutableRawData();
  }
  return p;
}

struct AttentionSchema {
  static constexpr const char* kName = "BlockAttention";
  static constexpr size_t kInputCount = 12;
  static constexpr size_t kOutputCount = 5;
  // K and V may be parts of Q's tensor (attribute kv_heads); CheckAttention asks for them otherwise.
  static bool InputOptional(size_t index) { return index != 0; }
  static bool OutputOptional(size_t index) { return index > 0; }
  // The present cache's types follow the past's (set by InferOutputShape).
  static ONNXTensorElementDataType OutputType(size_t index) {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  static OrtStatusPtr ORT_API_CALL InferOutputShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept;
};

// What the CPU and CUDA kernels share: the node and its attributes (read at kernel creation).
class AttentionKernelBase {
 public:
  AttentionKernelBase(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), attrs_(ReadAttentionAttrs(info, node_)) {}

  static bool InputOnHost(size_t) { return false; }

 protected:
  // K codes usable as they are for the block dots: symmetric, in the op's blocks along Dh.
  bool KeyCodesDirect() const { return attrs_.kv_bits > 0 && attrs_.kv_symmetric && attrs_.kv_block_size == attrs_.block_size; }

  NodeRef node_;
  AttentionAttrs attrs_;
};

}  // namespace nonlinear
}  // namespace bct
