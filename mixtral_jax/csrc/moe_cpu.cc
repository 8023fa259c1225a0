// XLA:CPU FFI kernel: the MoE's grouped FFN, reading only the experts that
// have rows, in place, with every core working.
//
//   y[r] = w2_e @ (silu(w1_e @ x[r]) * (w3_e @ x[r]))   for r in expert e's group
//
// where the rows x are sorted by expert and group_sizes[e] says how many of
// them, from the previous group's end, are expert e's; rows past the last
// group come out zero. Weights are HF [out, in] matrices stacked over the
// experts, one buffer per weight: w1, w3 [E, F, D], w2 [E, D, F], all float32, all bfloat16, or all quantized
// (mixtral_jax/quant.py: int8 with a float32 scale per row, or int4 packed two
// per byte in blocks of 32 columns with a float16 scale per group of columns); x, y and all arithmetic
// are float32 (a weight is widened, times its scale, as it is read).
//
// A decode step's few rows (Call): every output element is a dot product of
// one contiguous weight row with one activation row, so the work splits into
// chunks of rows that the cores take from an atomic counter: no core waits
// for a fixed half of a matrix, as one does with XLA's own matrix-vector
// products (docs/performance.md#why-a-kernel-for-decode). Two phases, with
// all chosen experts in each: w1/w3 rows -> h, then w2 rows -> y.
//
// From panel_min_rows rows (PanelCall, a prompt or a big batch): register
// tiles of weight rows times packed panels of each expert's token rows,
// compute-bound, in three phases (pack, w1/w3 -> h, w2 -> y).
//
// Helpers come from XLA's intra-op thread pool, and one that has done its part
// stays a while for the next call's (Help); the calling thread works too and
// alone finishes whatever no helper took, so a busy pool only slows the call down.
//
// The same row-dot product serves LinearCpu: x [n, in] @ w [out, in]^T for a
// few rows (a decode step's attention projections and lm_head, layers.linear_t),
// w float32, or int8 with a scale per row or per group of columns.
//
// WriteCacheCpu writes a step's keys or values into a layer's KV cache in place (its result aliases the
// cache), as one call XLA neither fuses nor duplicates; each update row goes to a cache row of its own
// (the serving engine's decoding slots).
//
// Every call takes a `layer` attribute: from 0, its weight (and cache) operands stack every layer's,
// [L, ...], and it reads layer `layer`'s part where it lies (Layer); -1, the operands are one layer's.
//
// Built at first use by mixtral_jax/cpu_kernel.py with the host's g++.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <immintrin.h>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));  // unaligned 16-float load
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));  // unaligned 16-bfloat16 load
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// Weights are float32 or bfloat16 (`bf16`: its 16 bits, the top half of a
// float32). Either way the arithmetic is float32: a bfloat16 weight widens to
// the float32 of the same value, exactly, so the results equal float32
// products with the widened weights.
typedef uint16_t bf16;

inline float ToFloat(float w) { return w; }
inline float ToFloat(bf16 w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float out;
  __builtin_memcpy(&out, &bits, 4);
  return out;
}

inline v16 Load16(const float* w) { return *reinterpret_cast<const v16*>(w); }
inline v16 Load16(const bf16* w) {
#ifdef __AVX512F__
  // One 512-bit widening load and a shift (gcc splits __builtin_convertvector
  // into two 256-bit halves with extracts and inserts here).
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))), 16);
  return reinterpret_cast<const v16&>(bits);
#else
  const u32x16 bits = __builtin_convertvector(*reinterpret_cast<const u16x16*>(w), u32x16) << 16;
  return reinterpret_cast<const v16&>(bits);
#endif
}

typedef int8_t i8x16 __attribute__((vector_size(16), aligned(1)));
typedef uint8_t u8x16 __attribute__((vector_size(16), aligned(1)));

inline float HalfToFloat(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) return (sign ? -1.f : 1.f) * std::ldexp(static_cast<float>(man), -24);
  const uint32_t bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
  float out;
  __builtin_memcpy(&out, &bits, 4);
  return out;
#endif
}

// 16 int8 values, or 16 int4 values from 8 bytes (low nibble first), as float32.
inline v16 Widen8(const int8_t* q) {
#ifdef __AVX512F__
  const __m512 out = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  return reinterpret_cast<const v16&>(out);
#else
  return __builtin_convertvector(*reinterpret_cast<const i8x16*>(q), v16);
#endif
}
// 32 int4 values from 16 bytes, sign-extended (the panel path, and a row-dot's values past its last
// 128-value block): a group of 32 values is 16 bytes holding value i in the low nibble of byte i and
// value 16 + i in the high one (llama.cpp's Q4_0 order), so each half comes from one load, with no
// interleaving; out[0] the low nibbles, out[1] the high ones.
inline void Widen4(const uint8_t* q, v16* out) {
#ifdef __AVX512F__
  // Every byte in its own 32-bit lane; vpermps reads only an index's low 4 bits, so a table of the 16
  // nibble values turns the low nibbles, and the bytes shifted right by 4, straight into float32.
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512 low = _mm512_permutexvar_ps(bytes, table), high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
  out[0] = reinterpret_cast<const v16&>(low);
  out[1] = reinterpret_cast<const v16&>(high);
#else
  for (int i = 0; i < 16; ++i) {
    const int low = q[i] & 0xF, high = q[i] >> 4;
    out[0][i] = static_cast<float>(low < 8 ? low : low - 16);
    out[1][i] = static_cast<float>(high < 8 ? high : high - 16);
  }
#endif
}

inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// A weight matrix [rows, ld] read as float32 values, whatever it is stored in: Load(j, k) gives the
// 16 values of row j from column k (k a multiple of 16), LoadStep(j, k, out) the kStep values from
// column k (k a multiple of kStep) as kStep / 16 vectors, At(j, k) one, Addr(j, k) where to prefetch.
// A quantized value is widened and multiplied by its scale in float32: the value
// mixtral_jax.quant.dequantize gives, so the products are those with the dequantized weights.
struct F32View {
  static constexpr bool kRowScale = false, kPermuted = false;
  template <int NR> static constexpr bool kOwnDots = false;
  static constexpr int kBits = 32, kStep = 16;
  const float* w;
  int64_t ld;
  v16 Load(int64_t j, int64_t k) const { return Load16(w + j * ld + k); }
  void LoadStep(int64_t j, int64_t k, v16* out) const { out[0] = Load(j, k); }
  float At(int64_t j, int64_t k) const { return w[j * ld + k]; }
  const void* Addr(int64_t j, int64_t k) const { return w + j * ld + k; }
};
struct BF16View {
  static constexpr bool kRowScale = false, kPermuted = false;
  template <int NR> static constexpr bool kOwnDots = false;
  static constexpr int kBits = 16, kStep = 16;
  const bf16* w;
  int64_t ld;
  v16 Load(int64_t j, int64_t k) const { return Load16(w + j * ld + k); }
  void LoadStep(int64_t j, int64_t k, v16* out) const { out[0] = Load(j, k); }
  float At(int64_t j, int64_t k) const { return ToFloat(w[j * ld + k]); }
  const void* Addr(int64_t j, int64_t k) const { return w + j * ld + k; }
};
// Groups of columns share a scale: a power of two, or one group per row; the column's group is
// k >> shift (a division per load would cost more than the load).
inline int GroupShift(int64_t groups, int64_t group) {
  return groups == 1 ? 62 : __builtin_ctzll(static_cast<uint64_t>(group));
}

#ifdef __AVX2__
// 8 int8 values from an 8-byte load, as float32 (the int8 row dots' widening).
inline __m256 Widen8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// The sum of t's 8 lanes.
inline float Hsum8(__m256 t) {
  __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  u = _mm_hadd_ps(u, u);
  return _mm_cvtss_f32(_mm_hadd_ps(u, u));
}
#endif

