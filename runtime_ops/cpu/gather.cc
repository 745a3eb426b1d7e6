// BlockGather on CPU: rows of a blockwise table, dequantized (an embedding lookup).
// Indices are validated first (so an error names the offending value); rows are then decoded in
// parallel over ORT's intra-op threads with the row loops of the kernel's path (cpu/row_kernels.h).
#include "bct/op_common.h"
#include "ops/block_io.h"
#include "ops/coded_codes.h"
#include "ops/ops.h"
#include "ops/packed_zero_points.h"
#include "cpu/kernel_table.h"
#include "cpu/row_kernels.h"

namespace bct {
namespace {

class GatherCpuKernel : public DequantizeKernelBase {
 public:
  GatherCpuKernel(const OrtKernelInfo* info, const NodeRef& node) : DequantizeKernelBase(info, node), isa_(cpu::KernelIsa(node_)) {
    if (ReadCodesCoded(info, node_)) {  // the table's codes, decoded once and kept
      decoded_ = DecodeConstantCodes(info, node_, 1, "codes", attrs_.bits, -1, attrs_.axis_size);
      coded_ = true;
    }
    if (ReadZeroPointsPacked(info, node_, attrs_.symmetric)) {  // unpacked once and kept
      unpacked_zero_points_ = UnpackConstantZeroPoints(info, node_, 3, "zero_points", 2, "scales", attrs_.bits);
      zero_points_packed_ = true;
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guard(node_, [&] {
      Ort::KernelContext ctx(context);
      const GatherCall c = PrepareGather(ctx, node_, attrs_, coded_ ? &decoded_.view : nullptr,
                                            zero_points_packed_ ? &unpacked_zero_points_.view : nullptr);
      const RowsGeometry& g = c.g;
      cpu::RowFormat fmt = BlockRowFormat<cpu::RowFormat>(attrs_, g);
      fmt.isa = isa_;
      const cpu::PackedRows table(fmt, c.codes.As<uint8_t>(), c.scales.data,
                                  c.zero_points.present ? c.zero_points.As<uint8_t>() : nullptr);
      const int64_t min_rows = std::max<int64_t>(1, 32768 / g.axis_size);
      ParallelFor(ctx, static_cast<int64_t>(c.rows.size()), min_rows, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) table.Dequantize(c.rows[static_cast<size_t>(i)], c.y + i * g.axis_size);
      });
    });
  }

 private:
  cpu::Isa isa_;  // chosen at creation (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD)
  bool coded_ = false;
  DecodedCodes decoded_;  // codes_coding "huffman": the packed table
  bool zero_points_packed_ = false;
  UnpackedZeroPoints unpacked_zero_points_;  // zero_points_packed = 1: one byte a block
};

}  // namespace

void AppendGatherCpuOps(Ort::CustomOpDomain& domain) {
  static BlockCustomOp<GatherSchema, GatherCpuKernel> op(nullptr);
  domain.Add(&op);
}

}  // namespace bct
