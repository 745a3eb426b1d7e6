// BlockMatMul integer prefill on AMX-INT8 tiles (the amx path, cpu::Isa::kAmxInt8).
// Per block of K, tdpbsud (signed activation bytes x unsigned weight codes, int32 sums without
// saturation) computes every output's integer dot product for 16 rows x 16 columns at once; the
// block epilogue is the AVX-512 kernels' ScaleBlockInto (the same operations in the same order), so
// the results are the bits of every other path. The tile unit does the dot products, so the
// epilogue's vector ops (about 3 an output vector and block) no longer share two ports with them.
// Rows run in blocks of 32 (two A tiles) or 16; fewer rows, decode and float mode run TilesAvx512.
//
// The tile instructions go through a policy: AmxTiles (the instructions) or EmulatedTiles (their
// semantics in C++, which also checks the tile configuration of every operation), so that the tests
// run this kernel's blocking, unpacking and epilogue on CPUs without AMX (BCT_ONNX_AMX_EMULATE=1,
// cpu/isa.h). On a CPU with AMX the first call checks the instructions against the emulation on
// random data and, should they differ, warns once and runs TilesAvx512 instead.
// Standard headers come before the target pragma (see matmul_kernel_avx512.cc).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>

#include "matmul_kernel.h"
#if BCT_X86_SIMD

#if defined(__clang__)
#pragma clang attribute push(                                                                                  \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,amx-tile,amx-int8"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,amx-tile,amx-int8")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <immintrin.h>

#include "matmul_tiles_avx512.h"

