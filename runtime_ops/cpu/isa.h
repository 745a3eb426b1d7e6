// The CPU dispatch layer: which instruction-set path a kernel runs.
//
// One enum of paths, one CPUID detection (once per process), one parser of the environment
// (BCT_ONNX_ISA, BCT_ONNX_BASELINE_SIMD). A kernel calls KernelIsa when it is created, keeps the
// value, and takes its functions from Kernels(isa) (cpu/kernel_table.h): a struct of function
// pointers per path. Every path computes the same float32 operations in the same order, so the
// results are the same bits whichever path runs; the tests force each path through BCT_ONNX_ISA.
#pragma once

#include <string>

// x86-64 built by GCC or clang: the SIMD paths exist (compiled with target pragmas / attributes
// and chosen at run time). Elsewhere only the baseline path is built.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BCT_X86_SIMD 1
#else
#define BCT_X86_SIMD 0
#endif

namespace bct {
namespace cpu {

// Instruction-set paths, as BCT_ONNX_ISA names them. Not an order: AVX-VNNI CPUs (Alder Lake) lack
// AVX-512 and AVX-512 CPUs (Skylake-X) may lack VNNI; CpuSupports says which paths this CPU runs.
enum class Isa : int {
  kBaseline = 0,    // "scalar": baseline x86-64 (SSE2) or portable C++
  kAvx2 = 1,        // "avx2": AVX2 + FMA (x86-64-v3)
  kAvxVnni = 2,     // "avxvnni": AVX2 + 256-bit VNNI
  kAvx512 = 3,      // "avx512": AVX-512 F/BW/VL/DQ (x86-64-v4)
  kAvx512Vnni = 4,  // "avx512vnni": AVX-512 + VNNI
  kAmxInt8 = 5,     // "amx": AVX-512 VNNI + AMX-INT8 tiles (kernels without an AMX version run the avx512vnni ones)
};
constexpr int kIsaCount = 6;

// The name BCT_ONNX_ISA uses for a path.
const char* IsaName(Isa isa);

// True when this CPU (and, for AMX, the OS) can run the path. The amx path also runs, without AMX,
// on a CPU with AVX-512 VNNI while BCT_ONNX_AMX_EMULATE is set (not "0"), read at each call: its
// kernels then run the tile instructions emulated in C++ (slow; for the tests, so that the AMX
// kernels' blocking and epilogue run on every CPU with AVX-512 VNNI). `auto` never picks emulation.
bool CpuSupports(Isa isa);

// True when the CPU and the OS run AMX-INT8 tile instructions.
bool AmxTilesPresent();

// True when this CPU has GFNI (the AVX-512 BlockMatMul prefill kernel unpacks high nibbles with one
// vgf2p8affineqb instead of a shift and an and) and BCT_ONNX_NO_GFNI is not set (not "0"): read when a
// kernel packs its weights, so tests run both forms on one CPU.
bool UseGfni();

// The path chosen when nothing is forced: the best this CPU supports.
Isa BestIsa();

// Parses a BCT_ONNX_ISA value: nullptr, "" or "auto" -> BestIsa(). Returns false with a one-line
// message when the name is unknown or the CPU lacks the path.
bool ParseIsa(const char* name, Isa* isa, std::string* error);

// The path the environment asks for now: BCT_ONNX_BASELINE_SIMD set (not "0") -> kBaseline, else
// ParseIsa(BCT_ONNX_ISA). Kernels call it once, when they are created, so tests can force paths.
bool IsaFromEnvironment(Isa* isa, std::string* error);

}  // namespace cpu
}  // namespace bct
