// Runs a bct-onnx compressed model with the ONNX Runtime C++ API and prints every output.
//
// usage: bct_run MODEL.onnx LIBRARY.so [BATCH SEQ]
//   LIBRARY.so: the bct-onnx custom-op library (python -c "import bct_onnx; print(bct_onnx.library_path())").
//
// Inputs are filled deterministically so that other bindings can feed the same values: dynamic
// dimensions become BATCH (the first) and SEQ (the others); int64/int32 inputs named *mask* get 1,
// *position_ids* the position along the last axis, *token_type_ids* 0, others (i * 13 + 1) % 100 for
// the i-th element; float inputs 0.01 * (i % 100).
// Output: for each output a line "output NAME [d0,d1,...]" then one line of values (%.9g, which
// round-trips float32 exactly).
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

std::vector<int64_t> ConcreteShape(const std::vector<int64_t>& declared, int64_t batch, int64_t seq) {
  std::vector<int64_t> shape = declared;
  for (size_t axis = 0; axis < shape.size(); ++axis) {
    if (shape[axis] < 0) shape[axis] = axis == 0 ? batch : seq;
  }
  return shape;
}

int64_t IntegerValue(const std::string& name, size_t i, int64_t last_dim) {
  if (name.find("mask") != std::string::npos) return 1;
  if (name.find("position_ids") != std::string::npos) return static_cast<int64_t>(i) % last_dim;
  if (name.find("token_type_ids") != std::string::npos) return 0;
  return static_cast<int64_t>((i * 13 + 1) % 100);
}

size_t Elements(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

void PrintOutput(const std::string& name, const Ort::Value& value) {
  auto info = value.GetTensorTypeAndShapeInfo();
  std::vector<int64_t> shape = info.GetShape();
  std::printf("output %s [", name.c_str());
  for (size_t i = 0; i < shape.size(); ++i) std::printf(i ? ",%lld" : "%lld", static_cast<long long>(shape[i]));
  std::printf("]\n");
  const size_t n = info.GetElementCount();
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: {
      const float* data = value.GetTensorData<float>();
      for (size_t i = 0; i < n; ++i) std::printf(i ? " %.9g" : "%.9g", static_cast<double>(data[i]));
      break;
    }
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: {
      const int64_t* data = value.GetTensorData<int64_t>();
      for (size_t i = 0; i < n; ++i) std::printf(i ? " %lld" : "%lld", static_cast<long long>(data[i]));
      break;
    }
    default:
      std::printf("(element type %d not printed)", static_cast<int>(info.GetElementType()));
  }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 5) {
    std::fprintf(stderr, "usage: %s MODEL.onnx LIBRARY.so [BATCH SEQ]\n", argv[0]);
    return 2;
  }
  const int64_t batch = argc == 5 ? std::atoll(argv[3]) : 2;
  const int64_t seq = argc == 5 ? std::atoll(argv[4]) : 5;
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "bct_run");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(1);
    // The one step a compressed model needs: register the bct-onnx ops (RegisterCustomOpsLibrary_V2).
    options.RegisterCustomOpsLibrary(argv[2]);
    Ort::Session session(env, argv[1], options);

    Ort::AllocatorWithDefaultOptions allocator;
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<std::string> input_names;
    std::vector<Ort::Value> inputs;
    std::vector<std::vector<int64_t>> int_buffers;
    std::vector<std::vector<int32_t>> int32_buffers;
    std::vector<std::vector<float>> float_buffers;
    for (size_t k = 0; k < session.GetInputCount(); ++k) {
      std::string name = session.GetInputNameAllocated(k, allocator).get();
      Ort::TypeInfo type_info = session.GetInputTypeInfo(k);  // owns what `type` points into
      auto type = type_info.GetTensorTypeAndShapeInfo();
      std::vector<int64_t> shape = ConcreteShape(type.GetShape(), batch, seq);
      const size_t n = Elements(shape);
      const int64_t last = shape.empty() ? 1 : shape.back();
      switch (type.GetElementType()) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: {
          auto& buffer = int_buffers.emplace_back(n);
          for (size_t i = 0; i < n; ++i) buffer[i] = IntegerValue(name, i, last);
          inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory, buffer.data(), n, shape.data(), shape.size()));
          break;
        }
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: {
          auto& buffer = int32_buffers.emplace_back(n);
          for (size_t i = 0; i < n; ++i) buffer[i] = static_cast<int32_t>(IntegerValue(name, i, last));
          inputs.push_back(Ort::Value::CreateTensor<int32_t>(memory, buffer.data(), n, shape.data(), shape.size()));
          break;
        }
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: {
          auto& buffer = float_buffers.emplace_back(n);
          for (size_t i = 0; i < n; ++i) buffer[i] = 0.01f * static_cast<float>(i % 100);
          inputs.push_back(Ort::Value::CreateTensor<float>(memory, buffer.data(), n, shape.data(), shape.size()));
          break;
        }
        default:
          std::fprintf(stderr, "bct_run: input %s has an element type this example does not fill (%d)\n",
                       name.c_str(), static_cast<int>(type.GetElementType()));
          return 1;
      }
      input_names.push_back(name);
    }
    std::vector<std::string> output_names;
    for (size_t k = 0; k < session.GetOutputCount(); ++k) {
      output_names.emplace_back(session.GetOutputNameAllocated(k, allocator).get());
    }
    std::vector<const char*> input_ptrs, output_ptrs;
    for (auto& s : input_names) input_ptrs.push_back(s.c_str());
    for (auto& s : output_names) output_ptrs.push_back(s.c_str());
    auto outputs = session.Run(Ort::RunOptions{nullptr}, input_ptrs.data(), inputs.data(), inputs.size(),
                               output_ptrs.data(), output_ptrs.size());
    for (size_t k = 0; k < outputs.size(); ++k) PrintOutput(output_names[k], outputs[k]);
  } catch (const Ort::Exception& error) {
    std::fprintf(stderr, "bct_run: %s\n", error.what());
    return 1;
  }
  return 0;
}