// int8 times a float32 scale per row (quant.py's int8: per output channel). Dots sums q * x over a row
// and multiplies by the scale once (kRowScale: LoadRaw, AtRaw, RowScale), a product fewer per 16 values.
struct I8View {
  static constexpr int kBits = 8, kStep = 16;
  static constexpr bool kRowScale = true, kPermuted = false;
  template <int NR> static constexpr bool kOwnDots = NR == 1;  // one activation row (a decode step's): RowDot
  const int8_t* q;
  const float* s;
  int64_t ld;
  float RowScale(int64_t j) const { return s[j]; }
  v16 Load(int64_t j, int64_t k) const { return Widen8(q + j * ld + k) * s[j]; }
  void LoadRaw(int64_t j, int64_t k, v16* out) const { out[0] = Widen8(q + j * ld + k); }
  void LoadStep(int64_t j, int64_t k, v16* out) const { out[0] = Load(j, k); }
  float At(int64_t j, int64_t k) const { return static_cast<float>(q[j * ld + k]) * s[j]; }
  float AtRaw(int64_t j, int64_t k) const { return static_cast<float>(q[j * ld + k]); }
  // Row j times one activation row x over K values, scaled: one row at a time, a single forward
  // stream of weight bytes, four 8-float accumulators, each 8 int8 widened from an 8-byte load; twice
  // the speed of four interleaved rows of 16-value widenings here (docs/benchmarks.md#quantized-weights).
  float RowDot(int64_t j, const float* x, int64_t K) const {
    const int8_t* p = q + j * ld;
    float sum = 0.f;
    int64_t k = 0;
#ifdef __AVX2__
    auto widen = [&](int64_t at) { return Widen8x8(p + at); };
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(widen(k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(widen(k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(widen(k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(widen(k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    sum = Hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; k < K; ++k) sum += AtRaw(j, k) * x[k];
    return sum * s[j];
  }
  template <int NR>
  void OwnDots(int64_t j, const float* const* xs, int64_t K, float* out) const { out[0] = RowDot(j, xs[0], K); }
  const void* Addr(int64_t j, int64_t k) const { return q + j * ld + k; }
};
// int8 times a float32 scale per group of columns along the row (quant.py's attention projections: 32
// values, or a power of two below it for a head of fewer). One activation row (a decode step's): RowDot
// sums each group's 32 products, then adds them times the group's scale, one more FMA per 32 values.
struct I8GView {
  static constexpr int kBits = 8, kStep = 16;
  static constexpr bool kRowScale = false, kPermuted = false;
  template <int NR> static constexpr bool kOwnDots = NR == 1;
  const int8_t* q;
  const float* s;
  int64_t ld, groups;
  int shift;
  float Scale(int64_t j, int64_t k) const { return s[j * groups + (k >> shift)]; }
  float At(int64_t j, int64_t k) const { return static_cast<float>(q[j * ld + k]) * Scale(j, k); }
  v16 Load(int64_t j, int64_t k) const {
    if (shift >= 4) return Widen8(q + j * ld + k) * Scale(j, k);  // 16 values of one group
    v16 out;
    for (int i = 0; i < 16; ++i) out[i] = At(j, k + i);
    return out;
  }
  void LoadStep(int64_t j, int64_t k, v16* out) const { out[0] = Load(j, k); }
  float RowDot(int64_t j, const float* x, int64_t K) const {
    const int8_t* p = q + j * ld;
    const float* sc = s + j * groups;
    float sum = 0.f;
    int64_t k = 0;
#ifdef __AVX2__
    if (shift == 5) {
      auto widen = [&](int64_t at) { return Widen8x8(p + at); };
      auto group = [&](int64_t at) {  // one group's 32 products, summed lane-wise
        __m256 t0 = _mm256_mul_ps(widen(at), _mm256_loadu_ps(x + at));
        __m256 t1 = _mm256_mul_ps(widen(at + 8), _mm256_loadu_ps(x + at + 8));
        t0 = _mm256_fmadd_ps(widen(at + 16), _mm256_loadu_ps(x + at + 16), t0);
        t1 = _mm256_fmadd_ps(widen(at + 24), _mm256_loadu_ps(x + at + 24), t1);
        return _mm256_add_ps(t0, t1);
      };
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;  // two chains: groups alternate
      for (; k + 64 <= K; k += 64) {
        a0 = _mm256_fmadd_ps(group(k), _mm256_set1_ps(sc[k >> 5]), a0);
        a1 = _mm256_fmadd_ps(group(k + 32), _mm256_set1_ps(sc[(k >> 5) + 1]), a1);
      }
      for (; k + 32 <= K; k += 32) a0 = _mm256_fmadd_ps(group(k), _mm256_set1_ps(sc[k >> 5]), a0);
      sum = Hsum8(_mm256_add_ps(a0, a1));
    }
#endif
    for (; k < K; ++k) sum += At(j, k) * x[k];
    return sum;
  }
  template <int NR>
  void OwnDots(int64_t j, const float* const* xs, int64_t K, float* out) const { out[0] = RowDot(j, xs[0], K); }
  const void* Addr(int64_t j, int64_t k) const { return q + j * ld + k; }
};
#ifdef __AVX512F__
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif

// int4, two per byte along the row (Widen4's order in groups of 32), times a float16 scale per group
// of columns (32, or a multiple: k >> 5 finds a value's 16 bytes).
struct I4View {
  // With AVX-512, a few activation rows (a decode step's) take OwnDots, which reads their values in
  // the order of Slot; the panel path widens rows with LoadStep / Load in the stored order.
  static constexpr bool kRowScale = false, kPermuted = kAvx512;
  template <int NR> static constexpr bool kOwnDots = kAvx512;
  static constexpr int kBits = 4, kStep = 32;
  const uint8_t* q;
  const uint16_t* s;
  int64_t ld, groups;  // ld: values per row (bytes: ld / 2)
  int shift;
  float Scale(int64_t j, int64_t k) const { return HalfToFloat(s[j * groups + (k >> shift)]); }
  const uint8_t* Bytes(int64_t j, int64_t k) const { return q + j * (ld / 2) + (k >> 5) * 16; }
  // One group's 16 bytes and scale per 32 values (Dots); 16 of them for the panel path's widening.
  void LoadStep(int64_t j, int64_t k, v16* out) const {
    Widen4(Bytes(j, k), out);
    const float scale = Scale(j, k);
    out[0] *= scale;
    out[1] *= scale;
  }
  v16 Load(int64_t j, int64_t k) const {
    v16 both[2];
    Widen4(Bytes(j, k), both);
    return both[(k >> 4) & 1] * Scale(j, k);
  }
  float At(int64_t j, int64_t k) const {
    const uint8_t b = Bytes(j, k)[k & 15], nibble = k & 16 ? b >> 4 : b & 0xF;
    return static_cast<float>(nibble < 8 ? nibble : nibble - 16) * Scale(j, k);
  }
  const void* Addr(int64_t j, int64_t k) const { return Bytes(j, k); }

  // Where OwnDots reads input value k of K. A block of 128 values (4 groups) is 64 bytes, which one
  // load puts in 16 dword lanes, 4 bytes of one group each: lane i = 4g + a holds bytes 4a..4a+3 of
  // group g. Shifted right by 4s, a lane's low 4 bits are byte 4a + s / 2's low (s even) or high
  // nibble, and vpermps reads only those bits: 8 shifts and table lookups give all 128 values as
  // float32, vector s lane i, with no widening. The input is stored in that order instead; values
  // past the last whole block keep theirs (LoadStep's order).
  static int64_t Slot(int64_t k, int64_t K) {
    if (!kPermuted || k >= K / 128 * 128) return k;
    const int64_t off = k & 127, t = off & 3, high = (off >> 4) & 1, g = off >> 5, a = (off >> 2) & 3;
    return (k - off) + (2 * t + high) * 16 + 4 * g + a;
  }

  // out[r] = dot(row j, xs[r]) over K values, xs in Slot's order, for NR (<= 4) activation rows: the
  // table lookups of a block serve every row, and its 4 group scales (one per 4 lanes) multiply each
  // row's sum over the block.
  template <int NR>
  void OwnDots(int64_t j, const float* const* xs, int64_t K, float* out) const {
#ifdef __AVX512F__
    const uint8_t* p = q + j * (ld / 2);
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
      __builtin_prefetch(p + k / 2 + 2048);  // 32 lines ahead (measured: faster than 8 or 64, or none)
      const __m512i bytes = _mm512_loadu_si512(p + k / 2);
      __m512 v[8];
      v[0] = _mm512_permutexvar_ps(bytes, table);
      for (int i = 1; i < 8; ++i) v[i] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4 * i), table);
      const __m128 four = shift == 5
          ? _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + j * groups + (k >> 5))))
          : _mm_setr_ps(Scale(j, k), Scale(j, k + 32), Scale(j, k + 64), Scale(j, k + 96));
      const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four));
      for (int r = 0; r < NR; ++r) {
        const float* x = xs[r] + k;
        __m512 t0 = _mm512_mul_ps(v[0], _mm512_loadu_ps(x)), t1 = _mm512_mul_ps(v[1], _mm512_loadu_ps(x + 16));
        for (int i = 2; i < 8; i += 2) {
          t0 = _mm512_fmadd_ps(v[i], _mm512_loadu_ps(x + 16 * i), t0);
          t1 = _mm512_fmadd_ps(v[i + 1], _mm512_loadu_ps(x + 16 * i + 16), t1);
        }
        acc[r] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), scale, acc[r]);
      }
    }
    for (; k < K; k += 32) {  // the groups past the last whole block
      v16 w[2];
      LoadStep(j, k, w);
      for (int r = 0; r < NR; ++r) {
        const v16 part = w[0] * *reinterpret_cast<const v16*>(xs[r] + k) +
                         w[1] * *reinterpret_cast<const v16*>(xs[r] + k + 16);
        acc[r] = _mm512_add_ps(acc[r], reinterpret_cast<const __m512&>(part));
      }
    }
    for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
