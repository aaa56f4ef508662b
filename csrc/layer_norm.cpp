// LayerNorm on CPU, following the fusion engine's `full` grouping
// (palm_fast/fusion: one forward kernel; a two-stage backward).
//
//   forward   mean = sum_N(x) / N,  var = sum_N((x - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
//             y = (x - mean) * rstd * weight (+ bias)
//   backward  xhat = (x - mean) * rstd,  g = dy * weight
//             dx = rstd * (g - xhat * sum_N(xhat * g) / N - sum_N(g) / N)
//             dweight = sum_M(dy * xhat),  dbias = sum_M(dy)
//   add+LN    y_sum = x + a (+ m);  out = LN(y_sum)   (LN of the fp32 sum, as the CUDA kernel)
//
// Grouping: the forward is one pass per row (the row is held in cache: a sum, a sum of
// squared deviations, then normalise + affine).  The backward's stage 1 runs per row
// (two row sums, then dx) and accumulates dy * xhat and dy into per-chunk partial rows;
// stage 2 sums the partial rows over chunks in a fixed order.  Chunks are a fixed number
// of rows that depends on M only, never on the thread count, so dweight / dbias are
// bitwise identical for any number of threads (no atomics).
//
// Outputs of kStreamBytes and more are written with streaming (non-temporal) stores: see
// Store below.
//
// Element types: x / dy / y in float, Half or BFloat16 (one template, AT_DISPATCH_SWITCH);
// weight / bias are converted once to fp32 (they may be x's dtype or fp32), all
// arithmetic is fp32, mean / rstd are fp32 [M], dweight / dbias come back in weight's dtype.

// SIMD Vectorized (AVX2) for this extension: see cpu_capability.h.
#include "cpu_capability.h"  // must precede every ATen include

#include "cpu_alloc.h"
#include "cpu_convert.h"
#include "palm_fast.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>


namespace palm_fast {
namespace {

using fVec = at::vec::Vectorized<float>;

// ---------------------------------------------------------------- output stores
// Outputs of at least kStreamBytes (larger than a small machine's last-level cache: their
// rows would leave the cache before any consumer reads them) are written with streaming
// stores, which go to memory without first reading each line into the cache and without
// evicting the inputs. Measured on the 2-core Zen 1 CI VM, 4096 x 4096 fp32 (64 MiB out):
// forward, backward and add + LN 15-20% faster (bf16: 5%). A row is streamed only when it starts 32-byte aligned; every thread
// fences its streamed rows (stream_fence) before its part of the parallel loop ends. The
// values are the same either way: only the path of the writes changes.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

inline bool stream_output(int64_t bytes) { return bytes >= kStreamBytes; }

inline bool aligned32(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 31) == 0; }

// Orders a thread's streaming stores before what follows (the end of its parallel part).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <bool kStream>
struct Store {
  static void put(float* p, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (kStream) {
      _mm256_stream_ps(p, v);
      return;
    }
#endif
    v.store(p);
  }
  template <typename V>
  static void put16(void* p, const V& v) {  // a vector of 16 Half / BFloat16
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (kStream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
      return;
    }
#endif
    v.store(p);
  }
};

// f(Store<true>{}) when `stream` (and streaming stores exist), else f(Store<false>{}).
template <typename F>
inline void with_store(bool stream, F&& f) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    f(Store<true>{});
    return;
  }
#else
  (void)stream;
#endif
  f(Store<false>{});
}

// float, Half and BFloat16 (one template instantiated per type; fp64 is rejected in Python).
#define PF_DISPATCH_FLOATS(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---------------------------------------------------------------- row <-> fp32 buffers
// Rows are processed in fp32.  A float row is used in place; a Half / BFloat16 row is
// converted into (or out of) a per-thread fp32 buffer, which stays in cache.

template <typename T, typename S = Store<false>>
inline void from_float(const float* src, T* dst, int64_t n, S = {}) {
  using bVec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    S::put16(dst + i,
             at::vec::convert_from_float<T>(fVec::loadu(src + i), fVec::loadu(src + i + fVec::size())));
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// from_float that also leaves the rounded values in src (what a load of dst gives back):
// one conversion per element for both.
template <typename T, typename S>
inline void from_float_rounding(float* src, T* dst, int64_t n, S) {
  using bVec = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    const bVec b = at::vec::convert_from_float<T>(fVec::loadu(src + i), fVec::loadu(src + i + fVec::size()));
    S::put16(dst + i, b);
    auto [lo, hi] = at::vec::convert_to_float<T>(b);
    lo.store(src + i);
    hi.store(src + i + fVec::size());
  }
  for (; i < n; ++i) {
    const T t = static_cast<T>(src[i]);
    dst[i] = t;
    src[i] = static_cast<float>(t);
  }
}

