// Helpers shared by every kernel of the library: node-prefixed errors, exception -> OrtStatus
// conversion, attribute reading, input/output access with dtype checks, and a ParallelFor over
// ONNX Runtime's intra-op thread pool. Host code only (it includes the ORT C++ API).
//
// Error contract (docs/ops.md): every message starts with
//   "bct_onnx <OpType> node '<node name>': "
// and names the input or attribute at fault. Kernels throw bct::OpError through NodeRef::Fail and
// wrap their entry points in bct::Guard, which turns any exception into an OrtStatus, so nothing
// escapes into ONNX Runtime as an exception or a std::terminate.
//
// Writing an op (see runtime_ops/cpu/dequantize.cc for a complete one):
//   struct MyKernel {
//     MyKernel(const OrtKernelInfo* info) : node_("MyOp", info), attrs_(ReadBlockAttrs(info, node_, "axis_size")) {}
//     OrtStatusPtr ComputeV2(OrtKernelContext* context) {
//       return bct::Guard(node_, [&] { Ort::KernelContext ctx(context); ... node_.Fail("input 'x' ..."); });
//     }
//     bct::NodeRef node_; bct::BlockAttrs attrs_;
//   };
//   struct MyOp : Ort::CustomOpBase<MyOp, MyKernel, /*WithStatus=*/true> {
//     OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
//       bct::NodeRef node("MyOp", info);
//       return bct::Guard(node, [&] { *kernel = new MyKernel(info); });
//     }
//     ...GetName, GetInputType (UNDEFINED where the kernel checks the dtype itself), ...
//   };
#pragma once

#ifndef ORT_API_MANUAL_INIT
#define ORT_API_MANUAL_INIT  // register.cc calls Ort::InitApi with the API it negotiated
#endif
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdint>
#include <exception>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace bct {

inline constexpr const char* kDomain = "ai.bct_onnx";
inline constexpr int kDomainVersion = 1;
inline constexpr const char* kCudaProvider = "CUDAExecutionProvider";

// An error whose message is already complete (node prefix included).
class OpError : public std::runtime_error {
 public:
  explicit OpError(const std::string& message, OrtErrorCode code = ORT_INVALID_ARGUMENT)
      : std::runtime_error(message), code_(code) {}
  OrtErrorCode code() const noexcept { return code_; }

 private:
  OrtErrorCode code_;
};

// The node a kernel runs for; builds the message prefix. Never throws while reading the name.
class NodeRef {
 public:
  NodeRef() = default;
  NodeRef(const char* op_type, const OrtKernelInfo* info) : op_type_(op_type) {
    size_t size = 0;
    const OrtApi& api = Ort::GetApi();
    if (OrtStatus* status = api.KernelInfo_GetNodeName(info, nullptr, &size)) {
      api.ReleaseStatus(status);
      return;
    }
    std::string name(size, '\0');
    if (OrtStatus* status = api.KernelInfo_GetNodeName(info, name.data(), &size)) {
      api.ReleaseStatus(status);
      return;
    }
    name.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
    name_ = std::move(name);
  }

  const std::string& op_type() const { return op_type_; }
  const std::string& name() const { return name_; }

  std::string Prefix() const { return "bct_onnx " + op_type_ + " node '" + name_ + "': "; }
  std::string Message(const std::string& problem) const { return Prefix() + problem; }

  [[noreturn]] void Fail(const std::string& problem, OrtErrorCode code = ORT_INVALID_ARGUMENT) const {
    throw OpError(Message(problem), code);
  }

  // Outputs whose element type the node's kernel has checked: the graph fixes them for the session, so
  // a check that passed once is not repeated on every call (outputs 0..31; a bit each).
  bool OutputChecked(size_t index) const {
    return index < 32 && ((checked_outputs_.load(std::memory_order_relaxed) >> index) & 1u) != 0;
  }
  void SetOutputChecked(size_t index) const {
    if (index < 32) checked_outputs_.fetch_or(uint32_t{1} << index, std::memory_order_relaxed);
  }