namespace bct {
namespace matmul {
namespace detail {
namespace {

// Tiles: 0, 1 activations (A: 16 rows x kc bytes, kc <= 64 K values of one block), 2, 3 weights (B: kc / 4
// rows of 64 bytes: 4 K values x 16 columns, the packed layout's groups), 4..7 sums (C: 16 x 16 int32),
// C tile 4 + 2 * a + b for A tile a and B tile b.
constexpr int kRowsPerATile = 16;
constexpr int kMaxChunk = 64;  // K values (bytes) of an A tile row

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

TileConfig ConfigFor(int64_t chunk) {
  TileConfig c;
  for (int t = 0; t < 2; ++t) {
    c.rows[t] = kRowsPerATile;
    c.colsb[t] = static_cast<uint16_t>(chunk);
    c.rows[2 + t] = static_cast<uint8_t>(chunk / 4);
    c.colsb[2 + t] = 64;
  }
  for (int t = 4; t < 8; ++t) {
    c.rows[t] = kRowsPerATile;
    c.colsb[t] = 64;
  }
  return c;
}

// The compiler does not see the tile instructions' memory accesses (inline assembly without memory
// operands): a barrier keeps stores before the loads that read them, and loads after the stores.
inline void CompilerBarrier() { __asm__ __volatile__("" ::: "memory"); }

// The instructions. Tile numbers must be literals in the assembly: one branch per tile used.
struct AmxTiles {
  static void Configure(const TileConfig& c) {
    CompilerBarrier();
    _tile_loadconfig(&c);
  }
  static void Release() { _tile_release(); }
  template <int T>
  static void Load(const void* base, int64_t stride) {
    CompilerBarrier();
    if constexpr (T == 0) _tile_loadd(0, base, stride);
    if constexpr (T == 1) _tile_loadd(1, base, stride);
    if constexpr (T == 2) _tile_loadd(2, base, stride);
    if constexpr (T == 3) _tile_loadd(3, base, stride);
  }
  template <int T>
  static void Zero() {
    if constexpr (T == 4) _tile_zero(4);
    if constexpr (T == 5) _tile_zero(5);
    if constexpr (T == 6) _tile_zero(6);
    if constexpr (T == 7) _tile_zero(7);
  }
  // C += A (signed bytes) . B (signed bytes when kSignedB: tdpbssd, else unsigned: tdpbsud)
  template <bool kSignedB, int C, int A, int B>
  static void Dot() {
    static_assert(C == 4 + 2 * A + (B - 2), "C tile 4 + 2 * a + b");
    if constexpr (kSignedB) {
      if constexpr (C == 4) _tile_dpbssd(4, 0, 2);
      if constexpr (C == 5) _tile_dpbssd(5, 0, 3);
      if constexpr (C == 6) _tile_dpbssd(6, 1, 2);
      if constexpr (C == 7) _tile_dpbssd(7, 1, 3);
    } else {
      if constexpr (C == 4) _tile_dpbsud(4, 0, 2);
      if constexpr (C == 5) _tile_dpbsud(5, 0, 3);
      if constexpr (C == 6) _tile_dpbsud(6, 1, 2);
      if constexpr (C == 7) _tile_dpbsud(7, 1, 3);
    }
  }
  template <int T>
  static void Store(void* base, int64_t stride) {
    if constexpr (T == 4) _tile_stored(4, base, stride);
    if constexpr (T == 5) _tile_stored(5, base, stride);
    if constexpr (T == 6) _tile_stored(6, base, stride);
    if constexpr (T == 7) _tile_stored(7, base, stride);
    CompilerBarrier();
  }
};

// The same operations in C++ (Intel SDM: LDTILECFG, TILELOADD, TILEZERO, TDPBSSD / TDPBSUD, TILESTORED, TILERELEASE),
// per thread as the tile state is. Each operation checks that the configuration allows it, as the
// hardware faults when it does not: a kernel that passes the emulated tests configures its tiles right.
struct EmulatedTiles {
  struct State {
    TileConfig config;
    bool configured = false;
    alignas(64) uint8_t data[8][16][64];
  };
  static State& S() {
    thread_local State state;
    return state;
  }
  static void Fail(const char* what) {
    std::fprintf(stderr, "bct_onnx: emulated AMX tiles: %s\n", what);
    std::abort();  // a kernel bug the tests must see, as the hardware's fault would be
  }
  static void Configure(const TileConfig& c) {
    if (c.palette != 1) Fail("palette must be 1");
    for (int t = 0; t < 8; ++t) {
      if (c.rows[t] > 16 || c.colsb[t] > 64) Fail("a tile larger than 16 rows x 64 bytes");
    }
    State& s = S();
    s.config = c;
    s.configured = true;
    std::memset(s.data, 0, sizeof(s.data));
  }
  static void Release() { S().configured = false; }
  static void Check(int t) {
    const State& s = S();
    if (!s.configured) Fail("tile used without a configuration");
    if (s.config.rows[t] == 0 || s.config.colsb[t] == 0) Fail("tile not configured");
  }
  template <int T>
  static void Load(const void* base, int64_t stride) {
    Check(T);
    State& s = S();
    std::memset(s.data[T], 0, sizeof(s.data[T]));  // bytes beyond rows x colsb read as zero
    for (int r = 0; r < s.config.rows[T]; ++r) {
      std::memcpy(s.data[T][r], static_cast<const uint8_t*>(base) + r * stride, s.config.colsb[T]);
    }
  }
  template <int T>
  static void Zero() {
    Check(T);
    std::memset(S().data[T], 0, sizeof(S().data[T]));
  }
  template <bool kSignedB, int C, int A, int B>
  static void Dot() {
    Check(C);
    Check(A);
    Check(B);
    State& s = S();
    const TileConfig& c = s.config;
    if (c.rows[C] != c.rows[A] || c.colsb[C] != c.colsb[B] || c.colsb[A] != 4 * c.rows[B] || c.colsb[C] % 4 != 0) {
      Fail("tdpbsud tile shapes do not match");
    }
    for (int m = 0; m < c.rows[C]; ++m) {
      for (int n = 0; n < c.colsb[C] / 4; ++n) {
        int32_t sum;
        std::memcpy(&sum, s.data[C][m] + 4 * n, 4);
        for (int k = 0; k < c.rows[B]; ++k) {
          for (int i = 0; i < 4; ++i) {
            const int32_t a = static_cast<int8_t>(s.data[A][m][4 * k + i]);
            const uint8_t byte = s.data[B][k][4 * n + i];
            const int32_t b = kSignedB ? static_cast<int32_t>(static_cast<int8_t>(byte)) : static_cast<int32_t>(byte);
            sum = static_cast<int32_t>(static_cast<uint32_t>(sum) + static_cast<uint32_t>(a * b));  // wraps
          }
        }
        std::memcpy(s.data[C][m] + 4 * n, &sum, 4);
      }
    }
  }
  template <int T>
  static void Store(void* base, int64_t stride) {
    Check(T);
    const State& s = S();
    for (int r = 0; r < s.config.rows[T]; ++r) {
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.data[T][r], s.config.colsb[T]);
    }
  }
};

// The B tile rows of one chunk of a tile's codes (chunk / 4 groups of 4 K x 16 columns, 64 bytes each)
// into out, minus `zero` (symmetric weights: signed codes, tdpbssd). Nibbles: per 64 bytes the low
// nibbles hold one group, the high ones the next; bytes: the groups as stored.
template <bool kNibble>
inline void UnpackChunk(const uint8_t* codes, int64_t chunk, __m512i zero, uint8_t* out) {
  if constexpr (kNibble) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t g = 0; g < chunk / 8; ++g) {
      const __m512i raw = _mm512_loadu_si512(codes + g * 64);
      _mm512_store_si512(out + g * 128, _mm512_sub_epi8(_mm512_and_si512(raw, low4), zero));
      _mm512_store_si512(out + g * 128 + 64, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low4), zero));
    }
  } else {
    for (int64_t g = 0; g < chunk / 4; ++g) {
      _mm512_store_si512(out + g * 64, _mm512_sub_epi8(_mm512_loadu_si512(codes + g * 64), zero));
    }
  }
}

