// BlockGelu, BlockSilu, BlockSoftmax, BlockLayerNorm, BlockRMSNorm, BlockAddLayerNorm,
// BlockAddRMSNorm and BlockActMatMul on
// CUDAExecutionProvider. Validation is the CPU kernels' (ops/nonlinear_io.h, ops/nonlinear_families.h,
// ops/act_matmul_io.h); the work is done by the launchers of gelu.cu, silu.cu, softmax.cu, norm.cu,
// nonlinear_rows.cu and act_matmul.cu on the stream ONNX Runtime gives the kernel.
#include <string>
#include <vector>

#include "bct/op_common.h"
#include "nonlinear_launch.h"
#include "ops/act_matmul_io.h"
#include "ops/block_io.h"
#include "ops/nonlinear_families.h"
#include "ops/ops.h"
#include "ops/nonlinear_io.h"

namespace bct {
namespace nonlinear {
namespace {

// The encoded sides (cuda::OperandIo) of RowOpArgs and ActMatMulArgs.
void SetInput(cuda::OperandIo& args, const OperandAttrs& attrs, const Operand& x) {
  args.in_quantized = x.quantized;
  if (x.quantized) {
    args.in_fmt = OperandRowFormat<cuda::RowFormat>(attrs, x, x.axis_size);
    args.in_codes = x.codes;
    args.in_scales = x.scales;
    args.in_zero_points = x.zero_points;
  }
}

void SetResult(cuda::OperandIo& args, const ResultAttrs& attrs, const Result& r) {
  args.out_quantized = r.quantized;
  args.y = r.y;
  if (r.quantized) {
    args.out_fmt = ResultRowFormat<cuda::RowFormat>(attrs, r);
    args.out_codes = r.codes;
    args.out_scales = r.scales;
    args.out_zero_points = r.zero_points;
  }
}

// The family-specific part of the launch arguments.
void SetOp(cuda::RowOpArgs& args, const GeluFamily& family, const GeluFamily::Params&) {
  args.op = family.form == nl::GeluForm::kTanh ? cuda::RowOp::kGeluTanh : cuda::RowOp::kGeluErf;
}
void SetOp(cuda::RowOpArgs& args, const SiluFamily&, const SiluFamily::Params&) { args.op = cuda::RowOp::kSilu; }
void SetOp(cuda::RowOpArgs& args, const SoftmaxFamily&, const SoftmaxFamily::Params&) { args.op = cuda::RowOp::kSoftmax; }
void SetOp(cuda::RowOpArgs& args, const LayerNormFamily& family, const LayerNormFamily::Params& p) {
  args.op = cuda::RowOp::kLayerNorm;
  args.scale = p.scale;
  args.bias = p.bias;
  args.epsilon = family.epsilon;
}
void SetOp(cuda::RowOpArgs& args, const RMSNormFamily& family, const RMSNormFamily::Params& p) {
  args.op = cuda::RowOp::kRMSNorm;
  args.scale = p.scale;
  args.epsilon = family.epsilon;
}

void SetOp(cuda::RowOpArgs& args, const AddLayerNormFamily& family, const AddLayerNormFamily::Params& p) {
  args.op = cuda::RowOp::kLayerNorm;
  args.scale = p.scale;
  args.bias = p.bias;
  args.epsilon = family.epsilon;
  args.skip = p.add.skip;
  args.skip_rows = p.add.skip_rows;
  args.sum = p.add.sum;
}
void SetOp(cuda::RowOpArgs& args, const AddRMSNormFamily& family, const AddRMSNormFamily::Params& p) {
  args.op = cuda::RowOp::kRMSNorm;
  args.scale = p.scale;
  args.epsilon = family.epsilon;
  args.skip = p.add.skip;
  args.skip_rows = p.add.skip_rows;
  args.sum = p.add.sum;
}

template <class Family>
class RowOpCudaKernel : public RowOpKernelBase<Family> {
 public:
  using RowOpKernelBase<Family>::RowOpKernelBase;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(this->node_, [&] {
      Ort::KernelContext ctx(context);
      const typename RowOpKernelBase<Family>::Call call = this->Prepare(ctx);
      const Operand& x = call.x;
      const Result& r = call.r;
      cuda::RowOpArgs args;
      SetOp(args, this->family_, call.params);
      args.rows = x.rows;
      args.d = x.axis_size;
      args.x = x.x;
      SetInput(args, this->in_, x);
      SetResult(args, this->out_, r);
      CheckLaunch(this->node_, cuda::LaunchRowOp(args, ctx.GetGPUComputeStream()));
    });
  }
};

class ActMatMulCudaKernel : public ActMatMulKernelBase {
 public:
  using ActMatMulKernelBase::ActMatMulKernelBase;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const Call call = Prepare(ctx);
      const Operand& a = call.a;
      const ActMatMulGeometry& g = call.g;
      const Result& r = call.r;
      const InputTensor b = GetInput(ctx, 3);
      cuda::ActMatMulArgs args;
      args.act_bits = attrs_.act_bits;
      args.block_size = attrs_.block_size;
      args.transpose_b = attrs_.transpose_b;
      args.m = g.m;
      args.k = g.k;
      args.n = g.n;
      args.a_batches = g.a_batches;
      args.b_batches = g.b_batches;
      args.out_batches = g.out_batches;
      // Broadcast strides of A's and B's batch dims against the output's.
      const size_t rank = g.out_shape.size() - 2;
      if (rank > static_cast<size_t>(cuda::kMaxBatchRank)) {
        node_.Fail("CUDA kernel supports at most " + std::to_string(cuda::kMaxBatchRank) + " batch dims, got " +
                   std::to_string(rank));
      }
      args.batch_rank = static_cast<int>(rank);
      const size_t a_rank = a.shape.size() - 2, b_rank = b.shape.size() - 2;
      int64_t a_stride = 1, b_stride = 1;
      for (size_t i = rank; i-- > 0;) {
        const int64_t out_dim = g.out_shape[i];
        const int64_t a_dim = i >= rank - a_rank ? a.shape[i - (rank - a_rank)] : 1;
        const int64_t b_dim = i >= rank - b_rank ? b.shape[i - (rank - b_rank)] : 1;
        args.out_dims[i] = out_dim;
        args.a_strides[i] = a_dim == 1 ? 0 : a_stride;
        args.b_strides[i] = b_dim == 1 ? 0 : b_stride;
        a_stride *= a_dim;
        b_stride *= b_dim;
      }
      args.a = a.x;
      SetInput(args, in_, a);
      args.b = g.b;
      SetResult(args, out_, r);
      CheckLaunch(node_, cuda::LaunchActMatMul(args, ctx.GetGPUComputeStream()));
    });
  }
};

}  // namespace
}  // namespace nonlinear