  NodeRef(const NodeRef& other)
      : op_type_(other.op_type_), name_(other.name_), checked_outputs_(other.checked_outputs_.load()) {}
  NodeRef& operator=(const NodeRef& other) {
    op_type_ = other.op_type_;
    name_ = other.name_;
    checked_outputs_.store(other.checked_outputs_.load());
    return *this;
  }

 private:
  std::string op_type_;
  std::string name_;
  mutable std::atomic<uint32_t> checked_outputs_{0};
};

// A status for ORT to own (nullptr means success).
inline OrtStatusPtr MakeStatus(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, message.c_str());
}

// Runs body() and converts every exception into an OrtStatus; returns nullptr on success.
// Use it around CreateKernelV2 and ComputeV2 bodies.
template <class Body>
OrtStatusPtr Guard(const NodeRef& node, Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const OpError& e) {
    return MakeStatus(e.code(), e.what());
  } catch (const Ort::Exception& e) {
    return MakeStatus(e.GetOrtErrorCode(), node.Message(e.what()));
  } catch (const std::bad_alloc&) {
    return MakeStatus(ORT_FAIL, node.Message("out of memory"));
  } catch (const std::exception& e) {
    return MakeStatus(ORT_FAIL, node.Message(e.what()));
  } catch (...) {
    return MakeStatus(ORT_FAIL, node.Message("unknown C++ exception"));
  }
}

// Turns a CUDA launcher's result (nullptr, or the CUDA error string) into a failure of the node.
inline void CheckLaunch(const NodeRef& node, const char* error) {
  if (error != nullptr) node.Fail(std::string("CUDA error: ") + error, ORT_EP_FAIL);
}

// ---------------------------------------------------------------------------------------------
// Attributes

// Releases a failed attribute read's status; throws when the attribute exists with another type
// (ONNX Runtime: "Attribute name and type don't match"), so a wrong type is an error naming the
// attribute instead of a silent default. Returns normally when the attribute is absent.
inline void AttrReadFailed(OrtStatus* status, const char* name, const char* type) {
  const OrtApi& api = Ort::GetApi();
  const char* message = api.GetErrorMessage(status);
  const bool other_type = message != nullptr && std::strstr(message, "type don't match") != nullptr;
  api.ReleaseStatus(status);
  if (other_type) {
    throw Ort::Exception(std::string("attribute '") + name + "' must be " + type + ", got another type",
                         ORT_INVALID_ARGUMENT);
  }
}

// Required int attribute; fails naming it when absent or of another type.
inline int64_t AttrInt(const OrtKernelInfo* info, const NodeRef& node, const char* name) {
  int64_t value = 0;
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, &value)) {
    AttrReadFailed(status, name, "an int");
    node.Fail(std::string("required int attribute '") + name + "' is missing");
  }
  return value;
}

// Optional int attribute with a default (an error when of another type).
inline int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t default_value) {
  int64_t value = 0;
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, &value)) {
    AttrReadFailed(status, name, "an int");
    return default_value;
  }
  return value;
}

// Required int attribute in [lo, hi]; fails naming it and the range otherwise.
inline int64_t AttrIntIn(const OrtKernelInfo* info, const NodeRef& node, const char* name, int64_t lo, int64_t hi) {
  const int64_t value = AttrInt(info, node, name);
  if (value < lo || value > hi) {
    node.Fail(std::string("attribute '") + name + "' must be in " + std::to_string(lo) + ".." + std::to_string(hi) +
              ", got " + std::to_string(value));
  }
  return value;
}

// Optional 0/1 attribute with a default; fails naming it for any other value.
inline bool AttrFlag(const OrtKernelInfo* info, const NodeRef& node, const char* name, int64_t default_value) {
  const int64_t value = AttrInt(info, name, default_value);
  if (value != 0 && value != 1) {
    node.Fail(std::string("attribute '") + name + "' must be 0 or 1, got " + std::to_string(value));
  }
  return value == 1;
}

