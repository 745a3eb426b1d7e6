// The library's one exported symbol: RegisterCustomOps, called by ONNX Runtime when a session's
// options load libbct_onnx_ops.so. It negotiates the C API version, builds the ai.bct_onnx domain
// once per process (op objects and the domain live in static storage and are never freed, so they
// outlive every session), and adds that domain to the given session options.
#include <mutex>
#include <string>

#include "bct/op_common.h"
#include "ops/ops.h"

#if defined(_WIN32)
#define BCT_EXPORT __declspec(dllexport)
#else
#define BCT_EXPORT __attribute__((visibility("default")))
#endif

namespace {

// The API we were compiled against is missing: report it through the newest API that answers.
OrtStatus* OlderRuntimeError(const OrtApiBase* api_base) {
  const char* version = api_base->GetVersionString ? api_base->GetVersionString() : "unknown";
  const std::string message = std::string("bct_onnx: libbct_onnx_ops.so needs the ONNX Runtime C API version ") +
                              std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." +
                              std::to_string(ORT_API_VERSION) + "), but this is onnxruntime " + version +
                              "; upgrade onnxruntime";
  for (uint32_t v = ORT_API_VERSION - 1; v >= 1; --v) {
    if (const OrtApi* older = api_base->GetApi(v)) return older->CreateStatus(ORT_FAIL, message.c_str());
  }
  return nullptr;  // no API answers at all: nothing can be reported
}

// Every op family of the domain (ops/ops.h).
using AppendOps = void (*)(Ort::CustomOpDomain& domain);
constexpr AppendOps kOpFamilies[] = {
    bct::AppendQuantizeCpuOps, bct::AppendDequantizeCpuOps, bct::AppendGatherCpuOps,
    bct::AppendMatMulCpuOps,   bct::AppendActMatMulCpuOps,  bct::AppendNonlinearRowCpuOps,
    bct::AppendAddNormCpuOps,
    bct::AppendAttentionCpuOps,
    bct::AppendScaleErrorsCpuOps,  // a compile-time helper: CPU only
    bct::AppendGptqColumnsCpuOps,  // a compile-time helper: CPU only
#if defined(BCT_WITH_CUDA) && BCT_WITH_CUDA
    bct::AppendBlockCudaOps,   bct::AppendMatMulCudaOps,    bct::AppendNonlinearCudaOps,
    bct::AppendAttentionCudaOps,
#endif
};

Ort::CustomOpDomain* BuildDomain() {
  auto* domain = new Ort::CustomOpDomain(bct::kDomain);  // intentionally never freed
  for (AppendOps append : kOpFamilies) append(*domain);
  return domain;
}

}  // namespace

extern "C" BCT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                const OrtApiBase* api_base) {
  if (api_base == nullptr) return nullptr;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return OlderRuntimeError(api_base);
  Ort::InitApi(api);
  try {
    static std::mutex mutex;
    static Ort::CustomOpDomain* domain = nullptr;
    std::lock_guard<std::mutex> lock(mutex);
    if (domain == nullptr) domain = BuildDomain();
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(*domain);
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), (std::string("bct_onnx: RegisterCustomOps: ") + e.what()).c_str());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, (std::string("bct_onnx: RegisterCustomOps: ") + e.what()).c_str());
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "bct_onnx: RegisterCustomOps: unknown C++ exception");
  }
}