// An fp32 view of a T row: the row itself for float, else `buf` filled by conversion.
template <typename T>
inline const float* load_row(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float(src, buf, n);
    return buf;
  }
}

// ---------------------------------------------------------------- fp32 row primitives

// sum_i x[i], with four vector accumulators (fixed order: deterministic).
inline float row_sum(const float* x, int64_t n) {
  fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  const int64_t V = fVec::size();
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    a0 += fVec::loadu(x + i);
    a1 += fVec::loadu(x + i + V);
    a2 += fVec::loadu(x + i + 2 * V);
    a3 += fVec::loadu(x + i + 3 * V);
  }
  for (; i + V <= n; i += V) a0 += fVec::loadu(x + i);
  float s = at::vec::vec_reduce_all<float>(std::plus<fVec>(), (a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += x[i];
  return s;
}

// (sum_i d[i], sum_i d[i]^2) with d = x - mean: the deviations' first moment corrects the
// rounded mean (see normalize_row), the second gives the variance.
struct DevMoments {
  float sum, sq;
};
inline DevMoments row_dev_moments(const float* x, float mean, int64_t n) {
  const fVec vm(mean);
  fVec a0(0.f), a1(0.f), a2(0.f), a3(0.f), s0(0.f), s1(0.f);
  const int64_t V = fVec::size();
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    fVec d0 = fVec::loadu(x + i) - vm, d1 = fVec::loadu(x + i + V) - vm;
    fVec d2 = fVec::loadu(x + i + 2 * V) - vm, d3 = fVec::loadu(x + i + 3 * V) - vm;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
    s0 += d0 + d1;
    s1 += d2 + d3;
  }
  for (; i + V <= n; i += V) {
    fVec d = fVec::loadu(x + i) - vm;
    a0 = at::vec::fmadd(d, d, a0);
    s0 += d;
  }
  float sq = at::vec::vec_reduce_all<float>(std::plus<fVec>(), (a0 + a1) + (a2 + a3));
  float sum = at::vec::vec_reduce_all<float>(std::plus<fVec>(), s0 + s1);
  for (; i < n; ++i) {
    const float d = x[i] - mean;
    sq += d * d;
    sum += d;
  }
  return {sum, sq};
}

// One row's statistics and normalisation: y = (x - mean) * rstd * w (+ b).
template <typename S = Store<false>>
inline void normalize_row(const float* x, const float* w, const float* b, float* y, int64_t n,
                          float eps, float* mean_out, float* rstd_out, S = {}) {
  // The mean as one rounded sum / n, then corrected by the deviations' own mean: for a row
  // of equal values (variance 0) the rounded mean alone left x - mean != 0, which rstd =
  // eps^-1/2 amplified (|y| up to 0.3 for a row of 10000.0; torch: exactly 0), and rows far
  // from zero lost accuracy the same way. sum (d - c)^2 = sum d^2 - c sum d, c = sum d / n.
  const float fn = static_cast<float>(n);
  const float mean0 = row_sum(x, n) / fn;
  const DevMoments dm = row_dev_moments(x, mean0, n);
  const float c = dm.sum / fn;
  const float mean = mean0 + c;
  // Clamped at 0 (rounding), NaN kept: with overflowing squares, inf - inf is NaN, and
  // std::max(0.f, NaN) returned 0 (rstd = eps^-1/2: huge finite garbage, where torch and
  // the generated GPU kernel give NaN).
  const float v = (dm.sq - c * dm.sum) / fn;
  const float var = v < 0.f ? 0.f : v;
  const float rstd = 1.f / std::sqrt(var + eps);
  *mean_out = mean;
  *rstd_out = rstd;
  // y = x * s - mean * s with s = rstd * w (x * s + c form: one fmadd per element)
  const fVec vm(mean), vr(rstd);
  const int64_t V = fVec::size();
  int64_t i = 0;
  if (b != nullptr) {
    for (; i + V <= n; i += V) {
      fVec s = vr * fVec::loadu(w + i);
      S::put(y + i, at::vec::fmadd(fVec::loadu(x + i) - vm, s, fVec::loadu(b + i)));
    }
    for (; i < n; ++i) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
  } else {
    for (; i + V <= n; i += V) {
      S::put(y + i, (fVec::loadu(x + i) - vm) * (vr * fVec::loadu(w + i)));
    }
    for (; i < n; ++i) y[i] = (x[i] - mean) * (rstd * w[i]);
  }
}