// Optional string attribute with a default (an error when of another type).
inline std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& default_value) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    AttrReadFailed(status, name, "a string");
    return default_value;
  }
  std::string out(size, '\0');
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, out.data(), &size)) {
    AttrReadFailed(status, name, "a string");
    return default_value;
  }
  out.resize(size > 0 ? size - 1 : 0);
  return out;
}

// The attributes every blockwise op shares (docs/ops.md, "Common attributes"), validated.
struct BlockAttrs {
  int bits = 4;
  int64_t block_size = 32;
  bool symmetric = true;
  int64_t axis_size = 0;  // D; 0 when the op does not take axis_size (BlockQuantize)
};

// The largest block_size of any op (block_format.MAX_BLOCK_SIZE): far beyond any real row, and small
// enough that block arithmetic on int64 sizes (axis_size + block_size - 1, ...) cannot overflow.
constexpr int64_t kMaxBlockSize = int64_t{1} << 31;

// Reads bits, block_size, symmetric (default 1) and, when axis_size_name is given, that required
// attribute (BlockMatMul passes "K"). Fails on bits outside 2..8, block_size outside 1..kMaxBlockSize, symmetric not 0/1,
// axis size < 1.
inline BlockAttrs ReadBlockAttrs(const OrtKernelInfo* info, const NodeRef& node, const char* axis_size_name) {
  BlockAttrs attrs;
  const int64_t bits = AttrInt(info, node, "bits");
  if (bits < 2 || bits > 8) node.Fail("attribute 'bits' must be in 2..8, got " + std::to_string(bits));
  attrs.bits = static_cast<int>(bits);
  attrs.block_size = AttrInt(info, node, "block_size");
  if (attrs.block_size < 1 || attrs.block_size > kMaxBlockSize) {
    node.Fail("attribute 'block_size' must be in 1.." + std::to_string(kMaxBlockSize) + ", got " +
              std::to_string(attrs.block_size));
  }
  const int64_t symmetric = AttrInt(info, "symmetric", 1);
  if (symmetric != 0 && symmetric != 1) {
    node.Fail("attribute 'symmetric' must be 0 or 1, got " + std::to_string(symmetric));
  }
  attrs.symmetric = symmetric == 1;
  if (axis_size_name != nullptr) {
    attrs.axis_size = AttrInt(info, node, axis_size_name);
    if (attrs.axis_size < 1) {
      node.Fail(std::string("attribute '") + axis_size_name + "' must be >= 1, got " +
                std::to_string(attrs.axis_size));
    }
  }
  return attrs;
}

// ---------------------------------------------------------------------------------------------
// Tensors

inline const char* DtypeName(ONNXTensorElementDataType dtype) {
  switch (dtype) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E5M2: return "float8e5m2";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN: return "float8e4m3fn";
    default: return "an unsupported type";
  }
}

inline std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

inline int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// One input as the kernel sees it. present is false for an absent optional input.
struct InputTensor {
  bool present = false;
  const void* data = nullptr;
  ONNXTensorElementDataType dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t size = 0;

  template <class T>
  const T* As() const { return static_cast<const T*>(data); }
};

inline InputTensor GetInput(const Ort::KernelContext& ctx, size_t index) {
  InputTensor in;
  if (index >= ctx.GetInputCount()) return in;
  Ort::ConstValue value = ctx.GetInput(index);
  if (value == nullptr) return in;
  auto info = value.GetTensorTypeAndShapeInfo();
  in.present = true;
  in.dtype = info.GetElementType();
  in.shape = info.GetShape();
  in.size = static_cast<int64_t>(info.GetElementCount());
  in.data = value.GetTensorRawData();
  return in;
}

