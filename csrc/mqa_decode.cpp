// Multi-query decode attention and the fused RoPE + KV-cache append, on the CPU
// (the CPU backends of palm_fast::mqa_decode and palm_fast::rope_append).
//
// mqa_decode: q [B, R, hd] (R query rows per sequence: its H heads, or the heads of every
// member of a shared-prefix group) attends over the cached keys [start_b, end_b) of one
// layer; one K and one V head (MQA). For every row r:
//   s_j = scale * q[b, r] . K_b[j];  lse = log sum_j exp(s_j);  o = sum_j exp(s_j - lse) V_b[j]
// The cache is [L, N, P, hd] (contiguous: N = batch, P = max_len; paged: N = pages,
// P = page_size); token j of sequence b is row (page_table ? page_table[b, j / P] : b,
// j % P).
//
// Work split: the keys of each sequence are cut into fixed chunks of kChunk keys, one
// at::parallel_for task per (sequence, chunk, group of at most kRowGroup rows; R <= 16:
// one group). A task reads each K/V row of its chunk ONCE for all its rows, in two passes
// (each a single stream of cache rows, read in place; Half / BFloat16 rows are widened to
// fp32 in registers by the micro-kernels):
//   scores  S[r, j] = q[r] . K[j] for the whole chunk   4 rows x 3 keys per register block
//   softmax per row over the chunk: max m, P = exp(S - m), sum l
//   values  acc[r] = sum_j P[r, j] V[j]   column strips of 4 rows x 24 floats in registers
// (attend_chunk). The two-pass form measured 10-13% faster from DRAM than one pass of
// 64-key blocks with an online softmax: the prefetches follow one stream at an even rate.
// Each task writes fp32 partials (acc, m, l); a serial pass combines the chunks of a
// sequence in chunk order. Chunking depends only on the lengths, never on the
// thread count, so results are bitwise identical for any number of threads.
//
// rope_append: for token t of sequence b, position p = positions[b, t] (or
// lengths[b] + t); q[b, t, h] and k[b, t] are rotated by theta_i = p * inv_freq[i] (the
// reference apply_rope: rotate-half or interleaved pairs, features >= R pass through);
// rotated q goes to q_out (all T tokens), rotated k and v go to cache index lengths[b] + t
// for t < n_new[b]. An empty inv_freq is a plain append. Math in fp32.
// SIMD Vectorized (AVX2) for this extension: see cpu_capability.h.
#include "cpu_capability.h"  // must precede every ATen include

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_convert.h"
#include "cpu_pin.h"
#include "palm_fast.h"
#include "rope_math.h"

namespace palm_fast {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Keys per parallel task (the split of a sequence) and per inner block.
constexpr int64_t kChunk = 512;
constexpr int64_t kRowGroup = 16;  // query rows per task (at most)
constexpr int64_t kSBlock = 48;       // keys per score sub-block (a multiple of 3)
constexpr int64_t kVBlock = 32;       // value rows per value sub-block (64: 10% slower)
constexpr int64_t kSLd = kChunk + 4;  // score scratch row stride: room for a padded key group
// Prefetch distance in cache rows (fp32, hd 128, from DRAM: 16 and 64 rows measured 3-4%
// slower, 8 rows 11%, 256 rows 14%, none 20%).
constexpr int64_t kPfRows = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// max(a, b) that propagates NaN (std::max(a, NaN) returns a: a NaN score, e.g. from a NaN
// in q or in a cached key, would otherwise vanish and the row decode to zeros).
inline float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// Sum of the lanes of v.
inline float hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
#else
  alignas(64) float t[kW];
  v.store(t);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += t[i];
  return s;
#endif
}

#if defined(CPU_CAPABILITY_AVX2)
// Lane sums of 4 accumulators at once: an in-lane 4x4 transpose-and-add (unpack,
// shuffle: single-uop per 128-bit lane, unlike hadd / cross-lane permutes on some AVX2
// cores), then the two 128-bit halves. Every slot is summed in the same lane order
// ((l0 + l2) + (l1 + l3)) + ((l4 + l6) + (l5 + l7)), whichever slot a vector takes.
inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256 v = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}
#endif

