// BCT_ISA_CLONES: compile a function once per x86-64 instruction set and pick the best at load time
// (GCC target_clones). The clones run the same float32 operations (the library builds with
// -ffp-contract=off, so no FMA appears even where the ISA has it): results are bit-identical.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BCT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BCT_ISA_CLONES
#endif

// For bodies shared by a cloned function and its baseline twin: inlined into each, so every clone
// gets code for its own instruction set.
#if defined(__GNUC__)
#define BCT_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define BCT_ALWAYS_INLINE inline
#endif
