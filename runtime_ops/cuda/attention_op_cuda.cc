// BlockAttention on CUDAExecutionProvider. Validation is the CPU kernel's (ops/attention_io.h); the
// work is cuda/attention.cu's launcher on the stream ONNX Runtime gives the kernel.
#include <vector>

#include "attention_launch.h"
#include "bct/op_common.h"
#include "ops/attention_io.h"
#include "ops/block_io.h"
#include "ops/ops.h"

namespace bct {
namespace nonlinear {
namespace {

class AttentionCudaKernel : public AttentionKernelBase {
 public:
  using AttentionKernelBase::AttentionKernelBase;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const AttentionGeometry g = CheckAttention(ctx, node_, attrs_);
      float* y = ctx.GetOutput(0, g.y_shape).GetTensorMutableData<float>();
      cuda::AttentionArgs args;
      args.act_bits = attrs_.act_bits;
      args.block_size = attrs_.block_size;
      args.scale = attrs_.scale;
      args.causal = attrs_.causal;
      args.batch = g.batch;
      args.q_heads = g.q_heads;
      args.kv_heads = g.kv_heads;
      args.sq = g.sq;
      args.sk = g.sk;
      args.dh = g.dh;
      args.packed = g.packed;
      args.q_stride = g.q_stride;
      args.k_stride = g.k_stride;
      args.v_stride = g.v_stride;
      args.q = g.q;
      args.kv_quantized = g.k.quantized;
      args.k_direct = KeyCodesDirect();
      if (g.k.quantized) {
        args.kv_fmt = MakeRowFormat<cuda::RowFormat>(attrs_.kv_bits, attrs_.kv_block_size, attrs_.kv_symmetric,
                                                     g.k.scale_kind, g.dh, g.k.row_bytes, g.k.num_blocks);
      }
      args.k = g.k.x;
      args.k_codes = g.k.codes;
      args.k_scales = g.k.scales;
      args.k_zero_points = g.k.zero_points;
      args.v = g.v.x;
      args.v_codes = g.v.codes;
      args.v_scales = g.v.scales;
      args.v_zero_points = g.v.zero_points;
      args.mask = g.mask;
      for (int i = 0; i < 4; ++i) args.mask_strides[i] = g.mask_strides[i];
      if (!g.step) {
        args.y = y;
        CheckLaunch(node_, cuda::LaunchAttention(args, ctx.GetGPUComputeStream()));
        return;
      }
      const AttentionPresent present = PresentOutputs(ctx, node_, g);
      cuda::AttentionStepArgs s;
      s.dims = g.step_dims;
      s.q = g.q;
      s.k_new = g.k_new;
      s.v_new = g.v_new;
      s.cos = g.cos;
      s.sin = g.sin;
      s.codes = g.k.quantized;
      s.bits = attrs_.kv_bits;
      s.kv_block_size = attrs_.kv_block_size;
      s.scale_kind = static_cast<int>(g.k.scale_kind);
      s.row_bytes = g.k.row_bytes;
      s.num_blocks = g.k.num_blocks;
      s.past_k = g.k.quantized ? static_cast<const void*>(g.k.codes) : g.k.x;
      s.past_v = g.v.quantized ? static_cast<const void*>(g.v.codes) : g.v.x;
      s.past_k_scales = g.k.scales;
      s.past_v_scales = g.v.scales;
      s.present_k = present.k;
      s.present_v = present.v;
      s.present_k_scales = present.k_scales;
      s.present_v_scales = present.v_scales;
      CheckLaunch(node_, cuda::LaunchAttentionStep(args, s, y, ctx.GetGPUComputeStream()));
    });
  }
};

}  // namespace
}  // namespace nonlinear

void AppendAttentionCudaOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<nonlinear::AttentionSchema, nonlinear::AttentionCudaKernel> op(kCudaProvider);
  domain.Add(&op);
}

}  // namespace bct