#endif
  }
};

// Where a row-dot product reads input value k of K (V::Slot for a view that reorders its inputs).
template <typename V>
inline int64_t InputSlot(int64_t k, int64_t K) {
  if constexpr (V::kPermuted) return V::Slot(k, K);
  return k;
}

// Rows [lo, hi) of a weight as float32: in place for float32 weights, else
// widened into `buf`; row r is at the result + (r - lo) * ld.
inline const float* RowsAsFloat(const F32View& w, int64_t lo, int64_t, std::vector<float>&) {
  return w.w + lo * w.ld;
}
template <typename V>
inline const float* RowsAsFloat(const V& w, int64_t lo, int64_t hi, std::vector<float>& buf) {
  const int64_t ld = w.ld;
  if (static_cast<int64_t>(buf.size()) < (hi - lo) * ld) buf.resize((hi - lo) * ld);  // never shrunk
  for (int64_t r = lo; r < hi; ++r) {
    float* out = buf.data() + (r - lo) * ld;
    int64_t k = 0;
    for (; k + 16 <= ld; k += 16) *reinterpret_cast<v16*>(out + k) = w.Load(r, k);
    for (; k < ld; ++k) out[k] = w.At(r, k);
  }
  return buf.data();
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// exp(x) for 16 floats at once: Cephes' expf (2^n e^r with r in [-ln2/2, ln2/2] and its polynomial for
// e^r), x clamped to [-87, 88] so 2^n stays a normal float.
inline v16 Exp16(v16 x) {
  x = x < -87.f ? v16{} - 87.f : x;
  x = x > 88.f ? v16{} + 88.f : x;
  const v16 t = x * 1.44269504088896341f + 12582912.f;  // 1.5 * 2^23: rounds x / ln2 to an integer n
  const v16 n = t - 12582912.f;
  const v16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln2, ln2 in two parts
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;  // e^r
  const i32x16 scale = (reinterpret_cast<const i32x16&>(t) - 0x4B400000 + 127) << 23;  // 2^n
  return p * reinterpret_cast<const v16&>(scale);
}

// silu(a) = a / (1 + exp(-a)) for 16 floats at once. Beyond Exp16's clamp, a / (1 + exp(-a)) is a to
// float precision, or below 3e-36 in magnitude. Within 2.31 ulp of float64 silu over [-120, 120], as the
// same formula with libm's expf, whose scalar calls showed in a prefill's profile
// (docs/performance.md#silu-16-values-at-a-time).
inline v16 Silu16(v16 a) { return a / (1.f + Exp16(-a)); }

// silu over n floats in place.
inline void SiluInPlace(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) *reinterpret_cast<v16*>(v + i) = Silu16(*reinterpret_cast<const v16*>(v + i));
  if (i < n) {
    v16 tail{};
    for (int64_t j = i; j < n; ++j) tail[j - i] = v[j];
    tail = Silu16(tail);
    for (int64_t j = i; j < n; ++j) v[j] = tail[j - i];
  }
}

// out[j][r] = dot(row j0 + j of w, xs[r]) over K floats, for NF weight rows, NR activation rows.
template <int NF, int NR, typename V>
inline void Dots(const V& w, int64_t j0, const float* const* xs, int64_t K, float out[4][4]) {
  if constexpr (V::template kOwnDots<NR>) {  // the view's own products (int8's one row, int4's few rows)
    for (int j = 0; j < NF; ++j) w.template OwnDots<NR>(j0 + j, xs, K, out[j]);
    return;
  }
  v16 acc[NF][NR];
  for (int j = 0; j < NF; ++j)
    for (int r = 0; r < NR; ++r) acc[j][r] = v16{};
  constexpr int S = V::kStep, H = S / 16;  // values per step, as H vectors
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    v16 xv[NR][H];
    for (int r = 0; r < NR; ++r)
      for (int h = 0; h < H; ++h) xv[r][h] = *reinterpret_cast<const v16*>(xs[r] + k + 16 * h);
    for (int j = 0; j < NF; ++j) {
      // The same columns of the next NF rows: with short bfloat16 rows the
      // hardware prefetcher alone falls behind
      // (docs/performance.md#bfloat16-weights-widening-load-and-prefetch).
      if (k % (512 / V::kBits) == 0) __builtin_prefetch(w.Addr(j0 + j + NF, k));  // once per 64-byte line
      v16 wv[H];
      if constexpr (V::kRowScale) w.LoadRaw(j0 + j, k, wv);
      else w.LoadStep(j0 + j, k, wv);
      for (int r = 0; r < NR; ++r)
        for (int h = 0; h < H; ++h) acc[j][r] += wv[h] * xv[r][h];
    }
  }
  for (int j = 0; j < NF; ++j)
    for (int r = 0; r < NR; ++r) {
      float s = hsum(acc[j][r]);
      if constexpr (V::kRowScale) {
        for (int64_t t = k; t < K; ++t) s += w.AtRaw(j0 + j, t) * xs[r][t];
        s *= w.RowScale(j0 + j);
      } else {
        for (int64_t t = k; t < K; ++t) s += w.At(j0 + j, t) * xs[r][t];
      }
      out[j][r] = s;
    }
}

template <int NF, typename V>
inline void DotsRows(const V& w, int64_t j0, const float* const* xs, int nr, int64_t K, float out[4][4]) {
  switch (nr) {
    case 1: Dots<NF, 1>(w, j0, xs, K, out); break;
    case 2: Dots<NF, 2>(w, j0, xs, K, out); break;
    case 3: Dots<NF, 3>(w, j0, xs, K, out); break;
    default: Dots<NF, 4>(w, j0, xs, K, out); break;
  }
}

// Calls fn(j0, nf, out) for weight rows [j0, j0 + nf) of [lo, hi), nf 4 or 1,
// with out[j][r] = dot(row j0 + j, xs[r]) for the nr (<= 4) rows in xs.
template <typename V, typename Fn>
inline void RowDots(const V& w, int64_t lo, int64_t hi, const float* const* xs, int nr, int64_t K, Fn fn) {
  float out[4][4];
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4) {
    DotsRows<4>(w, j, xs, nr, K, out);
    fn(j, 4, out);
  }
  for (; j < hi; ++j) {
    DotsRows<1>(w, j, xs, nr, K, out);
    fn(j, 1, out);
  }
}


// One layer's part of an operand. With layer >= 0 the buffer stacks every layer's, [L, ...], and a call
// reads layer `layer`'s part where it lies: one operand per weight for all the layers, where XLA would
// copy a slice first, and a decode step's dispatch costs per operand
// (docs/performance.md#every-layer-in-one-buffer-per-weight). With layer < 0 the buffer is the part.
struct Part {
  char* data = nullptr;
  ffi::Span<const int64_t> dims;
  size_t bytes = 0;
};

template <typename B>
bool Layer(const B& b, int64_t layer, Part* out) {
  const auto dims = b.dimensions();
  char* data = static_cast<char*>(b.untyped_data());
  if (layer < 0) {
    *out = Part{data, dims, b.size_bytes()};
    return true;
  }
  if (dims.size() == 0 || layer >= dims[0]) return false;
  const size_t bytes = b.size_bytes() / dims[0];
  *out = Part{data + layer * bytes, dims.last(dims.size() - 1), bytes};
  return true;
}

// One phase of work: chunks 0..count-1, taken from one counter by every thread
// that runs Take; Wait returns once all of them are done, whoever took them.
struct Chunks {
  int64_t count = 0;
  std::atomic<int64_t> next{0}, done{0};