// kW elements of a cache or weight row at p as an fp32 vector. Half / BFloat16 rows are
// widened in registers (exactly: bf16 is the high half of an fp32, and F16C converts
// fp16 exactly), so the micro-kernels read them in place: no fp32 scratch copy of the
// rows, which cost a store and a reload per element (bf16 decode 1.2-1.3x slower than
// fp32 with the cache in cache, where its half-size rows should make it faster).
inline Vec load_f(const float* p) { return Vec::loadu(p); }
#if defined(CPU_CAPABILITY_AVX2)
inline Vec load_f(const c10::BFloat16* p) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
inline Vec load_f(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif
// Other element types (the portable build's Half / BFloat16; double, which the dispatch
// macros instantiate but the Python layer never passes): element by element.
template <typename T>
inline Vec load_f(const T* p) {
  alignas(64) float t[kW];
  for (int64_t i = 0; i < kW; ++i) t[i] = static_cast<float>(p[i]);
  return Vec::loadu(t);
}

// Split loads for the value products: 2 * kW BFloat16 elements (AVX2) widened from one
// load as two vectors, the even elements (load_lo: shift left 16) and the odd ones
// (load_hi: mask the high halves), one integer op per vector against two (zero-extend,
// shift) for load_f. The accumulators of such a pair of vectors hold the output columns
// in that order, [c0 c2 .. c14 | c1 c3 .. c15] per 16 (unsplit_row restores the row at the
// end of a chunk). Only the column order changes: each output is still summed in key
// order, so the result is the same bits. Measured 0.90x the decode's time (bf16, 8 x 128
// heads, T=1024, in cache). The score products keep load_f: split there, the extra
// registers (mask, raw rows) made GCC spill dot_4x3's accumulators (1.11-1.24x slower).
#if defined(CPU_CAPABILITY_AVX2)
template <typename T>
constexpr bool kSplit = std::is_same_v<T, c10::BFloat16>;
inline Vec load_lo(const c10::BFloat16* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline Vec load_hi(const c10::BFloat16* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else
template <typename T>
constexpr bool kSplit = false;
#endif

// The split column order of a row of n accumulators (kSplit types) back to natural: every
// whole block of 2 * kW columns is reordered, the rest is natural already. No-op otherwise.
template <typename T>
inline void unsplit_row(float* x, int64_t n) {
  if constexpr (kSplit<T>) {
    float t[2 * kW];
    for (int64_t d = 0; d + 2 * kW <= n; d += 2 * kW) {
      for (int64_t i = 0; i < kW; ++i) {
        t[2 * i] = x[d + i];
        t[2 * i + 1] = x[d + kW + i];
      }
      std::memcpy(x + d, t, sizeof(t));
    }
  }
}

// Dot products of one fp32 row a with 4 rows b0..b3 (length hd) -> out[0..3]; and of 2
// rows with 4: the register block of the score computation. kPair = false: row a0 only
// (a1 and out1 unused; an odd last row), with the same lane sums for it.
// pf (optional): a memory range of hd / kW cache lines to prefetch, one line per step of
// the loop (spread among the FMAs: a burst of prefetches stalls on the miss buffers).
template <bool kPair = true, typename T>
inline void dot_2x4(const float* a0, const float* a1, const T* const* b, int64_t hd,
                    float* out0, float* out1, const char* pf = nullptr) {
  Vec c00(0.f), c01(0.f), c02(0.f), c03(0.f), c10(0.f), c11(0.f), c12(0.f), c13(0.f);
  int64_t d = 0;
  for (; d + kW <= hd; d += kW) {
    if (pf != nullptr) __builtin_prefetch(pf + d * (64 / kW));
    Vec x0 = Vec::loadu(a0 + d);
    Vec k0 = load_f(b[0] + d), k1 = load_f(b[1] + d);
    Vec k2 = load_f(b[2] + d), k3 = load_f(b[3] + d);
    in_register(k0, k1, k2, k3, x0);  // each row loaded once (see dot_4x3)
    c00 = at::vec::fmadd(x0, k0, c00); c01 = at::vec::fmadd(x0, k1, c01);
    c02 = at::vec::fmadd(x0, k2, c02); c03 = at::vec::fmadd(x0, k3, c03);
    if constexpr (kPair) {
      Vec x1 = Vec::loadu(a1 + d);
      in_register(x1);
      c10 = at::vec::fmadd(x1, k0, c10); c11 = at::vec::fmadd(x1, k1, c11);
      c12 = at::vec::fmadd(x1, k2, c12); c13 = at::vec::fmadd(x1, k3, c13);
    }
  }
  float r0[4], r1[4];
#if defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_ps(r0, sum4(c00, c01, c02, c03));
  _mm_storeu_ps(r1, sum4(c10, c11, c12, c13));
#else
  r0[0] = hsum(c00); r0[1] = hsum(c01); r0[2] = hsum(c02); r0[3] = hsum(c03);
  r1[0] = hsum(c10); r1[1] = hsum(c11); r1[2] = hsum(c12); r1[3] = hsum(c13);
#endif
  for (; d < hd; ++d) {  // hd not a multiple of the vector width
    for (int j = 0; j < 4; ++j) {
      r0[j] += a0[d] * static_cast<float>(b[j][d]);
      if constexpr (kPair) r1[j] += a1[d] * static_cast<float>(b[j][d]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    out0[j] = r0[j];
    if constexpr (kPair) out1[j] = r1[j];
  }
}

// Scores of 4 rows a, a + lda, a + 2 lda, a + 3 lda with 3 key rows b[0..2] -> out[i * ldo
// + j]: 12 accumulators, 3 key and 4 q loads per 12 FMAs (dot_2x4: 6 per 8), which
// measured 5-10% faster (L2-resident, both cores busy). Rows i, keys j: the same lane
// sums as dot_2x4, so a score does not depend on the kernel that made it (NaN payloads
// aside: the scalar tails' products may take their operands in either order).
// pf (optional): as in dot_2x4.
template <typename T>
inline void dot_4x3(const float* a, int64_t lda, const T* const* b, int64_t hd, float* out, int64_t ldo,
                    const char* pf = nullptr) {
  Vec c00(0.f), c01(0.f), c02(0.f), c10(0.f), c11(0.f), c12(0.f);
  Vec c20(0.f), c21(0.f), c22(0.f), c30(0.f), c31(0.f), c32(0.f);
  const T *b0 = b[0], *b1 = b[1], *b2 = b[2];
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
  int64_t d = 0;
  for (; d + kW <= hd; d += kW) {
    if (pf != nullptr) __builtin_prefetch(pf + d * (64 / kW));
    Vec k0 = load_f(b0 + d), k1 = load_f(b1 + d), k2 = load_f(b2 + d);
    in_register(k0, k1, k2);
    // Each q vector is pinned too: folded into its three FMAs as a memory operand it was
    // loaded three times (15 loads per 12 FMAs, load-bound): 1.6x this loop's throughput
    // with K in L2 (Zen 3, probes/blocks_4x3.cpp).
    Vec x = Vec::loadu(a0 + d);
    in_register(x);
    c00 = at::vec::fmadd(x, k0, c00); c01 = at::vec::fmadd(x, k1, c01); c02 = at::vec::fmadd(x, k2, c02);
    x = Vec::loadu(a1 + d);
    in_register(x);
    c10 = at::vec::fmadd(x, k0, c10); c11 = at::vec::fmadd(x, k1, c11); c12 = at::vec::fmadd(x, k2, c12);
    x = Vec::loadu(a2 + d);
    in_register(x);
    c20 = at::vec::fmadd(x, k0, c20); c21 = at::vec::fmadd(x, k1, c21); c22 = at::vec::fmadd(x, k2, c22);
    x = Vec::loadu(a3 + d);
    in_register(x);
    c30 = at::vec::fmadd(x, k0, c30); c31 = at::vec::fmadd(x, k1, c31); c32 = at::vec::fmadd(x, k2, c32);
  }
  float t[12];
#if defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_ps(t, sum4(c00, c01, c02, c10));
  _mm_storeu_ps(t + 4, sum4(c11, c12, c20, c21));
  _mm_storeu_ps(t + 8, sum4(c22, c30, c31, c32));
#else
  const Vec* cs[12] = {&c00, &c01, &c02, &c10, &c11, &c12, &c20, &c21, &c22, &c30, &c31, &c32};
  for (int i = 0; i < 12; ++i) t[i] = hsum(*cs[i]);
#endif
  const float* const rows[4] = {a0, a1, a2, a3};
  for (; d < hd; ++d) {  // hd not a multiple of the vector width
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 3; ++j) t[i * 3 + j] += rows[i][d] * static_cast<float>(b[j][d]);
    }
  }
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 3; ++j) out[i * ldo + j] = t[i * 3 + j];
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// One column strip [d, d + NV * kW) of NR accumulator rows (row stride hd):
// acc[i] += sum_j p[i * kSLd + j] V[j]. The strip stays in registers (NR * NV
// accumulators) while the n value rows stream by. NV = 0: the scalar tail [d, hd).
// Every output is summed in key order whatever the strip.
template <int NR, int NV, typename T>
inline void pv_strip(float* acc, int64_t hd, int64_t d, const float* p, const T* const* vrow, int64_t n) {
  if constexpr (NV == 0) {
    for (; d < hd; ++d) {
      for (int i = 0; i < NR; ++i) {
        float x = acc[i * hd + d];
        for (int64_t j = 0; j < n; ++j) x += p[i * kSLd + j] * static_cast<float>(vrow[j][d]);
        acc[i * hd + d] = x;
      }
    }
  } else {
    Vec a[NR][NV];
    for (int i = 0; i < NR; ++i) {
      for (int u = 0; u < NV; ++u) a[i][u] = Vec::loadu(acc + i * hd + d + u * kW);
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* vr = vrow[j] + d;
      Vec v[NV];
      if constexpr (kSplit<T> && NV % 2 == 0) {  // a split block per pair of vectors
        for (int u = 0; u < NV; u += 2) {
          v[u] = load_lo(vr + u * kW);
          v[u + 1] = load_hi(vr + u * kW);
        }
      } else {
        for (int u = 0; u < NV; ++u) v[u] = load_f(vr + u * kW);
      }
      for (int u = 0; u < NV; ++u) in_register(v[u]);  // one load per value vector for all NR rows
      for (int i = 0; i < NR; ++i) {
        const Vec pj(p[i * kSLd + j]);
        for (int u = 0; u < NV; ++u) a[i][u] = at::vec::fmadd(pj, v[u], a[i][u]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      for (int u = 0; u < NV; ++u) a[i][u].store(acc + i * hd + d + u * kW);
    }
  }
}

// The value products of rows [0, R), in the order they run: f(Int<NR>, Int<NV>, r, d) for
// each pv_strip<NR, NV> of rows [r, r + NR) at column d. Rows in fours by strips of 3
// vectors (12 accumulators; 3 value and 4 weight loads per 12 FMAs, measured 10% faster
// than 2 rows x 4 vectors), then a pair and a single row by strips of 4; narrower strips
// and a scalar tail for the rest of hd.
// Half / BFloat16 rows: 4 rows by strips of 2 vectors (8 accumulators), which measured
// 0.91x the decode's time for fp16 against 3 (fp32: 1.04x, so it keeps 3); for kSplit
// types every strip of 2 or 4 vectors is whole split blocks, and the natural-order rest
// (< 2 * kW columns) goes by a single vector and the scalar tail.
template <int NR, typename T, typename F>
inline void pv_strips(int64_t hd, F&& f) {
  constexpr int NV = NR >= 4 ? (sizeof(T) == 2 ? 2 : 3) : 4;
  int64_t d = 0;
  for (; d + NV * kW <= hd; d += NV * kW) f(Int<NV>{}, d);
  if (d + 2 * kW <= hd) {
    f(Int<2>{}, d);
    d += 2 * kW;
  }
  for (; d + kW <= hd; d += kW) f(Int<1>{}, d);
  if (d < hd) f(Int<0>{}, d);
}

template <typename T, typename F>
inline void pv_schedule(int64_t R, int64_t hd, F&& f) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) pv_strips<4, T>(hd, [&](auto nv, int64_t d) { f(Int<4>{}, nv, r, d); });
  for (; r + 2 <= R; r += 2) pv_strips<2, T>(hd, [&](auto nv, int64_t d) { f(Int<2>{}, nv, r, d); });
  if (r < R) pv_strips<1, T>(hd, [&](auto nv, int64_t d) { f(Int<1>{}, nv, r, d); });
}

// Per-task scratch: fp32 q rows (scaled), the scores of a chunk, the chunk's K / V row
// pointers (into the cache, whatever its dtype: the micro-kernels widen Half / BFloat16
// rows in registers) and cache offsets. Buffers are left uninitialised (every entry is
// written before it is read): zeroing them cost a few microseconds per call, a third of
// a short decode call's time.
template <typename scalar_t>
struct Scratch {
  template <typename T>
  using Buf = std::unique_ptr<T[]>;
  Buf<float> q, s;
  Buf<const scalar_t*> krow, vrow;
  Buf<int64_t> off;
  Scratch(int64_t R, int64_t hd)
      : q(new float[R * hd]), s(new float[R * kSLd]), krow(new const scalar_t*[kChunk + 3]),
        vrow(new const scalar_t*[kChunk]), off(new int64_t[kChunk]) {}
};

// Attention of rows q[0..R) over keys [j0, j1) (at most kChunk) of one sequence; writes
// the fp32 partial numerator acc [R, hd] (normalised by l at the end by the combine), row
// max m, row sum l. Two passes over the chunk, each a single stream of cache rows:
//   1. scores S[r, j] = q[r] . K[j] for all j (rows in fours by 3-key groups, dot_4x3;
//      the last R % 4 rows in pairs by 4-key groups, dot_2x4);
//   2. per row, the max and P = exp(S - max) over the whole chunk (no online rescaling);
//   3. acc[r] = sum_j P[r, j] V[j] by sub-blocks of kVBlock value rows (pv_schedule).
// Software prefetch walks the chunk's rows in that reading order (K rows, then V rows)
// kPfRows rows ahead of the arithmetic, a few rows after each micro-kernel: the DRAM
// reads are spread evenly over the work (a burst stalls on the core's miss buffers).
template <typename scalar_t>
void attend_chunk(const scalar_t* qb, int64_t R, int64_t hd, float scale, const scalar_t* kbase,
                  const scalar_t* vbase, const int32_t* table_row, int64_t seq_page, int64_t P,
                  int64_t j0, int64_t j1, float* acc, float* m, float* l, Scratch<scalar_t>& sc) {
  const int64_t n = j1 - j0;
  for (int64_t r = 0; r < R; ++r) {
    to_float(qb + r * hd, sc.q.get() + r * hd, hd);
    for (int64_t d = 0; d < hd; ++d) sc.q[r * hd + d] *= scale;
  }
  std::fill(acc, acc + R * hd, 0.f);
  // Cache offsets of the chunk's tokens: one division, then the page walked forward (a
  // 64-bit division per token cost about 30 us per 1024 keys).
  {
    int64_t blk = j0 / P, in = j0 - blk * P;
    int64_t base = (table_row ? int64_t(table_row[blk]) : seq_page) * P;
    for (int64_t t = 0; t < n; ++t) {
      sc.off[t] = (base + in) * hd;
      if (++in == P && t + 1 < n) {
        in = 0;
        ++blk;
        base = (table_row ? int64_t(table_row[blk]) : seq_page) * P;
      }
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    sc.krow[t] = kbase + sc.off[t];
    sc.vrow[t] = vbase + sc.off[t];
  }
  // Prefetch cursor over the reading order: index i < n is K row i, i >= n is V row i - n.
  const int64_t row_bytes = hd * static_cast<int64_t>(sizeof(scalar_t));
  int64_t pf_next = 0;
  auto prefetch_to = [&](int64_t upto) {
    upto = std::min(upto, 2 * n);
    for (; pf_next < upto; ++pf_next) {
      const char* p = reinterpret_cast<const char*>(pf_next < n ? kbase + sc.off[pf_next]
                                                                : vbase + sc.off[pf_next - n]);
      for (int64_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(p + c);
    }
  };
  prefetch_to(kPfRows);

  // 1. Scores, by sub-blocks of kSBlock keys (a multiple of 3: no key group straddles two).
  float* S = sc.s.get();
  const int64_t R4 = R - R % 4;
  for (int64_t s0 = 0; s0 < n; s0 += kSBlock) {
    const int64_t nb = std::min(kSBlock, n - s0);
    if (s0 + nb == n) {  // pad the last key group (a full sub-block needs none)
      for (int64_t j = n; j < n + 3; ++j) sc.krow[j] = sc.krow[s0];
    }
    // Prefetch rows for this sub-block: through kPfRows past its end, spread over its calls.
    const int64_t calls = (nb + 2) / 3 * (R4 / 4) + (nb + 3) / 4 * ((R - R4 + 1) / 2);
    const int64_t target = s0 + nb + kPfRows;
    const int64_t per_call = (std::max<int64_t>(0, std::min(target, 2 * n) - pf_next) + calls - 1) / calls;
    for (int64_t j = s0; j < s0 + nb; j += 3) {
      for (int64_t r = 0; r < R4; r += 4) {
        dot_4x3(sc.q.get() + r * hd, hd, sc.krow.get() + j, hd, S + r * kSLd + j, kSLd);
        prefetch_to(pf_next + per_call);
      }
    }
    if (R4 < R) {
      for (int64_t j = s0; j < s0 + nb; j += 4) {
        for (int64_t r = R4; r < R; r += 2) {
          const float* qr = sc.q.get() + r * hd;
          if (r + 1 < R) {
            dot_2x4(qr, qr + hd, sc.krow.get() + j, hd, S + r * kSLd + j, S + (r + 1) * kSLd + j);
          } else {  // an odd last row alone
            dot_2x4<false>(qr, nullptr, sc.krow.get() + j, hd, S + r * kSLd + j, nullptr);
          }
          prefetch_to(pf_next + per_call);
        }
      }
    }
    prefetch_to(target);
  }

  // 2. Softmax over the chunk, per row: P overwrites S.
  for (int64_t r = 0; r < R; ++r) {
    float* sr = S + r * kSLd;
    float mx = kNegInf;
    int64_t j = 0;
    {
      Vec vm(kNegInf);
      for (; j + kW <= n; j += kW) vm = at::vec::maximum(vm, Vec::loadu(sr + j));
      alignas(64) float t[kW];
      vm.store(t);
      for (int64_t i = 0; i < kW; ++i) mx = nan_max(mx, t[i]);
      for (; j < n; ++j) mx = nan_max(mx, sr[j]);
    }
    if (mx == kNegInf) {
      // Every score of the chunk is -inf (an infinite q or k): the reference's softmax is
      // exp(-inf - -inf) = NaN. P = 0 (no garbage in the value products; exp_u20 of a NaN
      // is the largest float, not NaN) and l = NaN, which the combine turns into a NaN row,
      // as the Triton kernels give (it used to come out as an empty row's o = 0).
      std::fill(sr, sr + n, 0.f);
      m[r] = kNegInf;
      l[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    Vec vsum(0.f);
    const Vec vmx(mx);
    for (j = 0; j + kW <= n; j += kW) {
      const Vec p = (Vec::loadu(sr + j) - vmx).exp_u20();
      p.store(sr + j);
      vsum = vsum + p;
    }
    float sum = hsum(vsum);
    for (; j < n; ++j) {
      sr[j] = std::exp(sr[j] - mx);
      sum += sr[j];
    }
    m[r] = mx;
    l[r] = sum;
  }

  // 3. Values, by sub-blocks of kVBlock rows (pv_schedule: four rows at a time share each
  // V load); the prefetches are spread over its strips.
  int64_t strips = 0;
  pv_schedule<scalar_t>(R, hd, [&](auto, auto, int64_t, int64_t) { ++strips; });
  strips = std::max<int64_t>(1, strips);  // hd = 0: no strips
  for (int64_t s0 = 0; s0 < n; s0 += kVBlock) {
    const int64_t nb = std::min(kVBlock, n - s0);
    const scalar_t* const* vr = sc.vrow.get() + s0;
    const int64_t target = n + s0 + nb + kPfRows;
    const int64_t per_strip = (std::max<int64_t>(0, std::min(target, 2 * n) - pf_next) + strips - 1) / strips;
    pv_schedule<scalar_t>(R, hd, [&](auto nr, auto nv, int64_t r, int64_t d) {
      pv_strip<decltype(nr)::value, decltype(nv)::value>(acc + r * hd, hd, d, S + s0 + r * kSLd, vr, nb);
      prefetch_to(pf_next + per_strip);
    });
    prefetch_to(target);
  }
  for (int64_t r = 0; r < R; ++r) unsplit_row<scalar_t>(acc + r * hd, hd);  // see load_lo
}

template <typename scalar_t>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const int32_t* table, int64_t n_blocks, const int32_t* starts, const int32_t* ends,
                   int64_t layer, float scale, at::Tensor& o, at::Tensor& lse) {
  const int64_t B = q.size(0), R = q.size(1), hd = q.size(2);
  const int64_t N = k_cache.size(1), P = k_cache.size(2);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kbase = k_cache.const_data_ptr<scalar_t>() + layer * N * P * hd;
  const scalar_t* vbase = v_cache.const_data_ptr<scalar_t>() + layer * N * P * hd;
  // Tasks: (sequence, chunk), in order; task_first[b] = first task of sequence b.
  std::vector<int64_t> task_first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s0 = starts ? starts[b] : 0, len = std::max<int64_t>(0, ends[b] - s0);
    task_first[b + 1] = task_first[b] + (len + kChunk - 1) / kChunk;
  }
  const int64_t n_tasks = task_first[B];
  // Many rows (a shared-prefix group's members) are split into groups of kRowGroup, one
  // task each, so that one long shared prefix still occupies every core. Depends on R only.
  const int64_t n_groups = (R + kRowGroup - 1) / kRowGroup;
  const int64_t RG = (R + n_groups - 1) / n_groups;
  std::vector<float> part_acc(n_tasks * R * hd), part_m(n_tasks * R), part_l(n_tasks * R);
  // Little work in all (a small model's decode step) runs on the calling thread: waking
  // the pool costs more, and on a loaded machine a parallel region can wait for a time slice.
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += std::max<int64_t>(0, ends[b] - (starts ? starts[b] : 0));
  const int64_t grain = total * R * hd < (int64_t(1) << 18) ? std::max<int64_t>(1, n_tasks * n_groups) : 1;
  at::parallel_for(0, n_tasks * n_groups, grain, [&](int64_t i0, int64_t i1) {
    Scratch<scalar_t> sc(RG, hd);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / n_groups, r0 = (i % n_groups) * RG, nr = std::min(RG, R - r0);
      const int64_t b = std::upper_bound(task_first.begin(), task_first.end(), t) - task_first.begin() - 1;
      const int64_t s0 = starts ? starts[b] : 0;
      const int64_t j0 = s0 + (t - task_first[b]) * kChunk;
      const int64_t j1 = std::min<int64_t>(ends[b], j0 + kChunk);
      attend_chunk<scalar_t>(qp + (b * R + r0) * hd, nr, hd, scale, kbase, vbase,
                             table ? table + b * n_blocks : nullptr, b, P, j0, j1,
                             part_acc.data() + (t * R + r0) * hd, part_m.data() + t * R + r0,
                             part_l.data() + t * R + r0, sc);
    }
  });
  // Combine the chunks of each sequence (fixed order), per (sequence, row). Serial: it
  // touches n_tasks * R * hd floats (microseconds), less than waking the thread pool
  // again, which on a busy machine can cost a scheduler time slice.
  float* lp = lse.mutable_data_ptr<float>();
  {
    std::vector<float> row(hd);
    for (int64_t i = 0; i < B * R; ++i) {
      const int64_t b = i / R, r = i % R;
      float mx = kNegInf;
      for (int64_t t = task_first[b]; t < task_first[b + 1]; ++t) mx = nan_max(mx, part_m[t * R + r]);
      std::fill(row.begin(), row.end(), 0.f);
      float den = 0.f;
      if (mx == kNegInf) {
        // Every chunk's scores are -inf (its l is NaN; a sequence without keys has no
        // chunk): o and lse NaN, as the reference's softmax gives
        for (int64_t t = task_first[b]; t < task_first[b + 1]; ++t) {
          if (part_l[t * R + r] != part_l[t * R + r]) den = part_l[t * R + r];
        }
      } else {
        for (int64_t t = task_first[b]; t < task_first[b + 1]; ++t) {
          const float w = std::exp(part_m[t * R + r] - mx);
          den += w * part_l[t * R + r];
          const float* a = part_acc.data() + (t * R + r) * hd;
          const Vec vw(w);
          int64_t d = 0;
          for (; d + kW <= hd; d += kW) at::vec::fmadd(vw, Vec::loadu(a + d), Vec::loadu(row.data() + d)).store(row.data() + d);
          for (; d < hd; ++d) row[d] += w * a[d];
        }
      }
      const float inv = den > 0.f ? 1.f / den : (den != den ? den : 0.f);   // NaN: o NaN
      lp[i] = den > 0.f ? mx + std::log(den) : (den != den ? den : kNegInf);   // NaN stays NaN
      if (o.scalar_type() == at::kFloat) {
        float* op = o.mutable_data_ptr<float>() + i * hd;
        for (int64_t d = 0; d < hd; ++d) op[d] = row[d] * inv;
      } else {
        scalar_t* op = o.mutable_data_ptr<scalar_t>() + i * hd;
        for (int64_t d = 0; d < hd; ++d) op[d] = static_cast<scalar_t>(row[d] * inv);
      }
    }
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

std::vector<at::Tensor> mqa_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache, const c10::optional<at::Tensor>& page_table,
                                       const c10::optional<at::Tensor>& starts, const at::Tensor& ends,
                                       int64_t layer, double scale, bool fp32_out) {
  // Memory-safety guards only; argument checking with good messages is in palm_fast/ops.
  check_cpu(q, "q");
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q: expected a contiguous [B, R, hd] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(), "k_cache, v_cache: expected contiguous [L, N, P, hd] tensors");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "k_cache, v_cache: expected q's dtype");
  const int64_t B = q.size(0), R = q.size(1), hd = q.size(2);
  TORCH_CHECK(k_cache.size(3) == hd, "k_cache: head dim differs from q's");
  TORCH_CHECK(0 <= layer && layer < k_cache.size(0), "layer out of range");
  TORCH_CHECK(ends.scalar_type() == at::kInt && ends.is_contiguous() && ends.numel() == B,
              "ends: expected a contiguous int32 [B] tensor");
  const int64_t N = k_cache.size(1), P = k_cache.size(2);
  TORCH_CHECK(P > 0, "k_cache: expected at least one token per page");
  const int32_t* tp = nullptr;
  int64_t n_blocks = 0;
  if (page_table.has_value()) {
    const at::Tensor& t = *page_table;
    TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == 2 && t.size(0) == B,
                "page_table: expected a contiguous int32 [B, blocks] tensor");
    tp = t.const_data_ptr<int32_t>();
    n_blocks = t.size(1);
  } else {
    TORCH_CHECK(N >= B, "k_cache: contiguous cache has fewer sequences than q");
  }
  const int32_t* sp = nullptr;
  if (starts.has_value()) {
    TORCH_CHECK(starts->scalar_type() == at::kInt && starts->is_contiguous() && starts->numel() == B,
                "starts: expected a contiguous int32 [B] tensor");
    sp = starts->const_data_ptr<int32_t>();
  }
  const int32_t* ep = ends.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {  // every row read must exist
    const int64_t s0 = sp ? sp[b] : 0;
    TORCH_CHECK(s0 >= 0 && ep[b] >= 0 && ep[b] <= (tp ? n_blocks * P : P),
                "starts/ends (seq_lens) out of range for sequence ", b, ": [", s0, ", ", ep[b], ")");
    if (tp) {
      for (int64_t blk = s0 / P; blk * P < ep[b]; ++blk) {
        TORCH_CHECK(tp[b * n_blocks + blk] >= 0 && tp[b * n_blocks + blk] < N, "page_table: invalid page ",
                    tp[b * n_blocks + blk], " for sequence ", b);
      }
    }
  }
  at::Tensor o = at::empty({B, R, hd}, q.options().dtype(fp32_out ? at::kFloat : q.scalar_type()));
  at::Tensor lse = at::empty({B, R}, q.options().dtype(at::kFloat));
  if (B == 0 || R == 0) return {o, lse};  // (no rows: and the row grouping would divide by 0)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mqa_decode_cpu", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, tp, n_blocks, sp, ep, layer, static_cast<float>(scale), o, lse);
  });
  return {o, lse};
}

