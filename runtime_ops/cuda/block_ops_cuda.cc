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
#include "ops/scale_factor.h"

namespace bct {
namespace {

// An input made on the host at kernel creation (packed zero points unpacked, float8e4m3 scales
// widened) and kept on the device, as the view every call validates and reads in place of the input.
class DeviceInput {
 public:
  const InputTensor* view() const { return loaded_ ? &view_ : nullptr; }

 protected:
  void Keep(const NodeRef& node, const void* host, size_t bytes, const InputTensor& view) {
    CheckLaunch(node, bytes_.Upload(static_cast<const uint8_t*>(host), bytes));
    view_ = view;
    view_.data = bytes_.data();
    loaded_ = true;
  }

 private:
  bool loaded_ = false;
  cuda::DeviceBytes bytes_;
  InputTensor view_;
};

// Zero points packed at the code width (zero_points_packed = 1): one byte a block on the device.
class DeviceZeroPoints : public DeviceInput {
 public:
  void Load(const OrtKernelInfo* info, const NodeRef& node, const BlockAttrs& attrs, size_t index) {
    if (!ReadZeroPointsPacked(info, node, attrs.symmetric)) return;
    const UnpackedZeroPoints unpacked =
        UnpackConstantZeroPoints(info, node, index, "zero_points", index - 1, "scales", attrs.bits);
    Keep(node, unpacked.values.data(), unpacked.values.size(), unpacked.view);
  }
};

// float8e4m3 scales with a scale_factor: float32 scales on the device.
class DeviceScales : public DeviceInput {
 public:
  void Load(const OrtKernelInfo* info, const NodeRef& node, size_t index) {
    float factor = 0.0f;
    if (!ReadScaleFactor(info, node, &factor)) return;
    const WidenedScales widened = WidenConstantScales(info, node, index, "scales", factor);
    Keep(node, widened.values.data(), widened.values.size() * sizeof(float), widened.view);
  }
};

class DequantizeCudaKernel : public DequantizeKernelBase {
 public:
  DequantizeCudaKernel(const OrtKernelInfo* info, const NodeRef& node) : DequantizeKernelBase(info, node) {
    zero_points_.Load(info, node_, attrs_, 2);
    scales_.Load(info, node_, 1);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const DequantizeCall c = PrepareDequantize(ctx, node_, attrs_, zero_points_.view(), scales_.view());
      CheckLaunch(node_, cuda::LaunchDequantize(BlockRowFormat<cuda::RowFormat>(attrs_, c.g), c.codes.As<uint8_t>(),
                                                c.scales.data,
                                                c.zero_points.present ? c.zero_points.As<uint8_t>() : nullptr,
                                                c.g.rows, c.y, ctx.GetGPUComputeStream()));
    });
  }

 private:
  DeviceZeroPoints zero_points_;
  DeviceScales scales_;
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
    scales_.Load(info, node_, 2);
  }
  static bool InputOnHost(size_t index) { return index == 0; }  // indices

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const GatherCall c =
          PrepareGather(ctx, node_, attrs_, coded_ ? &coded_view_ : nullptr, zero_points_.view(), scales_.view());
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
  DeviceScales scales_;
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
