// BlockMatMul on CUDAExecutionProvider (docs/ops.md, ops/matmul_io.h): the validation of the CPU
// kernel, then the launcher of cuda/matmul.cu on the stream ONNX Runtime gives the kernel.
#include "bct/op_common.h"
#include "device_bytes.h"
#include "matmul_launch.h"
#include "ops/coded_codes.h"
#include "ops/matmul_io.h"
#include "ops/ops.h"
#include "ops/packed_zero_points.h"

namespace bct {
namespace matmul_op {
namespace {

class MatMulCudaKernel {
 public:
  MatMulCudaKernel(const OrtKernelInfo* info, const NodeRef& node) : node_(node), attrs_(ReadMatMulAttrs(info, node)) {
    if (ReadCodesCoded(info, node_)) {  // decoded on the host once, then kept on the device
      const DecodedCodes decoded =
          DecodeConstantCodes(info, node_, kCodes, "W_codes", attrs_.block.bits, attrs_.N, attrs_.K());
      CheckLaunch(node_, device_codes_.Upload(decoded.packed.data(), decoded.packed.size()));
      coded_view_ = decoded.view;
      coded_view_.data = device_codes_.data();
      coded_ = true;
    }
    if (ReadZeroPointsPacked(info, node_, attrs_.block.symmetric)) {  // unpacked on the host once, then kept on the device
      const UnpackedZeroPoints unpacked =
          UnpackConstantZeroPoints(info, node_, kZeroPoints, "W_zero_points", kScales, "W_scales", attrs_.block.bits);
      CheckLaunch(node_, device_zero_points_.Upload(unpacked.values.data(), unpacked.values.size()));
      zero_points_view_ = unpacked.view;
      zero_points_view_.data = device_zero_points_.data();
      zero_points_packed_ = true;
    }
  }

  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const MatMulCall call = PrepareCall(ctx, node_, attrs_, coded_ ? &coded_view_ : nullptr,
                                          zero_points_packed_ ? &zero_points_view_ : nullptr);
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
  bool coded_ = false;         // W_codes entropy-coded: decoded into device_codes_ at creation
  cuda::DeviceBytes device_codes_;
  InputTensor coded_view_;     // device_codes_ as the W_codes every call validates and reads
  bool zero_points_packed_ = false;  // W_zero_points packed at the code width: unpacked into device_zero_points_
  cuda::DeviceBytes device_zero_points_;
  InputTensor zero_points_view_;  // device_zero_points_ as the W_zero_points every call validates and reads
};
}  // namespace
}  // namespace matmul_op

void AppendMatMulCudaOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<matmul_op::MatMulSchema, matmul_op::MatMulCudaKernel> op(kCudaProvider);
  domain.Add(&op);
}

}  // namespace bct