// ------------------------------------------------------------------ rope_append
template <typename scalar_t>
inline void from_float(const float* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

template <typename scalar_t, typename pos_t>
void rope_append_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                        at::Tensor& v_cache, const int32_t* table, int64_t n_blocks, const int32_t* lengths,
                        const int32_t* n_new, const pos_t* pos, const float* inv_freq, int64_t half,
                        at::Tensor& q_out, int64_t layer, bool interleaved) {
  const int64_t B = k.size(0), T = k.size(1), hd = k.size(2), H = q.size(2);
  const int64_t N = k_cache.size(1), P = k_cache.size(2);
  scalar_t* kc = k_cache.mutable_data_ptr<scalar_t>() + layer * N * P * hd;
  scalar_t* vc = v_cache.mutable_data_ptr<scalar_t>() + layer * N * P * hd;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* qo = q_out.mutable_data_ptr<scalar_t>();
  // Rows of (H + 2) * hd elements: a decode step's few tokens run on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (H + 2) * hd));
  at::parallel_for(0, B * T, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(hd), c(half), s(half);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / T, t = i % T;
      const int64_t p = pos ? static_cast<int64_t>(pos[b * T + t]) : int64_t(lengths[b]) + t;
      rope_math::token_cos_sin(static_cast<float>(p), inv_freq, half, /*inverse=*/false, c.data(), s.data());
      for (int64_t h = 0; h < H; ++h) {
        to_float(qp + b * q.stride(0) + t * q.stride(1) + h * q.stride(2), row.data(), hd);
        rope_math::rotate_row(row.data(), row.data(), c.data(), s.data(), half, interleaved);
        from_float(row.data(), qo + ((b * T + t) * H + h) * hd, hd);
      }
      if (t >= n_new[b]) continue;
      const int64_t tok = int64_t(lengths[b]) + t;
      const int64_t page = table ? table[b * n_blocks + tok / P] : b;
      const int64_t off = (page * P + tok % P) * hd;
      const scalar_t* krow = kp + b * k.stride(0) + t * k.stride(1);
      if (half) {
        to_float(krow, row.data(), hd);
        rope_math::rotate_row(row.data(), row.data(), c.data(), s.data(), half, interleaved);
        from_float(row.data(), kc + off, hd);
      } else {
        std::memcpy(kc + off, krow, hd * sizeof(scalar_t));
      }
      std::memcpy(vc + off, vp + b * v.stride(0) + t * v.stride(1), hd * sizeof(scalar_t));
    }
  });
}

