// BlockQuantize, BlockDequantize and BlockGather on CUDAExecutionProvider. Validation is shared
// with the CPU kernels (ops/block_io.h); the work is done by the launchers of block_kernels.cu on
// the stream ONNX Runtime gives the kernel. BlockGather takes its indices in host memory
// (OrtMemTypeCPUInput) so they are validated before anything is launched.
#include <string>
#include <vector>

#include "block_launch.h"
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/ops.h"

namespace bct {
namespace {

cuda::RowFormat ToCuda(const BlockAttrs& attrs, const RowsGeometry& g) {
  return cuda::RowFormat{attrs.bits, attrs.block_size, attrs.symmetric, static_cast<int>(g.scale_kind),
                         g.axis_size, g.row_bytes, g.num_blocks};
}

void CheckLaunch(const NodeRef& node, const char* error) {
  if (error != nullptr) node.Fail(std::string("CUDA error: ") + error, ORT_EP_FAIL);
}

class DequantizeCudaKernel {
 public:
  DequantizeCudaKernel(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), attrs_(ReadBlockAttrs(info, node_, "axis_size")) {}
  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor codes = GetInput(ctx, 0);
      const InputTensor scales = GetInput(ctx, 1);
      const InputTensor zero_points = GetInput(ctx, 2);
      const RowsGeometry g = CheckQuantizedRows(node_, attrs_, codes, scales, zero_points, /*table=*/false);
      float* y = GetOutput<float>(ctx, node_, 0, "Y", WithLastDim(codes.shape, g.axis_size),
                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      CheckLaunch(node_, cuda::LaunchDequantize(ToCuda(attrs_, g), codes.As<uint8_t>(), scales.data,
                                                zero_points.present ? zero_points.As<uint8_t>() : nullptr, g.rows, y,
                                                ctx.GetGPUComputeStream()));
    });
  }

 private:
  NodeRef node_;
  BlockAttrs attrs_;
};

class GatherCudaKernel {
 public:
  GatherCudaKernel(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), attrs_(ReadBlockAttrs(info, node_, "axis_size")) {}
  static bool InputOnHost(size_t index) { return index == 0; }  // indices

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor indices = GetInput(ctx, 0);
      const InputTensor codes = GetInput(ctx, 1);
      const InputTensor scales = GetInput(ctx, 2);
      const InputTensor zero_points = GetInput(ctx, 3);
      const RowsGeometry g = CheckQuantizedRows(node_, attrs_, codes, scales, zero_points, /*table=*/true);
      const std::vector<int64_t> rows = NormalizeIndices(node_, indices, codes.shape[0]);
      std::vector<int64_t> out_shape = indices.shape;
      out_shape.push_back(g.axis_size);
      float* y = GetOutput<float>(ctx, node_, 0, "Y", out_shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      CheckLaunch(node_, cuda::LaunchGather(ToCuda(attrs_, g), rows.data(), static_cast<int64_t>(rows.size()),
                                            codes.As<uint8_t>(), scales.data,
                                            zero_points.present ? zero_points.As<uint8_t>() : nullptr, y,
                                            ctx.GetGPUComputeStream()));
    });
  }

 private:
  NodeRef node_;
  BlockAttrs attrs_;
};

class QuantizeCudaKernel {
 public:
  QuantizeCudaKernel(const OrtKernelInfo* info, const NodeRef& node)
      : node_(node), attrs_(ReadQuantizeAttrs(info, node_)) {}
  static bool InputOnHost(size_t) { return false; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const InputTensor x = GetInput(ctx, 0);
      const RowsGeometry g = CheckQuantizeInput(node_, attrs_, x);
      const QuantizeOutputs out = GetQuantizeOutputs(ctx, node_, attrs_, x, g);
      CheckLaunch(node_, cuda::LaunchQuantize(ToCuda(attrs_.block, g), x.As<float>(), g.rows, out.codes, out.scales,
                                              out.zero_points, ctx.GetGPUComputeStream()));
    });
  }

 private:
  NodeRef node_;
  QuantizeAttrs attrs_;
};

}  // namespace

void AppendBlockCudaOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<QuantizeSchema, QuantizeCudaKernel> quantize(kCudaProvider);
  static BlockCustomOp<DequantizeSchema, DequantizeCudaKernel> dequantize(kCudaProvider);
  static BlockCustomOp<GatherSchema, GatherCudaKernel> gather(kCudaProvider);
  domain.Add(&quantize);
  domain.Add(&dequantize);
  domain.Add(&gather);
}

}  // namespace bct
