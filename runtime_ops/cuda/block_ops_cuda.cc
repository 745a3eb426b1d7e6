// BlockQuantize, BlockDequantize and BlockGather on CUDAExecutionProvider. Validation is shared
// with the CPU kernels (ops/block_io.h); the work is done by the launchers of block_kernels.cu on
// the stream ONNX Runtime gives the kernel. BlockGather takes its indices in host memory
// (OrtMemTypeCPUInput) so they are validated before anything is launched.
#include <string>
#include <vector>

#include "block_launch.h"
#include "device_bytes.h"
#include "ops/coded_codes.h"
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/ops.h"
#include "ops/packed_zero_points.h"

namespace bct {
namespace {

// Zero points packed at the code width (zero_points_packed = 1): unpacked on the host at kernel
// creation and kept on the device, one byte a block, as the view every call validates and reads.
class DeviceZeroPoints {
 public:
  void Load(const OrtKernelInfo* info, const NodeRef& node, const BlockAttrs& attrs, size_t index) {
    if (!ReadZeroPointsPacked(info, node, attrs.symmetric)) return;
    const UnpackedZeroPoints unpacked =
        UnpackConstantZeroPoints(info, node, index, "zero_points", index - 1, "scales", attrs.bits);
    CheckLaunch(node, bytes_.Upload(unpacked.values.data(), unpacked.values.size()));
    view_ = unpacked.view;
    view_.data = bytes_.data();
    loaded_ = true;
  }
  const InputTensor* view() const { return loaded_ ? &view_ : nullptr; }

 private:
  bool loaded_ = false;
  cuda::DeviceBytes bytes_;
  InputTensor view_;
};

class DequantizeCudaKernel : public DequantizeKernelBase {
 public:
  DequantizeCudaKernel(const OrtKernelInfo* info, const NodeRef& node) : DequantizeKernelBase(info, node) {
    zero_points_.Load(info, node_, attrs_, 2);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const DequantizeCall c = PrepareDequantize(ctx, node_, attrs_, zero_points_.view());
      CheckLaunch(node_, cuda::LaunchDequantize(BlockRowFormat<cuda::RowFormat>(attrs_, c.g), c.codes.As<uint8_t>(),
                                                c.scales.data,
                                                c.zero_points.present ? c.zero_points.As<uint8_t>() : nullptr,
                                                c.g.rows, c.y, ctx.GetGPUComputeStream()));
    });
  }

 private:
  DeviceZeroPoints zero_points_;
};

class GatherCudaKernel : public DequantizeKernelBase {
 public:
  GatherCudaKernel(const OrtKernelInfo* info, const NodeRef& node) : DequantizeKernelBase(info, node) {
    if (ReadCodesCoded(info, node_)) {  // the table decoded on the host once, then kept on the device
      const DecodedCodes decoded = DecodeConstantCodes(info, node_, 1, "codes", attrs_.bits, -1, attrs_.axis_size);
      CheckLaunch(node_, device_codes_.Upload(decoded.packed.data(), decoded.packed.size()));
      coded_view_ = decoded.view;
      coded_view_.data = device_codes_.data();
      coded_ = true;
    }
    zero_points_.Load(info, node_, attrs_, 3);
  }
  static bool InputOnHost(size_t index) { return index == 0; }  // indices

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const GatherCall c = PrepareGather(ctx, node_, attrs_, coded_ ? &coded_view_ : nullptr, zero_points_.view());
      CheckLaunch(node_, cuda::LaunchGather(BlockRowFormat<cuda::RowFormat>(attrs_, c.g), c.rows.data(),
                                            static_cast<int64_t>(c.rows.size()), c.codes.As<uint8_t>(), c.scales.data,
                                            c.zero_points.present ? c.zero_points.As<uint8_t>() : nullptr, c.y,
                                            ctx.GetGPUComputeStream()));
    });
  }

 private:
  bool coded_ = false;  // codes entropy-coded: decoded into device_codes_ at creation
  cuda::DeviceBytes device_codes_;
  InputTensor coded_view_;
  DeviceZeroPoints zero_points_;
};

class QuantizeCudaKernel : public QuantizeKernelBase {
 public:
  using QuantizeKernelBase::QuantizeKernelBase;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const QuantizeCall c = PrepareQuantize(ctx, node_, attrs_);
      CheckLaunch(node_, cuda::LaunchQuantize(BlockRowFormat<cuda::RowFormat>(attrs_.block, c.g), c.x.As<float>(),
                                              c.g.rows, c.out.codes, c.out.scales, c.out.zero_points,
                                              ctx.GetGPUComputeStream()));
    });
  }
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