// fp32 copies of weight and bias (no copy when they already are fp32 and contiguous).
inline at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// fp32 weight [N] and bias [N] (undefined when absent), checked against the row length.
inline std::pair<at::Tensor, at::Tensor> affine_as_float(const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         int64_t N, const char* op) {
  TORCH_CHECK(weight.numel() == N, op, ": weight must have N elements");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, op, ": bias must have N elements");
    b = as_float(*bias);
  }
  return {as_float(weight), b};
}

// ---------------------------------------------------------------- forward

template <typename T>
void layer_norm_fwd_impl(const T* x, const float* w, const float* b, T* y, float* mean,
                         float* rstd, int64_t M, int64_t N, float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  const bool stream = stream_output(M * N * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> xbuf(std::is_same_v<T, float> ? 0 : N), ybuf(std::is_same_v<T, float> ? 0 : N);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = load_row(x + r * N, xbuf.data(), N);
      with_store(stream && aligned32(y + r * N), [&](auto st) {
        if constexpr (std::is_same_v<T, float>) {
          normalize_row(xr, w, b, y + r * N, N, eps, mean + r, rstd + r, st);
        } else {  // the fp32 row stays in cache; its conversion is what is streamed
          normalize_row(xr, w, b, ybuf.data(), N, eps, mean + r, rstd + r);
          from_float(ybuf.data(), y + r * N, N, st);
        }
      });
    }
    if (stream) stream_fence();
  });
}

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x_in.dim() == 2, "layer_norm_fwd: x must be 2-D [M, N]");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor w, b;  // (not a structured binding: C++17 lambdas cannot capture those)
  std::tie(w, b) = affine_as_float(weight, bias, N, "layer_norm_fwd");
  at::Tensor y = empty_output(x.sizes(), x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  if (M > 0 && N > 0) {
    PF_DISPATCH_FLOATS(x.scalar_type(), "layer_norm_fwd", [&] {
      layer_norm_fwd_impl<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
                                    b.defined() ? b.const_data_ptr<float>() : nullptr,
                                    y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(),
                                    rstd.mutable_data_ptr<float>(), M, N, static_cast<float>(eps));
    });
  }
  return {y, mean, rstd};
}

// ---------------------------------------------------------------- fused add + forward

template <typename T>
void add_layer_norm_fwd_impl(const T* x, const T* a, const T* m, const float* w, const float* b,
                             T* ysum, T* out, float* mean, float* rstd, int64_t M, int64_t N,
                             float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  const bool stream = stream_output(M * N * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    constexpr bool is_f = std::is_same_v<T, float>;
    std::vector<float> sbuf(N), abuf(is_f ? 0 : N), obuf(is_f ? 0 : N);
    const int64_t V = fVec::size();
    for (int64_t r = r0; r < r1; ++r) {
      // s = x + a (+ m) in fp32, held in sbuf (one cache-resident row)
      float* s = sbuf.data();
      const float* xr = load_row(x + r * N, s, N);
      const float* ar = load_row(a + r * N, abuf.data(), N);
      int64_t i = 0;
      for (; i + V <= N; i += V) (fVec::loadu(xr + i) + fVec::loadu(ar + i)).store(s + i);
      for (; i < N; ++i) s[i] = xr[i] + ar[i];
      if (m != nullptr) {
        const float* mr = load_row(m + r * N, abuf.data(), N);
        i = 0;
        for (; i + V <= N; i += V) (fVec::loadu(s + i) + fVec::loadu(mr + i)).store(s + i);
        for (; i < N; ++i) s[i] += mr[i];
      }
      with_store(stream && aligned32(ysum + r * N) && aligned32(out + r * N), [&](auto st) {
        using S = decltype(st);
        if constexpr (is_f) {
          int64_t j = 0;
          for (; j + V <= N; j += V) S::put(ysum + r * N + j, fVec::loadu(s + j));
          for (; j < N; ++j) ysum[r * N + j] = s[j];
          normalize_row(s, w, b, out + r * N, N, eps, mean + r, rstd + r, st);
        } else {  // the fp32 rows stay in cache; their conversions are what is streamed
          // The sum is rounded to T first and normalised as rounded: y_sum is what the
          // backward gets (saved), and what the reference normalises (x + a + m in T).
          from_float_rounding(s, ysum + r * N, N, st);
          normalize_row(s, w, b, obuf.data(), N, eps, mean + r, rstd + r);
          from_float(obuf.data(), out + r * N, N, st);
        }
      });
    }
    if (stream) stream_fence();
  });
}