constexpr int64_t kBlockGroup = 8;  // blocks whose sums are stored before their epilogue runs

// The kernel's buffers (about 40 KB, L1-resident while it runs), one per thread, on the heap.
struct AmxScratch {
  alignas(64) uint8_t b_tiles[2][kMaxChunk / 4][64];
  alignas(64) int32_t sums[kBlockGroup][4][kRowsPerATile][16];
  alignas(64) float fsum[2 * kRowsPerATile][2][16];
  __m512 ws[kBlockGroup][2], zw[kBlockGroup][2];
};
AmxScratch& ThreadAmxScratch() {
  thread_local std::unique_ptr<AmxScratch> scratch;
  if (!scratch) scratch.reset(new AmxScratch);
  return *scratch;
}

// Rows [row0, row0 + 16 * RT) x tiles [tile0, tile0 + TT) of Y (TT tiles of one panel at w), all blocks.
// Per group of kBlockGroup blocks: the tile unit's sums of every block, then the epilogue row by row
// with the row's float sums in registers across the group.
template <class Tiles, int RT, int TT, bool kNibble, int kZp>
void AmxBlockRows(const PackedWeights& p, const PrefillView& w, const ActRows& act, int64_t row0, int64_t tile0,
                  const float* bias, float* Y) {
  // Symmetric weights: codes minus the implicit zero point, signed (tdpbssd), the very sums the VNNI
  // kernels reach from their correction; other modes: unsigned codes as stored (tdpbsud), no correction.
  constexpr bool kSigned = kZp == kZpSymmetric;
  const int64_t nb = p.num_blocks, bp = p.block_padded, kp = p.k_padded;
  const int64_t chunk = bp < kMaxChunk ? bp : kMaxChunk;
  const __m512i zero = _mm512_set1_epi8(kSigned ? static_cast<char>(p.implicit_zero_point) : 0);
  constexpr int kRows = RT * kRowsPerATile;
  AmxScratch& s = ThreadAmxScratch();
  std::memset(s.fsum, 0, sizeof(s.fsum));
  for (int64_t b0 = 0; b0 < nb; b0 += kBlockGroup) {
    const int64_t group = nb - b0 < kBlockGroup ? nb - b0 : kBlockGroup;
    for (int64_t i = 0; i < group; ++i) {
      const int64_t b = b0 + i;
      for (int64_t c = 0; c < bp; c += chunk) {
        const uint8_t* b_src[TT];
        for (int t = 0; t < TT; ++t) {
          const uint8_t* codes = w.codes + b * w.block_stride + t * w.tile_stride + (kNibble ? c / 8 : c / 4) * 64;
          if (kNibble || kSigned) {
            UnpackChunk<kNibble>(codes, chunk, zero, s.b_tiles[t][0]);
            b_src[t] = s.b_tiles[t][0];
          } else {
            b_src[t] = codes;  // unsigned byte codes: already B's rows
          }
        }
        const int8_t* a = act.codes.data() + row0 * kp + b * bp + c;
        Tiles::template Load<0>(a, kp);
        if constexpr (RT > 1) Tiles::template Load<1>(a + kRowsPerATile * kp, kp);
        Tiles::template Load<2>(b_src[0], 64);
        if constexpr (TT > 1) Tiles::template Load<3>(b_src[1], 64);
        if (c == 0) {
          Tiles::template Zero<4>();
          if constexpr (TT > 1) Tiles::template Zero<5>();
          if constexpr (RT > 1) Tiles::template Zero<6>();
          if constexpr (RT > 1 && TT > 1) Tiles::template Zero<7>();
        }
        Tiles::template Dot<kSigned, 4, 0, 2>();
        if constexpr (TT > 1) Tiles::template Dot<kSigned, 5, 0, 3>();
        if constexpr (RT > 1) Tiles::template Dot<kSigned, 6, 1, 2>();
        if constexpr (RT > 1 && TT > 1) Tiles::template Dot<kSigned, 7, 1, 3>();
      }
      Tiles::template Store<4>(s.sums[i][0], 64);
      if constexpr (TT > 1) Tiles::template Store<5>(s.sums[i][1], 64);
      if constexpr (RT > 1) Tiles::template Store<6>(s.sums[i][2], 64);
      if constexpr (RT > 1 && TT > 1) Tiles::template Store<7>(s.sums[i][3], 64);
      for (int t = 0; t < TT; ++t) {
        const uint8_t* params = w.params + b * w.block_stride + t * p.param_bytes;
        s.ws[i][t] = LoadWeightScales(p, params);
        s.zw[i][t] = kZp == kZpSymmetric ? _mm512_setzero_ps() : LoadZw<kZp>(p, params);
      }
    }
    // The block epilogue of every output vector: the integer kernels' ScaleBlockInto, block after block.
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      __m512 facc[1][TT];
      for (int t = 0; t < TT; ++t) facc[0][t] = _mm512_load_ps(s.fsum[r][t]);
      for (int64_t i = 0; i < group; ++i) {
        __m512i acc[1][TT];
        __m512 ws[TT], zw[TT];
        for (int t = 0; t < TT; ++t) {
          acc[0][t] = _mm512_load_si512(s.sums[i][(r / kRowsPerATile) * 2 + t][r % kRowsPerATile]);
          ws[t] = s.ws[i][t];
          zw[t] = s.zw[i][t];
        }
        const int64_t at = row * nb + b0 + i;
        ScaleBlockInto<1, TT, kZp, false>(acc, ws, zw, act.scales.data() + at, act.sums.data() + at, 1, facc, nullptr);
      }
      for (int t = 0; t < TT; ++t) _mm512_store_ps(s.fsum[r][t], facc[0][t]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    __m512 facc[1][TT];
    for (int t = 0; t < TT; ++t) facc[0][t] = _mm512_load_ps(s.fsum[r][t]);
    StoreTiles<1, TT>(p, facc, row0 + r, tile0, bias, Y);
  }
}

// Rows [row_begin, row_end) (a multiple of 16) x tiles [tile_begin, tile_end): tile pairs of one panel,
// each against blocks of 32 rows, then 16.
template <class Tiles, bool kNibble, int kZp>
void AmxRows(const PackedWeights& p, const ActRows& act, int64_t row_begin, int64_t row_end, int64_t tile_begin,
             int64_t tile_end, const float* bias, float* Y) {
  Tiles::Configure(ConfigFor(p.block_padded < kMaxChunk ? p.block_padded : kMaxChunk));
  for (int64_t t = tile_begin; t < tile_end;) {
    const int64_t in_panel = t & (p.panel_tiles - 1);
    const bool pair = t + 1 < tile_end && in_panel + 1 < TilesInPanel(p, t);
    const PrefillView w = PrefillTiles(p, t);
    int64_t r = row_begin;
    for (; r + 2 * kRowsPerATile <= row_end; r += 2 * kRowsPerATile) {
      if (pair) {
        AmxBlockRows<Tiles, 2, 2, kNibble, kZp>(p, w, act, r, t, bias, Y);
      } else {
        AmxBlockRows<Tiles, 2, 1, kNibble, kZp>(p, w, act, r, t, bias, Y);
      }
    }
    if (r < row_end) {
      if (pair) {
        AmxBlockRows<Tiles, 1, 2, kNibble, kZp>(p, w, act, r, t, bias, Y);
      } else {
        AmxBlockRows<Tiles, 1, 1, kNibble, kZp>(p, w, act, r, t, bias, Y);
      }
    }
    t += pair ? 2 : 1;
  }
  Tiles::Release();
}

// The instructions against their emulation, once per process on a CPU with AMX: random A and B bytes
// (signed x unsigned and signed x signed, sums that wrap), a chunk of 32 and one of 64; true when every
// sum agrees.
bool InstructionsMatchEmulation() {
  std::mt19937 rng(12345);
  alignas(64) uint8_t a[2][16][64], b[2][16][64];
  for (auto* bytes : {&a[0][0][0], &b[0][0][0]}) {
    for (int i = 0; i < 2 * 16 * 64; ++i) bytes[i] = static_cast<uint8_t>(rng());
  }
  for (int64_t chunk : {int64_t{32}, int64_t{64}}) {
    alignas(64) int32_t got[4][16][16], want[4][16][16];
    auto run = [&](auto tiles, int32_t (*out)[16][16]) {
      using Tiles = decltype(tiles);
      Tiles::Configure(ConfigFor(chunk));
      Tiles::template Load<0>(a[0], 64);
      Tiles::template Load<1>(a[1], 64);
      Tiles::template Load<2>(b[0], 64);
      Tiles::template Load<3>(b[1], 64);
      Tiles::template Zero<4>();
      Tiles::template Zero<5>();
      Tiles::template Zero<6>();
      Tiles::template Zero<7>();
      Tiles::template Dot<false, 4, 0, 2>();
      Tiles::template Dot<true, 5, 0, 3>();
      Tiles::template Dot<false, 6, 1, 2>();
      Tiles::template Dot<true, 7, 1, 3>();
      Tiles::template Dot<false, 4, 0, 2>();  // accumulates
      Tiles::template Store<4>(out[0], 64);
      Tiles::template Store<5>(out[1], 64);
      Tiles::template Store<6>(out[2], 64);
      Tiles::template Store<7>(out[3], 64);
      Tiles::Release();
    };
    run(AmxTiles{}, got);
    run(EmulatedTiles{}, want);
    if (std::memcmp(got, want, sizeof(got)) != 0) return false;
  }
  return true;
}

bool TilesUsable() {
  static const bool usable = [] {
    const bool same = InstructionsMatchEmulation();
    if (!same) {
      std::fprintf(stderr,
                   "bct_onnx: warning: this CPU's AMX-INT8 tile dot products differ from their specification; "
                   "BlockMatMul runs the AVX-512 VNNI kernels instead\n");
    }
    return same;
  }();
  return usable;
}

}  // namespace