void rope_append_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                     at::Tensor& v_cache, const c10::optional<at::Tensor>& page_table, const at::Tensor& lengths,
                     const at::Tensor& n_new, const c10::optional<at::Tensor>& positions,
                     const at::Tensor& inv_freq, at::Tensor& q_out, int64_t layer, bool interleaved) {
  // Memory-safety guards only; argument checking with good messages is in palm_fast/ops.
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &k_cache, &v_cache, &q_out}) {
    check_cpu(*t, "tensor");
  }
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && q.dim() == 4 && q.size(0) == k.size(0) &&
                  q.size(1) == k.size(1) && q.size(3) == k.size(2), "q, k, v: shapes do not match");
  TORCH_CHECK(q.stride(3) == 1 || q.size(3) <= 1, "q: expected a unit last stride");
  TORCH_CHECK((k.stride(2) == 1 && v.stride(2) == 1) || k.size(2) <= 1, "k, v: expected a unit last stride");
  TORCH_CHECK(q_out.is_contiguous() && q_out.sizes() == q.sizes(), "q_out: expected contiguous, q's shape");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(3) == k.size(2),
              "k_cache, v_cache: expected contiguous [L, N, P, hd] tensors");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &v, &k_cache, &v_cache, &q_out}) {
    TORCH_CHECK(t->scalar_type() == k.scalar_type(), "q, k, v and the cache: expected one dtype");
  }
  TORCH_CHECK(0 <= layer && layer < k_cache.size(0), "layer out of range");
  const int64_t B = k.size(0), T = k.size(1), N = k_cache.size(1), P = k_cache.size(2);
  TORCH_CHECK(P > 0, "k_cache: expected at least one token per page");
  TORCH_CHECK(lengths.scalar_type() == at::kInt && lengths.is_contiguous() && lengths.numel() == B &&
                  n_new.scalar_type() == at::kInt && n_new.is_contiguous() && n_new.numel() == B,
              "lengths, n_new: expected contiguous int32 [B] tensors");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.is_contiguous() && 2 * inv_freq.numel() <= k.size(2),
              "inv_freq: expected a contiguous fp32 tensor of at most hd / 2 entries");
  const int32_t* lp = lengths.const_data_ptr<int32_t>();
  const int32_t* np = n_new.const_data_ptr<int32_t>();
  const int32_t* tp = nullptr;
  int64_t n_blocks = 0;
  if (page_table.has_value()) {
    TORCH_CHECK(page_table->scalar_type() == at::kInt && page_table->is_contiguous() && page_table->dim() == 2 &&
                    page_table->size(0) == B, "page_table: expected a contiguous int32 [B, blocks] tensor");
    tp = page_table->const_data_ptr<int32_t>();
    n_blocks = page_table->size(1);
  } else {
    TORCH_CHECK(N >= B, "k_cache: contiguous cache has fewer sequences than k");
  }
  for (int64_t b = 0; b < B; ++b) {  // every row written must exist
    TORCH_CHECK(lp[b] >= 0 && np[b] >= 0 && np[b] <= T, "lengths / n_new out of range for sequence ", b);
    const int64_t end = int64_t(lp[b]) + np[b];
    TORCH_CHECK(end <= (tp ? n_blocks * P : P), "cache overflow for sequence ", b);
    if (tp) {
      for (int64_t blk = lp[b] / P; blk * P < end; ++blk) {
        TORCH_CHECK(tp[b * n_blocks + blk] >= 0 && tp[b * n_blocks + blk] < N, "page_table: invalid page");
      }
    }
  }
  const int64_t half = inv_freq.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "rope_append_cpu", [&] {
    if (positions.has_value()) {
      const at::Tensor& pt = *positions;
      TORCH_CHECK(pt.is_contiguous() && pt.dim() == 2 && pt.size(0) == B && pt.size(1) == T,
                  "positions: expected a contiguous [B, T] tensor");
      if (pt.scalar_type() == at::kInt) {
        rope_append_kernel<scalar_t, int32_t>(q, k, v, k_cache, v_cache, tp, n_blocks, lp, np,
                                              pt.const_data_ptr<int32_t>(), inv_freq.const_data_ptr<float>(),
                                              half, q_out, layer, interleaved);
      } else {
        TORCH_CHECK(pt.scalar_type() == at::kLong, "positions: expected int32 or int64");
        rope_append_kernel<scalar_t, int64_t>(q, k, v, k_cache, v_cache, tp, n_blocks, lp, np,
                                              pt.const_data_ptr<int64_t>(), inv_freq.const_data_ptr<float>(),
                                              half, q_out, layer, interleaved);
      }
    } else {
      rope_append_kernel<scalar_t, int64_t>(q, k, v, k_cache, v_cache, tp, n_blocks, lp, np, nullptr,
                                            inv_freq.const_data_ptr<float>(), half, q_out, layer, interleaved);
    }
  });
}