std::vector<at::Tensor> add_layer_norm_fwd(const at::Tensor& x_in, const at::Tensor& a_in,
                                           const c10::optional<at::Tensor>& m_in,
                                           const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x_in.dim() == 2, "add_layer_norm_fwd: x must be 2-D [M, N]");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(a_in.sizes() == x.sizes() && a_in.scalar_type() == x.scalar_type(),
              "add_layer_norm_fwd: a must match x");
  const at::Tensor a = a_in.contiguous();
  at::Tensor m;
  if (m_in.has_value() && m_in->defined()) {
    TORCH_CHECK(m_in->sizes() == x.sizes() && m_in->scalar_type() == x.scalar_type(),
                "add_layer_norm_fwd: m must match x");
    m = m_in->contiguous();
  }
  at::Tensor w, b;  // (not a structured binding: C++17 lambdas cannot capture those)
  std::tie(w, b) = affine_as_float(weight, bias, N, "add_layer_norm_fwd");
  at::Tensor ysum = empty_output(x.sizes(), x.options());
  at::Tensor out = empty_output(x.sizes(), x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  if (M > 0 && N > 0) {
    PF_DISPATCH_FLOATS(x.scalar_type(), "add_layer_norm_fwd", [&] {
      add_layer_norm_fwd_impl<scalar_t>(
          x.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
          m.defined() ? m.const_data_ptr<scalar_t>() : nullptr, w.const_data_ptr<float>(),
          b.defined() ? b.const_data_ptr<float>() : nullptr, ysum.mutable_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(),
          rstd.mutable_data_ptr<float>(), M, N, static_cast<float>(eps));
    });
  }
  return {ysum, out, mean, rstd};
}

// ---------------------------------------------------------------- backward

// Rows per chunk of the column partial sums: a function of M only (never of the thread
// count), so the partials and their fixed-order reduction are identical for any threads.
inline int64_t chunk_rows(int64_t M) {
  constexpr int64_t kMinRows = 32, kMaxChunks = 256;
  return std::max<int64_t>(kMinRows, (M + kMaxChunks - 1) / kMaxChunks);
}

// One row of dx = rstd * (g - xhat * c1 - c2), g = dy * w, xhat = (x - mu) * rstd.
template <typename S = Store<false>>
inline void dx_row(const float* xr, const float* dyr, const float* w, float mu, float rs, float c1, float c2,
                   float* dxr, int64_t N, S = {}) {
  const fVec vmu(mu), vrs(rs), vc1(c1), vc2(c2);
  const int64_t V = fVec::size();
  int64_t i = 0;
  for (; i + V <= N; i += V) {
    fVec h = (fVec::loadu(xr + i) - vmu) * vrs;
    fVec g = fVec::loadu(dyr + i) * fVec::loadu(w + i);
    S::put(dxr + i, (g - at::vec::fmadd(h, vc1, vc2)) * vrs);
  }
  for (; i < N; ++i) {
    const float h = (xr[i] - mu) * rs, g = dyr[i] * w[i];
    dxr[i] = (g - (h * c1 + c2)) * rs;
  }
}