// An input of the kernel info as an InputTensor when it is a constant initializer (else absent).
inline InputTensor ConstantInput(const Ort::ConstKernelInfo& info, size_t index) {
  InputTensor in;
  if (index >= info.GetInputCount()) return in;
  int is_constant = 0;
  Ort::ConstValue value = info.GetTensorConstantInput(index, &is_constant);
  if (!is_constant || value == nullptr) return in;
  auto type_shape = value.GetTensorTypeAndShapeInfo();
  in.present = true;
  in.dtype = type_shape.GetElementType();
  in.shape = type_shape.GetShape();
  in.size = static_cast<int64_t>(type_shape.GetElementCount());
  in.data = value.GetTensorRawData();
  return in;
}

// Fails unless the input has the given dtype.
inline void ExpectDtype(const NodeRef& node, const char* input_name, const InputTensor& in,
                        ONNXTensorElementDataType dtype) {
  if (in.dtype != dtype) {
    node.Fail(std::string("input '") + input_name + "' must be " + DtypeName(dtype) + ", got " +
              DtypeName(in.dtype));
  }
}

// Fails unless the input has at least min_rank dimensions.
inline void ExpectMinRank(const NodeRef& node, const char* input_name, const InputTensor& in, size_t min_rank) {
  if (in.shape.size() < min_rank) {
    node.Fail(std::string("input '") + input_name + "' must have rank >= " + std::to_string(min_rank) +
              ", got shape " + ShapeString(in.shape));
  }
}

// Allocates output index with the given shape and checks ORT gave it the dtype we write.
template <class T>
T* GetOutput(const Ort::KernelContext& ctx, const NodeRef& node, size_t index, const char* output_name,
             const std::vector<int64_t>& shape, ONNXTensorElementDataType dtype) {
  Ort::UnownedValue value = ctx.GetOutput(index, shape);
  if (value == nullptr) return nullptr;  // optional output not requested
  const ONNXTensorElementDataType got = value.GetTensorTypeAndShapeInfo().GetElementType();
  if (got != dtype) {
    node.Fail(std::string("output '") + output_name + "' is declared " + DtypeName(got) + " in the graph but is " +
              DtypeName(dtype));
  }
  return value.GetTensorMutableData<T>();
}

// True when the node has output index wired to a value (optional outputs may be absent).
inline bool HasOutput(const Ort::KernelContext& ctx, size_t index) { return index < ctx.GetOutputCount(); }

// ---------------------------------------------------------------------------------------------
// Parallelism

// Calls fn(begin, end) over [0, total) split into chunks of at least min_per_task items, spread
// over ONNX Runtime's intra-op threads. Runs inline when one chunk suffices. The first exception
// thrown by any chunk is rethrown here after all chunks finish.
template <class Fn>
void ParallelFor(const Ort::KernelContext& ctx, int64_t total, int64_t min_per_task, Fn&& fn) {
  if (total <= 0) return;
  min_per_task = std::max<int64_t>(min_per_task, 1);
  const int64_t max_tasks = 256;
  const int64_t tasks = std::min<int64_t>(max_tasks, (total + min_per_task - 1) / min_per_task);
  if (tasks <= 1) {
    fn(int64_t{0}, total);
    return;
  }
  struct Job {
    Fn* fn;
    int64_t total;
    int64_t tasks;
    std::exception_ptr error;
    std::atomic_flag failed = ATOMIC_FLAG_INIT;
  } job{&fn, total, tasks, nullptr};
  auto trampoline = [](void* user, size_t task) {
    Job* j = static_cast<Job*>(user);
    const int64_t t = static_cast<int64_t>(task);
    const int64_t begin = j->total * t / j->tasks;
    const int64_t end = j->total * (t + 1) / j->tasks;
    try {
      (*j->fn)(begin, end);
    } catch (...) {
      if (!j->failed.test_and_set()) j->error = std::current_exception();
    }
  };
  ctx.ParallelFor(trampoline, static_cast<size_t>(tasks), 0, &job);
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace bct