// ------------------------------------------------------------------ prefix_merge
// The shared-prefix decode's last step: for sequence b, head h, with j = slot[b] (its row
// in the prefix pass; -1: not in a group, lse_pre taken as -inf):
//   m = max(lse_pre[j, h], lse_suf[b, h]);  w_p = exp(lse_pre - m);  w_s = exp(lse_suf - m)
//   o[b, h] = (w_p o_pre[j, h] + w_s o_suf[b, h]) / (w_p + w_s)
// One serial pass (a few thousand floats: less than waking the thread pool).
template <typename scalar_t>
void prefix_merge_kernel(const float* o_pre, const float* lse_pre, const int32_t* slot, const float* o_suf,
                         const float* lse_suf, int64_t B, int64_t H, int64_t hd, scalar_t* o) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t j = slot[b];
    for (int64_t h = 0; h < H; ++h) {
      const float ls = lse_suf[b * H + h];
      const float lp = j >= 0 ? lse_pre[j * H + h] : kNegInf;
      const float m = nan_max(lp, ls);
      const float wp = m == kNegInf ? 0.f : std::exp(lp - m), ws = m == kNegInf ? 0.f : std::exp(ls - m);
      const float inv = wp + ws > 0.f ? 1.f / (wp + ws) : 0.f;
      const float* sp = o_suf + (b * H + h) * hd;
      const float* pp = j >= 0 ? o_pre + (j * H + h) * hd : sp;
      scalar_t* op = o + (b * H + h) * hd;
      for (int64_t d = 0; d < hd; ++d) op[d] = static_cast<scalar_t>((wp * pp[d] + ws * sp[d]) * inv);
    }
  }
}