  template <typename Fn>
  void Take(Fn fn) {
    for (int64_t c; (c = next.fetch_add(1)) < count;) {
      fn(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  void Wait() const {
    while (done.load(std::memory_order_acquire) < count) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }
};

// Weight rows per chunk for a phase's `rows` rows of `row_bits` bits each, the one rule of the row-dot
// calls (LinearCall, Call's two phases): chunks of at most chunk_bytes of weights, whatever their dtype, and
// at least min_chunks of them, equal to a multiple of 4 rows. Unequal chunks left one core reading most of a
// call: the bench model's w2 rows went 292, 292, 292, 148 (one core 584 rows, the other 440), its wo was one
// 1 MiB chunk (docs/performance.md#thresholds-and-chunk-sizes).
inline int64_t ChunkRows(int64_t rows, int64_t row_bits, int64_t chunk_bytes, int64_t min_chunks) {
  const int64_t by_bytes = (rows * row_bits + 8 * chunk_bytes - 1) / (8 * chunk_bytes);
  const int64_t chunks = std::max<int64_t>({by_bytes, min_chunks, 1});
  return std::max<int64_t>(4, ((rows + chunks - 1) / chunks + 3) / 4 * 4);
}

// A helper that has done its part of a call stays this long taking the next calls' parts (Lingering)
// before it goes back to XLA's pool. A decode step makes 49 kernel calls a few microseconds apart; a
// pool thread woken for each arrived tens of microseconds into calls of 25-400 (docs/performance.md#a-helper-that-lingers).
constexpr int64_t kLingerNs = 50'000;  // spans the gaps within a step, not those between steps

// A kernel call's work, taken in chunks by every thread that runs Work: a helper's Work(false) returns
// when it finds no chunk left, the calling thread's Work(true) once every chunk is done.
struct Parts {
  virtual ~Parts() = default;
  virtual void Work(bool wait) = 0;
};
typedef std::shared_ptr<Parts> Job;

// The newest call, for the helpers lingering after earlier calls.
struct Lingering {
  std::mutex mu;
  Job job;             // the newest call
  int64_t wanted = 0;  // helpers it still wants
  std::atomic<uint64_t> published{0};
  std::atomic<int64_t> idle{0};  // helpers lingering now
};
inline Lingering& Lingerers() {
  static Lingering* l = new Lingering;  // never destroyed: a helper may still linger while the process exits
  return *l;
}
inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A pool task: the call's helper work, then up to kLingerNs after each part taking the next calls' parts
// (no pause instruction in the loop: it is a checked clock). A part taken after its call returned finds
// no chunk left and touches nothing.
inline void Help(Job job) {
  job->Work(false);
  Lingering& l = Lingerers();
  l.idle.fetch_add(1);
  uint64_t seen = l.published.load(std::memory_order_acquire);
  int64_t until = NowNs() + kLingerNs;
  while (true) {
    const uint64_t now_seq = l.published.load(std::memory_order_acquire);
    if (now_seq != seen) {
      seen = now_seq;
      Job next;
      {
        std::lock_guard<std::mutex> lock(l.mu);
        if (l.wanted > 0) {
          --l.wanted;
          next = l.job;
        }
      }
      if (next) {
        l.idle.fetch_sub(1);
        next->Work(false);
        l.idle.fetch_add(1);
        until = NowNs() + kLingerNs;
      }
    } else if (NowNs() > until) {
      break;
    }
  }
  l.idle.fetch_sub(1);
}

// Runs call->Work(false) on up to (cores - 1) helpers, lingering ones first (Help), the rest scheduled on
// XLA's pool, then call->Work(true) here. `call` is shared, so a helper that starts after the
// call returned finds no chunk left and touches nothing else. `items`: the most
// chunks any phase has; with one, no helper is asked (it would find nothing).
inline int64_t Cores(ffi::ThreadPool& pool) {
  // Read once: glibc's hardware_concurrency opens and reads /sys/devices/system/cpu/online at every call,
  // 5 us here, and a decode step's 49 kernel calls asked 50 times (docs/performance.md#the-cpu-count-read-once).
  static const int64_t cpus = static_cast<int64_t>(std::thread::hardware_concurrency());
  return std::min<int64_t>(pool.num_threads(), cpus);
}

inline void RunOnCores(ffi::ThreadPool& pool, const Job& call, int64_t items) {
  const int64_t helpers = std::min<int64_t>(Cores(pool) - 1, items - 1);
  if (helpers > 0) {
    Lingering& l = Lingerers();
    const int64_t lingering = std::min(helpers, l.idle.load(std::memory_order_acquire));
    if (lingering > 0) {
      {
        std::lock_guard<std::mutex> lock(l.mu);
        l.job = call;
        l.wanted = lingering;
      }
      l.published.fetch_add(1, std::memory_order_release);
    }
    for (int64_t t = lingering; t < helpers; ++t) pool.Schedule([call] { Help(call); });
  }
  call->Work(true);
}

template <typename V>
struct Expert {
  V w1, w3, w2;
  std::vector<int> rows;  // the rows that run this expert
};

template <typename W>
struct Call : Parts {
  int64_t n, d, f;
  const float* x;  // [n, d], each row in InputSlot<W>'s order
  float* y;        // [n, d]
  std::vector<Expert<W>> experts;  // the ones with rows
  float* h;  // [n, f]: the calling thread's scratch (each row is one expert's), in InputSlot<W>'s order
  int64_t rows1, rows2;  // weight rows per chunk in phase 1 and 2
  Chunks phase1, phase2;

  // Phase 1: h[r, f] = silu(w1 . x[r]) * (w3 . x[r]) for a chunk of F rows of expert i.
  void Phase1(int64_t c) {
    const int64_t per = (f + rows1 - 1) / rows1;
    const Expert<W>& e = experts[c / per];
    float* hi = h;
    const int64_t lo = (c % per) * rows1, up = std::min(f, lo + rows1);
    for (size_t r0 = 0; r0 < e.rows.size(); r0 += 4) {
      const int nr = static_cast<int>(std::min<size_t>(4, e.rows.size() - r0));
      const float* xs[4];
      for (int r = 0; r < nr; ++r) xs[r] = x + e.rows[r0 + r] * d;
      // Beyond 4 token rows, the next block of rows reads this chunk's weight
      // rows again (1 MB of w1 and of w3 by default), from the 4 MB L2 cache
      // of this host's cores where they still are.
      static thread_local std::vector<float> gate_part;  // silu(w1 . x), [rows, nr]
      gate_part.resize((up - lo) * nr);
      RowDots(e.w1, lo, up, xs, nr, d, [&](int64_t j0, int nf, float (*out)[4]) {
        for (int j = 0; j < nf; ++j)
          for (int r = 0; r < nr; ++r) gate_part[(j0 + j - lo) * nr + r] = out[j][r];
      });
      SiluInPlace(gate_part.data(), (up - lo) * nr);
      RowDots(e.w3, lo, up, xs, nr, d, [&](int64_t j0, int nf, float (*out)[4]) {
        for (int j = 0; j < nf; ++j)
          for (int r = 0; r < nr; ++r)
            hi[e.rows[r0 + r] * f + InputSlot<W>(j0 + j, f)] = gate_part[(j0 + j - lo) * nr + r] * out[j][r];
      });
    }
  }

  // Phase 2: y[r, chunk of D] = w2_i . h[r] for each expert i's rows (other rows zero).
  void Phase2(int64_t c) {
    const int64_t lo = c * rows2, up = std::min(d, lo + rows2);
    for (int64_t r = 0; r < n; ++r) std::fill(y + r * d + lo, y + r * d + up, 0.f);
    for (size_t i = 0; i < experts.size(); ++i) {
      const Expert<W>& e = experts[i];
      const float* hi = h;
      for (size_t r0 = 0; r0 < e.rows.size(); r0 += 4) {
        const int nr = static_cast<int>(std::min<size_t>(4, e.rows.size() - r0));
        const float* hs[4];
        for (int r = 0; r < nr; ++r) hs[r] = hi + e.rows[r0 + r] * f;
        RowDots(e.w2, lo, up, hs, nr, f, [&](int64_t j0, int nf, float (*out)[4]) {
          for (int j = 0; j < nf; ++j)
            for (int r = 0; r < nr; ++r) y[e.rows[r0 + r] * d + j0 + j] = out[j][r];
        });
      }
    }
  }

  // Takes chunks of both phases until none is left; the calling thread (`wait`)
  // returns only once phase 2 is done, a helper as soon as it finds no work.
  void Work(bool wait) override {
    phase1.Take([this](int64_t c) { Phase1(c); });
    phase1.Wait();
    phase2.Take([this](int64_t c) { Phase2(c); });
    if (wait) phase2.Wait();
  }
};

// The panel path, for many rows (with bfloat16 weights each chunk's rows are
// first widened into a float32 buffer that every panel then reads; that pass
// does not overlap the arithmetic, so the path pays from more rows,
// cpu_kernel.PANEL_MIN_ROWS_BF16): per expert, its rows are packed (gathered
// and transposed) into panels of 32 token columns (the last one 16),
// zero-padded: panel [K][w], w = 32 or 16. A tile of MR weight rows times one
// panel is MR x w outputs held in registers, summed over all K (one broadcast
// weight value times one or two 16-float panel vectors per step), so
// silu(w1 . x) * (w3 . x) and the scatter into y are done on the tile.
// Compute-bound, about as fast as XLA's own dot, with nothing to compile per
// expert (docs/performance.md#why-a-kernel-for-prompts-the-panel-path).
constexpr int kTileRows = 12;  // MR: 12 x 2 accumulators of 16 floats, of 32 registers
constexpr int64_t kPanelBlockRows = 2048;  // more rows (1024 tokens at k = 2) run in blocks (RunMoe)

template <int MR, int NV, typename Fn>
inline void Tile(const float* a, int64_t lda, const float* b, int64_t K, Fn epilogue) {
  v16 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = v16{};
  // Rows in threes from one pointer each (row, row + lda, row + 2 lda): as
  // base + index * 4 or 8 addresses, so no row offset spills to the stack
  // (with MR separate offsets gcc spilled 9 of the 12 to the stack).
  constexpr int G = MR >= 3 ? 3 : 1;
  const float* p[MR / G];
  for (int g = 0; g < MR / G; ++g) p[g] = a + G * g * lda;
  for (int64_t k = 0; k < K; ++k) {
    v16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const v16*>(b + k * 16 * NV + 16 * v);
    for (int g = 0; g < MR / G; ++g) {
      const float* q = p[g] + k;
      for (int j = 0; j < G; ++j) {
        const float s = q[j * lda];
        for (int v = 0; v < NV; ++v) acc[G * g + j][v] += s * bv[v];
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) epilogue(i, v, acc[i][v]);
}

// Calls Tile for weight rows [lo, hi) of a (row stride lda) times panel b of
// width 16 * nv, in blocks of kTileRows, then 3, then 1 rows; epilogue(row, v, acc).
template <typename Fn>
inline void Tiles(const float* a, int64_t lda, int64_t lo, int64_t hi, const float* b, int nv, int64_t K, Fn fn) {
  int64_t r = lo;
  auto run = [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    for (; r + MR <= hi; r += MR) {
      const int64_t r0 = r;
      auto at = [&](int i, int v, v16 acc) { fn(r0 + i, v, acc); };
      if (nv == 2) Tile<MR, 2>(a + r * lda, lda, b, K, at);
      else Tile<MR, 1>(a + r * lda, lda, b, K, at);
    }
  };
  run(std::integral_constant<int, kTileRows>{});
  run(std::integral_constant<int, 3>{});
  run(std::integral_constant<int, 1>{});
}

template <typename W>
struct PanelCall : Parts {
  int64_t n, d, f;
  const float* x;  // [n, d]
  float* y;        // [n, d]
  std::vector<Expert<W>> experts;  // the chosen ones
  std::vector<int64_t> cols;   // expert i's row count padded to 16
  float *xp, *h;               // per expert: packed x [cols, d], h [cols, f] (panel layout)
  std::vector<int64_t> xp_at, h_at;  // their offsets
  std::vector<int64_t> first_panel;  // phase 0: chunk index of expert i's first panel
  int64_t rows1, rows2;  // weight rows per chunk in phase 1 (of one expert) and 2 (of all)
  int64_t chunks1;       // phase 1 chunks per expert
  Chunks phase0, phase1, phase2;

  static int64_t Panels(int64_t cols) { return (cols + 31) / 32; }
  static int Width(int64_t cols, int64_t p) { return static_cast<int>(std::min<int64_t>(32, cols - 32 * p)); }

  // Phase 0: pack one panel of one expert's rows of x.
  void Pack(int64_t c) {
    const int64_t i = std::upper_bound(first_panel.begin(), first_panel.end(), c) - first_panel.begin() - 1;
    const int64_t p = c - first_panel[i];
    const int w = Width(cols[i], p);
    const std::vector<int>& rows = experts[i].rows;
    float* out = xp + xp_at[i] + 32 * p * d;
    for (int j = 0; j < w; ++j) {
      const int64_t t = 32 * p + j;
      if (t < static_cast<int64_t>(rows.size())) {
        const float* src = x + rows[t] * d;
        for (int64_t k = 0; k < d; ++k) out[k * w + j] = src[k];
      } else {
        for (int64_t k = 0; k < d; ++k) out[k * w + j] = 0.f;
      }
    }
  }

  // Phase 1: h = silu(w1 . x) * (w3 . x) for a chunk of F rows of one expert, every panel.
  void Phase1(int64_t c) {
    const int64_t i = c / chunks1, lo = (c % chunks1) * rows1, up = std::min(f, lo + rows1);
    const Expert<W>& e = experts[i];
    // bfloat16 weights are widened once per chunk, then read by every panel.
    static thread_local std::vector<float> buf1, buf3;
    const float* w1 = RowsAsFloat(e.w1, lo, up, buf1);
    const float* w3 = RowsAsFloat(e.w3, lo, up, buf3);
    for (int64_t p = 0; p < Panels(cols[i]); ++p) {
      const int w = Width(cols[i], p), nv = w / 16;
      const float* b = xp + xp_at[i] + 32 * p * d;
      float* hp = h + h_at[i] + 32 * p * f;
      for (int64_t r0 = lo; r0 < up; r0 += kTileRows) {
        const int64_t r1 = std::min(up, r0 + kTileRows);
        float g[kTileRows][32];
        Tiles(w1, d, r0 - lo, r1 - lo, b, nv, d, [&](int64_t r, int v, v16 acc) {
          r += lo;
          *reinterpret_cast<v16*>(&g[r - r0][16 * v]) = Silu16(acc);
        });
        Tiles(w3, d, r0 - lo, r1 - lo, b, nv, d, [&](int64_t r, int v, v16 acc) {
          r += lo;
          *reinterpret_cast<v16*>(hp + r * w + 16 * v) = *reinterpret_cast<const v16*>(&g[r - r0][16 * v]) * acc;
        });
      }
    }
  }

  // Phase 2: y[:, chunk of D] = w2_i . h_i, scattered to each expert i's rows.
  void Phase2(int64_t c) {
    const int64_t lo = c * rows2, up = std::min(d, lo + rows2);
    for (int64_t r = 0; r < n; ++r) std::fill(y + r * d + lo, y + r * d + up, 0.f);
    static thread_local std::vector<float> buf2;
    for (size_t i = 0; i < experts.size(); ++i) {
      const std::vector<int>& rows = experts[i].rows;
      const int64_t m = static_cast<int64_t>(rows.size());
      const float* w2 = RowsAsFloat(experts[i].w2, lo, up, buf2);
      for (int64_t p = 0; p < Panels(cols[i]); ++p) {
        const int w = Width(cols[i], p);
        const int64_t valid = std::min<int64_t>(w, m - 32 * p);
        Tiles(w2, f, 0, up - lo, h + h_at[i] + 32 * p * f, w / 16, f, [&](int64_t r, int v, v16 acc) {
          r += lo;
          for (int l = 0; l < 16 && 16 * v + l < valid; ++l) {
            const int64_t t = 32 * p + 16 * v + l;
            y[rows[t] * d + r] = acc[l];
          }
        });
      }
    }
  }

  void Work(bool wait) override {
    phase0.Take([this](int64_t c) { Pack(c); });
    phase0.Wait();
    phase1.Take([this](int64_t c) { Phase1(c); });
    phase1.Wait();
    phase2.Take([this](int64_t c) { Phase2(c); });
    if (wait) phase2.Wait();
  }
};

// y [n, out] = x [n, in] @ w [out, in]^T, for a few rows: the same row-dot
// product, chunks of weight rows taken from one counter, one phase.
template <typename W>
struct LinearCall : Parts {
  const float* x;
  W w;
  float* y;
  int64_t n, in, out, rows;
  Chunks chunks;

  void Chunk(int64_t c) {
    const int64_t lo = c * rows, up = std::min(out, lo + rows);
    for (int64_t r0 = 0; r0 < n; r0 += 4) {
      const int nr = static_cast<int>(std::min<int64_t>(4, n - r0));
      const float* xs[4];
      for (int r = 0; r < nr; ++r) xs[r] = x + (r0 + r) * in;
      RowDots(w, lo, up, xs, nr, in, [&](int64_t j0, int nf, float (*o)[4]) {
        for (int j = 0; j < nf; ++j)
          for (int r = 0; r < nr; ++r) y[(r0 + r) * out + j0 + j] = o[j][r];
      });
    }
  }

  void Work(bool wait) override {
    chunks.Take([this](int64_t c) { Chunk(c); });
    if (wait) chunks.Wait();
  }
};

template <typename W>
void RunLinear(ffi::ThreadPool& pool, const float* x, const W& w, float* y, int64_t n, int64_t in, int64_t out,
               int64_t chunk_bytes) {
  auto call = std::make_shared<LinearCall<W>>();
  LinearCall<W>& c = *call;
  c.x = x;
  c.w = w;
  c.y = y;
  c.n = n;
  c.in = in;
  c.out = out;
  c.rows = ChunkRows(out, W::kBits * in, chunk_bytes, 2 * Cores(pool));
  c.chunks.count = (out + c.rows - 1) / c.rows;
  RunOnCores(pool, call, c.chunks.count);
}

ffi::Error LinearCpuImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weight,
                         ffi::ResultBuffer<ffi::F32> y, int64_t chunk_bytes, int64_t layer) {
  auto wb = weight.get<ffi::AnyBuffer>(0);
  auto xd = x.dimensions();
  Part w;
  if (xd.size() != 2 || !wb.has_value() || !Layer(*wb, layer, &w) || w.dims.size() != 2)
    return ffi::Error::InvalidArgument("linear_cpu: x must be [N, I] and w [O, I] (with `layer`: [L, O, I])");
  const int64_t n = xd[0], in = xd[1], out = w.dims[0];
  const ffi::DataType dtype = wb->element_type();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  if (dtype == ffi::DataType::F32 && weight.size() == 1 && w.dims[1] == in) {
    RunLinear(pool, xp, F32View{reinterpret_cast<const float*>(w.data), in}, yp, n, in, out, chunk_bytes);
    return ffi::Error::Success();
  }
  // int8 with float32 scales per output row [O, 1] (the lm_head) or per group of G columns [O, I / G] with
  // G a power of two (the attention projections: quant.py's dense weights).
  auto sb = weight.get<ffi::AnyBuffer>(1);
  Part s;
  const bool has_scales = dtype == ffi::DataType::S8 && weight.size() == 2 && w.dims[1] == in && sb.has_value() &&
                          sb->element_type() == ffi::DataType::F32 && Layer(*sb, layer, &s) && s.dims.size() == 2 &&
                          s.dims[0] == out;
  const int64_t groups = has_scales ? s.dims[1] : 0;
  const int64_t group = groups > 0 && in % groups == 0 ? in / groups : 0;
  if (group == 0 || (groups > 1 && (group & (group - 1))))
    return ffi::Error::InvalidArgument(
        "linear_cpu: w must be float32 [O, I], or int8 [O, I] with float32 scales [O, 1] or [O, I / G], G a power of two");
  const auto* qp = reinterpret_cast<const int8_t*>(w.data);
  const auto* sp = reinterpret_cast<const float*>(s.data);
  if (groups == 1)
    RunLinear(pool, xp, I8View{qp, sp, in}, yp, n, in, out, chunk_bytes);
  else
    RunLinear(pool, xp, I8GView{qp, sp, in, groups, GroupShift(groups, group)}, yp, n, in, out, chunk_bytes);
  return ffi::Error::Success();
}

// The panel path for the experts that `c` chose: packs, then runs PanelCall on every core.
template <typename W>
ffi::Error RunPanels(ffi::ThreadPool& pool, Call<W>& c) {
  auto call = std::make_shared<PanelCall<W>>();
  PanelCall<W>& pc = *call;
  pc.n = c.n;
  pc.d = c.d;
  pc.f = c.f;
  pc.x = c.x;
  pc.y = c.y;
  int64_t xp_size = 0, h_size = 0, panels = 0;
  for (size_t i = 0; i < c.experts.size(); ++i) {
    const std::vector<int>& rows = c.experts[i].rows;
    const int64_t cols = (static_cast<int64_t>(rows.size()) + 15) / 16 * 16;
    pc.cols.push_back(cols);
    pc.xp_at.push_back(xp_size);
    pc.h_at.push_back(h_size);
    pc.first_panel.push_back(panels);
    xp_size += cols * c.d;
    h_size += cols * c.f;
    panels += PanelCall<W>::Panels(cols);
  }
  pc.experts = std::move(c.experts);
  // Reused across calls, as Call's scratch; grown, never shrunk.
  static thread_local std::vector<float> xp_scratch, h_scratch;
  if (static_cast<int64_t>(xp_scratch.size()) < xp_size) xp_scratch.resize(xp_size);
  if (static_cast<int64_t>(h_scratch.size()) < h_size) h_scratch.resize(h_size);
  pc.xp = xp_scratch.data();
  pc.h = h_scratch.data();
  // Chunks: 48 F rows of one expert (phase 1), 48 D rows of all (phase 2):
  // 4 tiles each, several hundred and 22 chunks for the bench model. A phase-2
  // chunk reads every expert's h panels (all of h, beyond L2) once for its rows,
  // so 48 rows read h half as often as 24 did, while 96 rows' weights no longer
  // stay in a core's L2 beside a panel (docs/performance.md#thresholds-and-chunk-sizes).
  pc.rows1 = 4 * kTileRows;
  pc.rows2 = 4 * kTileRows;
  pc.chunks1 = (pc.f + pc.rows1 - 1) / pc.rows1;
  pc.phase0.count = panels;
  pc.phase1.count = static_cast<int64_t>(pc.experts.size()) * pc.chunks1;
  pc.phase2.count = (pc.d + pc.rows2 - 1) / pc.rows2;
  RunOnCores(pool, call, std::max({pc.phase0.count, pc.phase1.count, pc.phase2.count}));
  return ffi::Error::Success();
}

// The grouped FFN for expert weights read through views W (F32View, BF16View, I8View,
// I4View), after MoeCpuImpl checked every weight's shape and dtype; weights: w1, w3, w2
// per expert; sizes: rows per expert, in order from row 0 (rows past their sum come out zero).
template <typename W>
ffi::Error RunMoe(ffi::ThreadPool& pool, const float* x, float* y, int64_t n, int64_t d, int64_t f,
                  const std::vector<W>& weights, const std::vector<int64_t>& sizes, int64_t chunk_bytes,
                  int64_t panel_min_rows) {
  const int64_t num_experts = static_cast<int64_t>(sizes.size());
  // Many rows run in blocks of at most kPanelBlockRows, of equal size, each a whole
  // panel-path call: beyond that, phase 2's passes over all of h (every chunk of D
  // rows reads it) run from L3 instead of mostly L2
  // (docs/performance.md#thresholds-and-chunk-sizes).
  if (n > kPanelBlockRows && n >= panel_min_rows) {
    const int64_t blocks = (n + kPanelBlockRows - 1) / kPanelBlockRows, rows = (n + blocks - 1) / blocks;
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t r1 = std::min(n, r0 + rows);
      std::vector<int64_t> part(num_experts);  // each group's rows inside [r0, r1)
      for (int64_t e = 0, start = 0; e < num_experts; start += sizes[e], ++e)
        part[e] = std::max<int64_t>(0, std::min(r1, start + sizes[e]) - std::max(r0, start));
      const ffi::Error err = RunMoe<W>(pool, x + r0 * d, y + r0 * d, r1 - r0, d, f, weights, part, chunk_bytes,
                                       panel_min_rows);
      if (err.failure()) return err;
    }
    return ffi::Error::Success();
  }
  auto call = std::make_shared<Call<W>>();
  Call<W>& c = *call;
  c.n = n;
  c.d = d;
  c.f = f;
  c.x = x;
  c.y = y;
  for (int64_t e = 0, start = 0; e < num_experts; start += sizes[e], ++e) {
    Expert<W> ex{weights[3 * e], weights[3 * e + 1], weights[3 * e + 2], {}};
    for (int64_t r = start; r < std::min(n, start + sizes[e]); ++r) ex.rows.push_back(static_cast<int>(r));
    if (!ex.rows.empty()) c.experts.push_back(std::move(ex));
  }
  if (c.experts.empty()) {
    std::fill(y, y + n * d, 0.f);
    return ffi::Error::Success();
  }
  if (n >= panel_min_rows) return RunPanels(pool, c);
  // Reused across calls: a fresh [n, f] buffer of more than 128 KB would be a
  // new mmap, zero-filled page by page, at every call. Helpers only touch it
  // while the calling thread waits for them.
  static thread_local std::vector<float> scratch, reordered;
  const size_t need = n * f;
  if (scratch.size() < need) scratch.resize(need);
  c.h = scratch.data();
  if constexpr (W::kPermuted) {  // x's rows in the order the row-dot products read them
    if (reordered.size() < static_cast<size_t>(n * d)) reordered.resize(n * d);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t k = 0; k < d; ++k) reordered[r * d + W::Slot(k, d)] = x[r * d + k];
    c.x = reordered.data();
  }
  // Phase 1's chunks are of one expert's F rows, each row of w1 and of w3 (chunk_bytes of each); phase 2's
  // of D rows of every expert's w2; at least two chunks per core in all.
  const int64_t experts = static_cast<int64_t>(c.experts.size()), per_core = 2 * Cores(pool);
  c.rows1 = ChunkRows(f, W::kBits * d, chunk_bytes, (per_core + experts - 1) / experts);
  c.rows2 = ChunkRows(d, W::kBits * f * experts, chunk_bytes, per_core);
  c.phase1.count = experts * ((f + c.rows1 - 1) / c.rows1);
  c.phase2.count = (d + c.rows2 - 1) / c.rows2;
  RunOnCores(pool, call, std::max(c.phase1.count, c.phase2.count));
  return ffi::Error::Success();
}

ffi::Error MoeCpuImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> group_sizes,
                      ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> y, int64_t chunk_bytes,
                      int64_t panel_min_rows, int64_t layer) {
  auto xd = x.dimensions(), gd = group_sizes.dimensions();
  if (xd.size() != 2 || gd.size() != 1)
    return ffi::Error::InvalidArgument("moe_cpu: x must be [M, D] and group_sizes [E]");
  const int64_t n = xd[0], d = xd[1], num_experts = gd[0];
  std::vector<int64_t> sizes(group_sizes.typed_data(), group_sizes.typed_data() + num_experts);
  for (int64_t& s : sizes) s = std::max<int64_t>(0, s);
  auto first = weights.get<ffi::AnyBuffer>(0);
  if (num_experts == 0 || !first.has_value()) return ffi::Error::InvalidArgument("moe_cpu: no expert weights");
  const ffi::DataType dtype = first->element_type();
  const bool quantized = dtype == ffi::DataType::S8 || dtype == ffi::DataType::U8;
  const int64_t per_matrix = quantized ? 2 : 1;  // quantized: values, then scales
  if (static_cast<int64_t>(weights.size()) != 3 * per_matrix)
    return ffi::Error::InvalidArgument("moe_cpu: expected w1, w3, w2 stacked over the experts (each followed by "
                                       "its scales, if quantized)");
  if (!quantized && dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("moe_cpu: expert weights must be float32, bfloat16, int8 or packed int4");
  const ffi::DataType scale_dtype = dtype == ffi::DataType::S8 ? ffi::DataType::F32 : ffi::DataType::F16;
  const int64_t packing = dtype == ffi::DataType::U8 ? 2 : 1;  // int4: two values per byte
  Part first_part;
  const int64_t f = Layer(*first, layer, &first_part) && first_part.dims.size() == 3 ? first_part.dims[1] : -1;
  // Expert e's matrix of each stacked weight: its data, its [rows, groups] scales (quantized), its rows
  // and columns (values), read in place at e's offset (one operand per weight, not per expert: a decode
  // step's dispatch costs per operand, docs/performance.md#every-layer-in-one-buffer-per-weight).
  struct Matrix { const void *w, *s; int64_t rows, cols, groups; };
  std::vector<Matrix> mats(3 * num_experts);
  for (int64_t i = 0; i < 3; ++i) {
    auto wb = weights.get<ffi::AnyBuffer>(per_matrix * i);
    if (!wb.has_value() || wb->element_type() != dtype)
      return ffi::Error::InvalidArgument("moe_cpu: expert weights must all have one dtype");
    Part w;
    const bool down = i == 2;  // w2 [E, D, F]; w1, w3 [E, F, D]
    const int64_t rows = down ? d : f, cols = down ? f : d;
    if (!Layer(*wb, layer, &w) || w.dims.size() != 3 || w.dims[0] != num_experts || w.dims[1] != rows ||
        w.dims[2] * packing != cols)
      return ffi::Error::InvalidArgument("moe_cpu: w1, w3 must be [E, F, D] and w2 [E, D, F] (int4: half the "
                                         "columns; with `layer`, [L, ...] of those), E the length of group_sizes");
    const char* data = w.data;
    const char* scales = nullptr;
    int64_t groups = 1, scale_stride = 0;
    if (quantized) {
      auto sb = weights.get<ffi::AnyBuffer>(per_matrix * i + 1);
      Part s;
      if (!sb.has_value() || sb->element_type() != scale_dtype || !Layer(*sb, layer, &s) || s.dims.size() != 3 ||
          s.dims[0] != num_experts || s.dims[1] != rows || s.dims[2] < 1 || cols % s.dims[2] != 0)
        return ffi::Error::InvalidArgument("moe_cpu: scales must be [E, rows, groups] (int8: float32, int4: float16)");
      scales = s.data;
      scale_stride = static_cast<int64_t>(s.bytes) / num_experts;
      groups = s.dims[2];
      // int8: one scale per row; int4: 32 values loaded at once (Widen4) share one scale, and a
      // group's column is found by a shift.
      const int64_t group = cols / groups;
      if (packing == 1 ? groups != 1 : group % 32 != 0 || (group & (group - 1)) != 0)
        return ffi::Error::InvalidArgument("moe_cpu: int8 weights need one scale per row, int4 groups of a power "
                                           "of two >= 32 columns");
    }
    const int64_t stride = static_cast<int64_t>(w.bytes) / num_experts;  // one expert's bytes
    for (int64_t e = 0; e < num_experts; ++e)
      mats[3 * e + i] = Matrix{data + e * stride, scales == nullptr ? nullptr : scales + e * scale_stride, rows, cols,
                               groups};
  }
  auto run = [&](auto make) {
    std::vector<decltype(make(mats[0]))> views;
    for (const Matrix& m : mats) views.push_back(make(m));
    return RunMoe(pool, x.typed_data(), y->typed_data(), n, d, f, views, sizes, chunk_bytes, panel_min_rows);
  };
  switch (dtype) {
    case ffi::DataType::F32:
      return run([](const Matrix& m) { return F32View{static_cast<const float*>(m.w), m.cols}; });
    case ffi::DataType::BF16:
      return run([](const Matrix& m) { return BF16View{static_cast<const bf16*>(m.w), m.cols}; });
    case ffi::DataType::S8:
      return run([](const Matrix& m) {
        return I8View{static_cast<const int8_t*>(m.w), static_cast<const float*>(m.s), m.cols};
      });
    default:
      return run([](const Matrix& m) {
        return I4View{static_cast<const uint8_t*>(m.w), static_cast<const uint16_t*>(m.s), m.cols, m.groups,
                      GroupShift(m.groups, m.cols / m.groups)};
      });
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeCpu, MoeCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, D], rows sorted by expert
                                  .Arg<ffi::Buffer<ffi::S32>>()  // group_sizes [E]
                                  .RemainingArgs()               // w1, w3, w2 stacked [E, ...] (each + scales)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, D]
                                  .Attr<int64_t>("chunk_bytes")     // weight bytes per chunk of work
                                  .Attr<int64_t>("panel_min_rows")  // from this many rows: panels
                                  .Attr<int64_t>("layer"));         // the weights' layer (Layer), or -1

XLA_FFI_DEFINE_HANDLER_SYMBOL(LinearCpu, LinearCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, I]
                                  .RemainingArgs()               // w [O, I] (int8: then its scales [O, 1])
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [N, O]
                                  .Attr<int64_t>("chunk_bytes")  // weight bytes per chunk of work
                                  .Attr<int64_t>("layer"));      // the weight's layer (Layer), or -1

namespace {

// cache [B, K, S, Dh] with new [B, K, T, Dh] written at slots [index[b], index[b] + T) of row b, in place
// (the result aliases the cache): a decode step's KV-cache write as one operation XLA neither fuses nor
// duplicates, so the attention that reads the written cache reads this same buffer
// (docs/benchmarks.md#long-prompts).
// Whether every one of the n row indices lies in [0, b): the cache rows a call reads or writes.
inline bool RowsInside(const int32_t* rows, int64_t n, int64_t b) {
  return std::all_of(rows, rows + n, [b](int32_t r) { return r >= 0 && r < b; });
}

ffi::Error WriteCacheCpuImpl(ffi::Buffer<ffi::F32> cache, ffi::Buffer<ffi::F32> update, ffi::Buffer<ffi::S32> index,
                             ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out, int64_t layer) {
  Part part;
  if (!Layer(cache, layer, &part))
    return ffi::Error::InvalidArgument("write_cache_cpu: `layer` is not a layer of the cache [L, B, K, S, Dh]");
  auto cd = part.dims, ud = update.dimensions();
  if (cd.size() != 4 || ud.size() != 4 || ud[1] != cd[1] || ud[3] != cd[3] || ud[2] > cd[2] ||
      index.dimensions().size() != 1 || index.dimensions()[0] != ud[0] || rows.dimensions().size() != 1 ||
      rows.dimensions()[0] != ud[0])
    return ffi::Error::InvalidArgument(
        "write_cache_cpu: cache [B, K, S, Dh], update [P, K, T, Dh], index [P] and rows [P]");
  const int64_t b = cd[0], k = cd[1], s = cd[2], dh = cd[3], p = ud[0], t = ud[2];
  if (!RowsInside(rows.typed_data(), p, b))
    return ffi::Error::InvalidArgument("write_cache_cpu: a row index is outside the cache's rows");
  if (out->untyped_data() != cache.untyped_data())
    std::copy(cache.typed_data(), cache.typed_data() + cache.element_count(), out->typed_data());
  float* dst = out->typed_data() + (reinterpret_cast<float*>(part.data) - cache.typed_data());
  for (int64_t r = 0; r < p; ++r) {
    // As dynamic_update_slice: the start is clamped so the update fits.
    const int64_t at = std::min<int64_t>(std::max<int64_t>(index.typed_data()[r], 0), s - t);
    const int64_t row = rows.typed_data()[r];
    for (int64_t h = 0; h < k; ++h)
      std::copy(update.typed_data() + ((r * k + h) * t) * dh, update.typed_data() + ((r * k + h) * t + t) * dh,
                dst + ((row * k + h) * s + at) * dh);
  }
  return ffi::Error::Success();
}

// Lane j of the result is the sum of x[j]'s 16 lanes: four rounds of adding the even and the odd lanes of
// neighbouring vectors, each halving their number.
inline v16 Sum16(v16* x) {
  for (int n = 16; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i)
      x[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
             __builtin_shufflevector(x[2 * i], x[2 * i + 1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return x[0];
}

// Decode attention, one query per row: row r's H heads over the slots of cache row rows[r] that its mask
// admits (k_pos >= 0, k_pos <= q_pos, and q_pos - k_pos < window when window > 0), softmax in float32.
// Only the admitted slots' keys and values are read, in place: the cost follows the context, not the
// cache's length, and a serving slot's row is never copied out. A row that admits no slot (an idle
// serving slot, whose output nobody reads) gets zeros. Work items are (row, kv head) pairs, each the
// G = H / K query heads that share the kv head; each row's admitted slots are listed once, before.
struct AttendCall : Parts {
  const float *q, *k, *v;  // q [P, H, Dh]; k, v [B, K, S, Dh]
  const int32_t* rows;     // [P]
  float* out;              // [P, H, Dh]
  int64_t h, kv, s, dh;
  float scale;
  std::vector<int32_t> slots;  // every row's admitted slots, row r's at [first[r], first[r + 1])
  std::vector<int64_t> first;
  Chunks chunks;

  void Work(bool wait) override {
    chunks.Take([this](int64_t c) { Item(c); });
    if (wait) chunks.Wait();
  }

  float Dot(const float* a, const float* b) const {
    int64_t i = 0;
    float acc = 0.f;
    if (dh >= 16) {
      v16 sum = Load16(a) * Load16(b);
      for (i = 16; i + 16 <= dh; i += 16) sum += Load16(a + i) * Load16(b + i);
      acc = hsum(sum);
    }
    for (; i < dh; ++i) acc += a[i] * b[i];
    return acc;
  }

  void Item(int64_t c) {
    const int64_t r = c / kv, head = c % kv, g = h / kv;
    const int32_t* slot = slots.data() + first[r];
    static thread_local std::vector<float> p;
    float* o = out + (r * h + head * g) * dh;
    std::fill(o, o + g * dh, 0.f);
    const int64_t n = first[r + 1] - first[r];
    if (n == 0) return;
    const int64_t ld = (n + 15) / 16 * 16;  // each query head's scores padded to whole vectors
    p.assign(g * ld, 0.f);
    const float* kb = k + (rows[r] * kv + head) * s * dh;
    const float* vb = v + (rows[r] * kv + head) * s * dh;
    const float* qr = q + (r * h + head * g) * dh;
    if (dh % 16 == 0) {
      // 16 slots at a time: each slot's products as one vector, the 16 vectors summed lane-wise into one
      // (no horizontal sum per score).
      for (int64_t i0 = 0; i0 < n; i0 += 16) {
        const int64_t m = std::min<int64_t>(16, n - i0);
        for (int64_t a = 0; a < g; ++a) {
          const float* qa = qr + a * dh;
          v16 acc[16];
          for (int64_t j = 0; j < 16; ++j) {
            acc[j] = v16{};
            if (j >= m) continue;
            const float* key = kb + slot[i0 + j] * dh;
            for (int64_t d = 0; d < dh; d += 16) acc[j] += Load16(qa + d) * Load16(key + d);
          }
          *reinterpret_cast<v16*>(p.data() + a * ld + i0) = Sum16(acc) * scale;
        }
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float* key = kb + slot[i] * dh;
        for (int64_t a = 0; a < g; ++a) p[a * ld + i] = Dot(qr + a * dh, key) * scale;
      }
    }
    for (int64_t a = 0; a < g; ++a) {
      float* pa = p.data() + a * ld;
      const float top = *std::max_element(pa, pa + n);
      float total = 0.f;
      for (int64_t i = 0; i < ld; i += 16) {
        v16 e = Exp16(*reinterpret_cast<const v16*>(pa + i) - top);
        for (int64_t j = std::max<int64_t>(n - i, 0); j < 16; ++j) e[j] = 0.f;  // the padding
        *reinterpret_cast<v16*>(pa + i) = e;
        total += hsum(e);
      }
      const float inv = 1.f / total;
      for (int64_t i = 0; i < n; ++i) pa[i] *= inv;
    }
    for (int64_t i = 0; i < n; ++i) {
      const float* value = vb + slot[i] * dh;
      for (int64_t a = 0; a < g; ++a) {
        const float w = p[a * ld + i];
        float* oa = o + a * dh;
        int64_t d = 0;
        for (; d + 16 <= dh; d += 16) *reinterpret_cast<v16*>(oa + d) += w * Load16(value + d);
        for (; d < dh; ++d) oa[d] += w * value[d];
      }
    }
  }
};

ffi::Error AttendCpuImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                         ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> k_pos,
                         ffi::ResultBuffer<ffi::F32> out, int64_t window, int64_t layer) {
  Part k_layer, v_layer;
  if (!Layer(k, layer, &k_layer) || !Layer(v, layer, &v_layer))
    return ffi::Error::InvalidArgument("attend_cpu: `layer` is not a layer of the caches [L, B, K, S, Dh]");
  auto qd = q.dimensions(), kd = k_layer.dims;
  auto vd = v_layer.dims;
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || !std::equal(vd.begin(), vd.end(), kd.begin()) || qd[2] != kd[3] || kd[1] == 0 || qd[1] % kd[1] ||
      rows.dimensions().size() != 1 || rows.dimensions()[0] != qd[0] || q_pos.dimensions().size() != 1 ||
      q_pos.dimensions()[0] != qd[0] || k_pos.dimensions().size() != 2 || k_pos.dimensions()[0] != qd[0] ||
      k_pos.dimensions()[1] != kd[2])
    return ffi::Error::InvalidArgument(
        "attend_cpu: q [P, H, Dh], k and v [B, K, S, Dh] with K dividing H, rows and q_pos [P], k_pos [P, S]");
  if (!RowsInside(rows.typed_data(), qd[0], kd[0]))
    return ffi::Error::InvalidArgument("attend_cpu: a row index is outside the cache's rows");
  auto call = std::make_shared<AttendCall>();
  AttendCall& c = *call;
  c.q = q.typed_data();
  c.k = reinterpret_cast<const float*>(k_layer.data);
  c.v = reinterpret_cast<const float*>(v_layer.data);
  c.rows = rows.typed_data();
  c.out = out->typed_data();
  c.h = qd[1];
  c.kv = kd[1];
  c.s = kd[2];
  c.dh = kd[3];
  c.first.push_back(0);
  for (int64_t r = 0; r < qd[0]; ++r) {  // attention.attention_mask's rule
    const int32_t* kp = k_pos.typed_data() + r * c.s;
    const int32_t qp = q_pos.typed_data()[r];
    for (int64_t j = 0; j < c.s; ++j)
      if (kp[j] >= 0 && kp[j] <= qp && (window <= 0 || qp - kp[j] < window)) c.slots.push_back(static_cast<int32_t>(j));
    c.first.push_back(static_cast<int64_t>(c.slots.size()));
  }
  c.scale = 1.f / std::sqrt(static_cast<float>(c.dh));
  c.chunks.count = qd[0] * kd[1];
  RunOnCores(pool, call, c.chunks.count);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WriteCacheCpu, WriteCacheCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cache [B, K, S, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // update [P, K, T, Dh]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index [P]: the first slot of each update row
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows [P]: the cache row of each update row
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the cache, written (aliases the first argument)
                                  .Attr<int64_t>("layer"));      // the cache's layer (Layer), or -1

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttendCpu, AttendCpuImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [P, H, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache [B, K, S, Dh]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache [B, K, S, Dh]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows [P]: each query row's cache row
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos [P]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // k_pos [P, S]: negative marks an empty slot
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [P, H, Dh]
                                  .Attr<int64_t>("window")       // sliding window, 0: none
                                  .Attr<int64_t>("layer"));      // the caches' layer (Layer), or -1