void TilesAmx(const PackedWeights& p, const ActRows* act, const float* a_padded, int64_t row_begin, int64_t row_end,
              int64_t tile_begin, int64_t tile_end, const float* bias, float* Y) {
  const int64_t bp = p.block_padded;
  const int64_t tile_rows = (row_end - row_begin) / kRowsPerATile * kRowsPerATile;
  // Integer mode, byte or nibble codes whose blocks split into equal chunks of at most 64 K.
  const bool fits = act != nullptr && tile_rows > 0 && bp % 8 == 0 && (bp <= kMaxChunk || bp % kMaxChunk == 0);
  if (!fits || (!p.amx_emulated && !TilesUsable())) {
    return TilesAvx512(p, act, a_padded, row_begin, row_end, tile_begin, tile_end, bias, Y);
  }
  const bool nibble = p.nibble && p.high_planes == 0;  // else bytes (PrefillTiles expands high bit planes)
  ForWeightMode(nibble, p.shape, [&](auto nibble_kind, auto zp) {
    constexpr bool kNibble = decltype(nibble_kind)::value;
    constexpr int kZp = decltype(zp)::value;
    if (p.amx_emulated) {
      AmxRows<EmulatedTiles, kNibble, kZp>(p, *act, row_begin, row_begin + tile_rows, tile_begin, tile_end, bias, Y);
    } else {
      AmxRows<AmxTiles, kNibble, kZp>(p, *act, row_begin, row_begin + tile_rows, tile_begin, tile_end, bias, Y);
    }
  });
  if (row_begin + tile_rows < row_end) {
    TilesAvx512(p, act, a_padded, row_begin + tile_rows, row_end, tile_begin, tile_end, bias, Y);
  }
}

}  // namespace detail
}  // namespace matmul
}  // namespace bct

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif  // BCT_X86_SIMD