at::Tensor prefix_merge_cpu(const at::Tensor& o_pre, const at::Tensor& lse_pre, const at::Tensor& slot,
                            const at::Tensor& o_suf, const at::Tensor& lse_suf, at::ScalarType out_dtype) {
  for (const at::Tensor* t : {&o_pre, &lse_pre, &slot, &o_suf, &lse_suf}) check_cpu(*t, "tensor");
  TORCH_CHECK(o_suf.dim() == 3 && o_suf.scalar_type() == at::kFloat && o_suf.is_contiguous(),
              "o_suf: expected a contiguous fp32 [B, H, hd] tensor");
  const int64_t B = o_suf.size(0), H = o_suf.size(1), hd = o_suf.size(2);
  TORCH_CHECK(H > 0 && hd > 0, "o_suf: expected at least one head and one feature");
  TORCH_CHECK(o_pre.scalar_type() == at::kFloat && o_pre.is_contiguous() && o_pre.numel() % (H * hd) == 0,
              "o_pre: expected a contiguous fp32 [G * M, H, hd] tensor");
  const int64_t rows = o_pre.numel() / (H * hd);
  TORCH_CHECK(lse_pre.scalar_type() == at::kFloat && lse_pre.is_contiguous() && lse_pre.numel() == rows * H,
              "lse_pre: expected a contiguous fp32 [G * M, H] tensor");
  TORCH_CHECK(lse_suf.scalar_type() == at::kFloat && lse_suf.is_contiguous() && lse_suf.numel() == B * H,
              "lse_suf: expected a contiguous fp32 [B, H] tensor");
  TORCH_CHECK(slot.scalar_type() == at::kInt && slot.is_contiguous() && slot.numel() == B,
              "slot: expected a contiguous int32 [B] tensor");
  const int32_t* sl = slot.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(sl[b] < rows, "slot: out of range for sequence ", b);
  at::Tensor o = at::empty({B, H, hd}, o_suf.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "prefix_merge_cpu", [&] {
    prefix_merge_kernel<scalar_t>(o_pre.const_data_ptr<float>(), lse_pre.const_data_ptr<float>(), sl,
                                  o_suf.const_data_ptr<float>(), lse_suf.const_data_ptr<float>(), B, H, hd,
                                  o.mutable_data_ptr<scalar_t>());
  });
  return o;
}

