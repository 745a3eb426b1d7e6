#include "cpu/isa.h"

#include <cstdlib>
#include <cstring>

#if BCT_X86_SIMD && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace bct {
namespace cpu {
namespace {

struct CpuFeatures {
  bool avx2 = false, avx_vnni = false, avx512 = false, avx512_vnni = false, amx_int8 = false, gfni = false;
};

#if BCT_X86_SIMD
// AMX tile data is off until the process asks the kernel for it (Linux 5.16+).
bool RequestAmxTileData() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures Detect() {
  __builtin_cpu_init();
  CpuFeatures f;
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx_vnni = f.avx2 && __builtin_cpu_supports("avxvnni");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  f.avx512_vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
  // __builtin_cpu_supports knows no AMX in GCC 12: CPUID leaf 7 EDX bits 24 (AMX-TILE) and 25 (AMX-INT8).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  __asm__ __volatile__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  const bool amx_cpu = (edx >> 24 & 1u) && (edx >> 25 & 1u);
  f.gfni = (ecx >> 8 & 1u) != 0;  // CPUID leaf 7 ECX bit 8
  f.amx_int8 = f.avx512_vnni && amx_cpu && RequestAmxTileData();
  return f;
}
#else
CpuFeatures Detect() { return CpuFeatures{}; }
#endif

const CpuFeatures& Features() {
  static const CpuFeatures features = Detect();
  return features;
}

constexpr const char* kNames[kIsaCount] = {"scalar", "avx2", "avxvnni", "avx512", "avx512vnni", "amx"};

// What each path needs, for the error of a forced path this CPU cannot run.
constexpr const char* kNeeds[kIsaCount] = {"", "AVX2/FMA", "AVX2/FMA/AVX-VNNI", "AVX-512 F/BW/VL/DQ",
                                           "AVX-512 F/BW/VL/DQ/VNNI", "AVX-512 VNNI and AMX-INT8 (CPU and OS), or AVX-512 VNNI with BCT_ONNX_AMX_EMULATE=1"};

}  // namespace

const char* IsaName(Isa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kIsaCount ? kNames[i] : "unknown";
}

namespace {

bool EnvFlag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' && std::strcmp(value, "0") != 0;
}

// The path runs on this CPU's own instructions (AMX: tiles present, not emulated).
bool CpuRuns(Isa isa) {
  const CpuFeatures& f = Features();
  switch (isa) {
    case Isa::kBaseline: return true;
    case Isa::kAvx2: return f.avx2;
    case Isa::kAvxVnni: return f.avx_vnni;
    case Isa::kAvx512: return f.avx512;
    case Isa::kAvx512Vnni: return f.avx512_vnni;
    case Isa::kAmxInt8: return f.amx_int8;
  }
  return false;
}

}  // namespace

bool AmxTilesPresent() { return Features().amx_int8; }

bool CpuSupports(Isa isa) {
  if (isa == Isa::kAmxInt8 && !AmxTilesPresent()) {
    return Features().avx512_vnni && EnvFlag("BCT_ONNX_AMX_EMULATE");
  }
  return CpuRuns(isa);
}

bool UseGfni() {
  const char* off = std::getenv("BCT_ONNX_NO_GFNI");
  return Features().gfni && (off == nullptr || std::strcmp(off, "0") == 0 || *off == '\0');
}

Isa BestIsa() {
  static const Isa best = [] {
    for (Isa isa : {Isa::kAmxInt8, Isa::kAvx512Vnni, Isa::kAvx512, Isa::kAvxVnni, Isa::kAvx2}) {
      if (CpuRuns(isa)) return isa;  // never the emulated tiles
    }
    return Isa::kBaseline;
  }();
  return best;
}

bool ParseIsa(const char* name, Isa* isa, std::string* error) {
  const std::string value = name ? name : "";
  if (value.empty() || value == "auto") {
    *isa = BestIsa();
    return true;
  }
  for (int i = 0; i < kIsaCount; ++i) {
    if (value != kNames[i]) continue;
    const Isa requested = static_cast<Isa>(i);
    if (!CpuSupports(requested)) {
      *error = "BCT_ONNX_ISA=" + value + " but this CPU lacks " + kNeeds[i];
      return false;
    }
    *isa = requested;
    return true;
  }
  std::string names = "auto";
  for (const char* n : kNames) names += std::string(", ") + n;
  *error = "BCT_ONNX_ISA='" + value + "' is not one of " + names;
  return false;
}

bool IsaFromEnvironment(Isa* isa, std::string* error) {
  const char* baseline = std::getenv("BCT_ONNX_BASELINE_SIMD");
  if (baseline != nullptr && baseline[0] != '\0' && std::strcmp(baseline, "0") != 0) {
    *isa = Isa::kBaseline;
    return true;
  }
  return ParseIsa(std::getenv("BCT_ONNX_ISA"), isa, error);
}

}  // namespace cpu
}  // namespace bct