template <typename T>
void layer_norm_bwd_impl(const T* dy, const T* x, const float* w, const float* mean,
                         const float* rstd, T* dx, float* pw, float* pb, int64_t M, int64_t N) {
  const int64_t rows = chunk_rows(M);
  const int64_t n_chunks = (M + rows - 1) / rows;
  const float inv_n = 1.f / static_cast<float>(N);
  const int64_t V = fVec::size();
  const bool stream = stream_output(M * N * static_cast<int64_t>(sizeof(T)));
  // Stage 1: per row dx; per chunk partial rows pw[c] = sum dy * xhat, pb[c] = sum dy.
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    constexpr bool is_f = std::is_same_v<T, float>;
    std::vector<float> xbuf(is_f ? 0 : N), dybuf(is_f ? 0 : N), dxbuf(is_f ? 0 : N);
    for (int64_t c = c0; c < c1; ++c) {
      float* pwc = pw != nullptr ? pw + c * N : nullptr;
      float* pbc = pb != nullptr ? pb + c * N : nullptr;
      if (pwc != nullptr) std::fill(pwc, pwc + N, 0.f);
      if (pbc != nullptr) std::fill(pbc, pbc + N, 0.f);
      const int64_t r_end = std::min(M, (c + 1) * rows);
      for (int64_t r = c * rows; r < r_end; ++r) {
        const float* xr = load_row(x + r * N, xbuf.data(), N);
        const float* dyr = load_row(dy + r * N, dybuf.data(), N);
        const float mu = mean[r], rs = rstd[r];
        const fVec vmu(mu), vrs(rs);
        // pass 1: sums of xhat * g and g (g = dy * w); column partials
        fVec s1(0.f), s2(0.f), t1(0.f), t2(0.f);
        int64_t i = 0;
        for (; i + 2 * V <= N; i += 2 * V) {
          fVec d0 = fVec::loadu(dyr + i), d1 = fVec::loadu(dyr + i + V);
          fVec h0 = (fVec::loadu(xr + i) - vmu) * vrs, h1 = (fVec::loadu(xr + i + V) - vmu) * vrs;
          fVec g0 = d0 * fVec::loadu(w + i), g1 = d1 * fVec::loadu(w + i + V);
          s1 = at::vec::fmadd(h0, g0, s1);
          t1 = at::vec::fmadd(h1, g1, t1);
          s2 += g0;
          t2 += g1;
          if (pwc != nullptr) {
            at::vec::fmadd(d0, h0, fVec::loadu(pwc + i)).store(pwc + i);
            at::vec::fmadd(d1, h1, fVec::loadu(pwc + i + V)).store(pwc + i + V);
          }
          if (pbc != nullptr) {
            (fVec::loadu(pbc + i) + d0).store(pbc + i);
            (fVec::loadu(pbc + i + V) + d1).store(pbc + i + V);
          }
        }
        for (; i + V <= N; i += V) {
          fVec d0 = fVec::loadu(dyr + i);
          fVec h0 = (fVec::loadu(xr + i) - vmu) * vrs;
          fVec g0 = d0 * fVec::loadu(w + i);
          s1 = at::vec::fmadd(h0, g0, s1);
          s2 += g0;
          if (pwc != nullptr) at::vec::fmadd(d0, h0, fVec::loadu(pwc + i)).store(pwc + i);
          if (pbc != nullptr) (fVec::loadu(pbc + i) + d0).store(pbc + i);
        }
        float sum_hg = at::vec::vec_reduce_all<float>(std::plus<fVec>(), s1 + t1);
        float sum_g = at::vec::vec_reduce_all<float>(std::plus<fVec>(), s2 + t2);
        for (; i < N; ++i) {
          const float h = (xr[i] - mu) * rs, g = dyr[i] * w[i];
          sum_hg += h * g;
          sum_g += g;
          if (pwc != nullptr) pwc[i] += dyr[i] * h;
          if (pbc != nullptr) pbc[i] += dyr[i];
        }
        // pass 2: dx = rstd * (g - xhat * c1 - c2)
        const float c1 = sum_hg * inv_n, c2 = sum_g * inv_n;
        with_store(stream && aligned32(dx + r * N), [&](auto st) {
          if constexpr (is_f) {
            dx_row(xr, dyr, w, mu, rs, c1, c2, dx + r * N, N, st);
          } else {  // the fp32 row stays in cache; its conversion is what is streamed
            dx_row(xr, dyr, w, mu, rs, c1, c2, dxbuf.data(), N);
            from_float(dxbuf.data(), dx + r * N, N, st);
          }
        });
      }
    }
    if (stream) stream_fence();
  });
}

