// BlockMatMul on CUDAExecutionProvider (docs/ops.md, ops/matmul_io.h): the validation of the CPU
// kernel, then the launcher of cuda/matmul.cu on the stream ONNX Runtime gives the kernel.
#include "bct/op_common.h"
#include "matmul_launch.h"
#include "ops/matmul_io.h"
#include "ops/ops.h"

namespace bct {
namespace matmul_op {
namespace {

class MatMulCudaKernel {
 public:
  MatMulCudaKernel(const OrtKernelInfo* info, const NodeRef& node) : node_(node), attrs_(ReadMatMulAttrs(info, node)) {}

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const MatMulCall call = PrepareCall(ctx, node_, attrs_);
      const Activation& a = call.a;
      const nonlinear::Result& r = call.r;
      const InputTensor& codes = call.codes;
      const InputTensor& scales = call.scales;
      const InputTensor& zero_points = call.zero_points;
      const InputTensor& bias = call.bias;
      const ScaleKind kind = call.weight_scale_kind;
      if (a.rows == 0) return;
      const cuda::MatMulParams params{attrs_.K(),          attrs_.N,          attrs_.block.bits,
                                      attrs_.block.block_size, attrs_.block.symmetric, attrs_.act_bits,
                                      static_cast<int>(kind),  attrs_.row_bytes(), attrs_.num_blocks(),
                                      static_cast<int>(call.weight_zero_point_kind)};
      cuda::MatMulIo io;
      io.a = a.x;
      io.a_codes = a.codes;
      io.a_scales = a.scales;
      io.a_zero_points = a.zero_points;
      io.own_format = IsOwnActivationFormat(attrs_, a);
      io.in_fmt = nonlinear::OperandRowFormat<cuda::RowFormat>(attrs_.in, a, attrs_.K());
      io.epilogue = attrs_.epilogue;
      io.y = r.y;
      io.out_quantized = r.quantized;
      io.out_fmt = nonlinear::ResultRowFormat<cuda::RowFormat>(attrs_.out, r);
      io.out_codes = r.codes;
      io.out_scales = r.scales;
      io.out_zero_points = r.zero_points;
      CheckLaunch(node_, cuda::LaunchBlockMatMulIo(params, io, a.rows, codes.As<uint8_t>(), scales.data,
                                                   zero_points.present ? static_cast<const uint8_t*>(zero_points.data)
                                                                       : nullptr,
                                                   bias.present ? bias.As<float>() : nullptr,
                                                   ctx.GetGPUComputeStream()));
    });
  }

 private:
  NodeRef node_;
  MatMulAttrs attrs_;
};
}  // namespace
}  // namespace matmul_op

void AppendMatMulCudaOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<matmul_op::MatMulSchema, matmul_op::MatMulCudaKernel> op(kCudaProvider);
  domain.Add(&op);
}

}  // namespace bct