// ------------------------------------------------------------------ small_mm
// y [M, N] = x [M, K] W[N, K]^T (+ res [M, N]) for the few rows of a decode step (M <= 16):
// a stream over the weight, which dominates the bytes. Blocks of kMmRows weight rows: x
// rows in fours are dotted with them 3 at a time (dot_4x3: each weight vector loaded, and
// widened for Half / BFloat16, once per 4 x rows), the last M % 4 rows in pairs (or
// alone) with them 4 at a time (dot_2x4). Both kernels sum every output in the same lane
// order (fp32 FMAs), so each output is computed by one thread in one order whatever the
// kernel or the thread count: bitwise identical results. Parallel over blocks of weight
// rows; the rows kAhead blocks ahead are prefetched (the weight of a whole model exceeds
// the last-level cache).
constexpr int64_t kMmRows = 12;  // weight rows per block: 4 groups of 3, or 3 of 4

template <typename scalar_t>
void small_mm_kernel(const scalar_t* x, int64_t M, int64_t K, const scalar_t* w, int64_t N,
                     const scalar_t* res, scalar_t* y) {
  std::vector<float> xf(M * K);
  for (int64_t m = 0; m < M; ++m) to_float(x + m * K, xf.data() + m * K, K);
  const int64_t n_blocks = (N + kMmRows - 1) / kMmRows;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, kMmRows * K * M));
  const int64_t M4 = M - M % 4;
  at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> out(M * kMmRows);
    // The weight rows kAhead blocks ahead are prefetched while this block is computed: by
    // its dot products (one line per k step each), the rest in one go.
    // ~128 KiB ahead (in L2): a shorter distance left the weight's DRAM reads serialised
    // with the arithmetic (measured 1.5x slower at 4 KiB per block, 4 blocks ahead).
    const int64_t row_bytes = K * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t kAhead = std::max<int64_t>(2, (128 << 10) / (kMmRows * row_bytes));
    const int64_t pf_bytes = (K / kW) * 64;  // what one dot product prefetches
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = nb * kMmRows, nn = std::min<int64_t>(kMmRows, N - n0);
      const char* pf = reinterpret_cast<const char*>(w + std::min(N, (nb + kAhead) * kMmRows) * K);
      const char* pf_end = reinterpret_cast<const char*>(w + std::min(N, (nb + kAhead + 1) * kMmRows) * K);
      auto pf_next = [&]() -> const char* {  // this call's share of the prefetches, if any left
        if (pf + pf_bytes > pf_end) return nullptr;
        const char* p = pf;
        pf += pf_bytes;
        return p;
      };
      const scalar_t* wr[kMmRows];  // a short last block repeats its last row
      for (int64_t j = 0; j < kMmRows; ++j) wr[j] = w + (n0 + std::min(j, nn - 1)) * K;
      for (int64_t m = 0; m < M4; m += 4) {
        for (int64_t j = 0; j < kMmRows; j += 3) {
          dot_4x3(xf.data() + m * K, K, wr + j, K, out.data() + m * kMmRows + j, kMmRows, pf_next());
        }
      }
      for (int64_t m = M4; m < M; m += 2) {
        for (int64_t j = 0; j < kMmRows; j += 4) {
          float* o0 = out.data() + m * kMmRows + j;
          if (m + 1 < M) {
            dot_2x4(xf.data() + m * K, xf.data() + (m + 1) * K, wr + j, K, o0, o0 + kMmRows, pf_next());
          } else {  // the odd last row alone (batch 1: half the FMAs of pairing it with itself)
            dot_2x4<false>(xf.data() + m * K, nullptr, wr + j, K, o0, nullptr, pf_next());
          }
        }
      }
      for (; pf < pf_end; pf += 64) __builtin_prefetch(pf);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < nn; ++j) {
          const int64_t i = m * N + n0 + j;
          const float v = out[m * kMmRows + j];
          y[i] = static_cast<scalar_t>(res ? static_cast<float>(res[i]) + v : v);
        }
      }
    }
  });
}