// Stage 2: out[j] = sum over chunks c (in order) of part[c, j].
void reduce_partials(const float* part, float* out, int64_t n_chunks, int64_t N) {
  const int64_t V = fVec::size();
  at::parallel_for(0, (N + V - 1) / V, 64, [&](int64_t b0, int64_t b1) {
    const int64_t j0 = b0 * V, j1 = std::min(N, b1 * V);
    int64_t j = j0;
    for (; j + V <= j1; j += V) {
      fVec acc(0.f);
      for (int64_t c = 0; c < n_chunks; ++c) acc += fVec::loadu(part + c * N + j);
      acc.store(out + j);
    }
    for (; j < j1; ++j) {
      float acc = 0.f;
      for (int64_t c = 0; c < n_chunks; ++c) acc += part[c * N + j];
      out[j] = acc;
    }
  });
}

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                       const at::Tensor& weight, const at::Tensor& mean_in,
                                       const at::Tensor& rstd_in, bool has_bias, bool need_w) {
  TORCH_CHECK(x_in.dim() == 2, "layer_norm_bwd: x must be 2-D [M, N]");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(dy_in.sizes() == x.sizes() && dy_in.scalar_type() == x.scalar_type(),
              "layer_norm_bwd: dy must match x");
  const at::Tensor dy = dy_in.contiguous();
  TORCH_CHECK(weight.numel() == N, "layer_norm_bwd: weight must have N elements");
  TORCH_CHECK(mean_in.numel() == M && mean_in.scalar_type() == at::kFloat &&
                  rstd_in.numel() == M && rstd_in.scalar_type() == at::kFloat,
              "layer_norm_bwd: mean and rstd must be fp32 with M elements");
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = as_float(weight);
  at::Tensor dx = empty_output(x.sizes(), x.options());
  const int64_t n_chunks = M > 0 ? (M + chunk_rows(M) - 1) / chunk_rows(M) : 0;
  // need_w false (frozen weight and bias): dx only, no column partials; dw / db empty.
  const bool wb = need_w, bb = need_w && has_bias;
  at::Tensor dw32 = at::zeros({wb ? N : 0}, x.options().dtype(at::kFloat));
  at::Tensor db32 = bb ? at::zeros({N}, x.options().dtype(at::kFloat)) : at::Tensor();
  if (M > 0 && N > 0) {
    at::Tensor pw = wb ? at::empty({n_chunks, N}, x.options().dtype(at::kFloat)) : at::Tensor();
    at::Tensor pb = bb ? at::empty({n_chunks, N}, x.options().dtype(at::kFloat)) : at::Tensor();
    PF_DISPATCH_FLOATS(x.scalar_type(), "layer_norm_bwd", [&] {
      layer_norm_bwd_impl<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                    w.const_data_ptr<float>(), mean.const_data_ptr<float>(),
                                    rstd.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(),
                                    wb ? pw.mutable_data_ptr<float>() : nullptr,
                                    bb ? pb.mutable_data_ptr<float>() : nullptr, M, N);
    });
    if (wb) reduce_partials(pw.const_data_ptr<float>(), dw32.mutable_data_ptr<float>(), n_chunks, N);
    if (bb) reduce_partials(pb.const_data_ptr<float>(), db32.mutable_data_ptr<float>(), n_chunks, N);
  }
  at::Tensor dw = dw32.to(weight.scalar_type());
  at::Tensor db = has_bias ? (bb ? db32.to(weight.scalar_type()) : at::empty({0}, weight.options()))
                           : at::Tensor();
  return {dx, dw, db};
}

}  // namespace

void bind_layer_norm(pybind11::module_& m) {
  m.def("layer_norm_fwd", guarded(&layer_norm_fwd), "LayerNorm forward: (y, mean, rstd)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"));
  m.def("layer_norm_bwd", guarded(&layer_norm_bwd),
        "LayerNorm backward: (dx, dweight, dbias or an undefined tensor); need_w false: dx, and dweight / dbias empty", pybind11::arg("dy"),
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("mean"), pybind11::arg("rstd"),
        pybind11::arg("has_bias"), pybind11::arg("need_w") = true);
  m.def("add_layer_norm_fwd", guarded(&add_layer_norm_fwd),
        "y_sum = x + a (+ m); out = LayerNorm(y_sum): (y_sum, out, mean, rstd)", pybind11::arg("x"),
        pybind11::arg("a"), pybind11::arg("m"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"));
}

}  // namespace palm_fast