void AppendNonlinearCudaOps(Ort::CustomOpDomain& domain) {
  using namespace nonlinear;  // NOLINT: the families, schemas and kernels of this file
  static BlockCustomOp<RowOpSchema<GeluFamily>, RowOpCudaKernel<GeluFamily>> gelu(kCudaProvider);
  static BlockCustomOp<RowOpSchema<SiluFamily>, RowOpCudaKernel<SiluFamily>> silu(kCudaProvider);
  static BlockCustomOp<RowOpSchema<SoftmaxFamily>, RowOpCudaKernel<SoftmaxFamily>> softmax(kCudaProvider);
  static BlockCustomOp<RowOpSchema<LayerNormFamily>, RowOpCudaKernel<LayerNormFamily>> layer_norm(kCudaProvider);
  static BlockCustomOp<RowOpSchema<RMSNormFamily>, RowOpCudaKernel<RMSNormFamily>> rms_norm(kCudaProvider);
  static BlockCustomOp<RowOpSchema<AddLayerNormFamily>, RowOpCudaKernel<AddLayerNormFamily>> add_layer_norm(
      kCudaProvider);
  static BlockCustomOp<RowOpSchema<AddRMSNormFamily>, RowOpCudaKernel<AddRMSNormFamily>> add_rms_norm(kCudaProvider);
  static BlockCustomOp<ActMatMulSchema, ActMatMulCudaKernel> act_matmul(kCudaProvider);
  domain.Add(&gelu);
  domain.Add(&silu);
  domain.Add(&softmax);
  domain.Add(&layer_norm);
  domain.Add(&rms_norm);
  domain.Add(&add_layer_norm);
  domain.Add(&add_rms_norm);
  domain.Add(&act_matmul);
}

}  // namespace bct