at::Tensor small_mm_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& res) {
  check_cpu(x, "x");
  check_cpu(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x, w: expected [M, K] and [N, K]");
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == x.scalar_type(), "w: expected a contiguous tensor of x's dtype");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor rc;
  if (res.has_value()) {
    check_cpu(*res, "res");
    TORCH_CHECK(res->dim() == 2 && res->size(0) == M && res->size(1) == N && res->scalar_type() == x.scalar_type(),
                "res: expected [M, N] of x's dtype");
    rc = res->contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return rc.defined() ? rc.clone() : y.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "small_mm_cpu", [&] {
    small_mm_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), M, K, w.const_data_ptr<scalar_t>(), N,
                              rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

}  // namespace

void bind_mqa_decode(pybind11::module_& m) {
  m.def("mqa_decode_cpu", guarded(&mqa_decode_cpu), pybind11::arg("q"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("page_table"), pybind11::arg("starts"), pybind11::arg("ends"),
        pybind11::arg("layer"), pybind11::arg("scale"), pybind11::arg("fp32_out"),
        "MQA decode on CPU: q [B, R, hd] over cache keys [starts[b], ends[b]) of layer -> [o, lse]");
  m.def("rope_append_cpu", guarded(&rope_append_cpu), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("page_table"),
        pybind11::arg("lengths"), pybind11::arg("n_new"), pybind11::arg("positions"),
        pybind11::arg("inv_freq"), pybind11::arg("q_out"), pybind11::arg("layer"),
        pybind11::arg("interleaved"),
        "RoPE of q and k at their positions, rotated k and v written into the cache (CPU)");
  m.def("prefix_merge_cpu", guarded(&prefix_merge_cpu), pybind11::arg("o_pre"), pybind11::arg("lse_pre"),
        pybind11::arg("slot"), pybind11::arg("o_suf"), pybind11::arg("lse_suf"), pybind11::arg("out_dtype"),
        "shared-prefix decode: merge the prefix and suffix passes by log-sum-exp (CPU)");
  m.def("small_mm_cpu", guarded(&small_mm_cpu), pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("res"),
        "y = x W^T (+ res) for few rows of x (a decode step's GEMMs, CPU)");
}

}  // namespace palm_fast
