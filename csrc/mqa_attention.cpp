// Causal multi-query attention on CPU, forward and backward (the CPU backend of
// palm_fast::mqa_attention / palm_fast::mqa_attention_bwd).
//
// Math (one k/v head shared by the H query heads; s = scale):
//   S[t, h, j] = s q[t, h] . k[j]          for j <= t (causal), else -inf
//   P          = softmax_j S,  lse[t, h] = logsumexp_j S[t, h, j]
//   o[t, h]    = sum_j P[t, h, j] v[j]
// Backward (P recomputed from q, k and the saved lse; Dr = dO[t, h] . o[t, h]):
//   dP[t, h, j] = dO[t, h] . v[j];   dS = P (dP - Dr)
//   dq[t, h]    = s sum_j dS[t, h, j] k[j]
//   dk[j]       = s sum_{t, h} dS[t, h, j] q[t, h];   dv[j] = sum_{t, h} P[t, h, j] dO[t, h]
//
// Layout: q, o, dO [B, T, H, D] and k, v [B, T, D] contiguous; lse [B, T, H] fp32.
// The H heads of one token share the keys they see, so a task takes a block of
// tokens with all their heads (rows (t, h)), and the key loop is vectorised over
// keys with k (and v) transposed to [D, T] once per sequence: no horizontal sums.
// Causality: a row reads keys 0..t only (about half the work of a full T x T), rounded
// up to whole vectors: k and v are zero-padded to a multiple of kPad keys and the padding
// scores set to -inf. The forward normalises o once after P V (P left unnormalised).
// Each token's heads stream the sequence's whole k and v (fp32), so the kernel is fast
// while those stay in L2; palm_fast/ops/block.py (CPU_MQA_MAX_KV) routes longer ones to
// ATen's flash attention.
//
// Work split: at::parallel_for over (sequence, token block) tasks, visited in a
// zig-zag order (first, last, second, ...) so the contiguous ranges handed to the
// threads mix cheap early blocks with expensive late ones.  The backward's dk/dv
// are summed over token blocks: each task writes its own partial rows, and a
// second parallel pass adds the partials in block order (deterministic, no atomics).
// fp32 math for every dtype (inputs converted once per sequence / row).
#include "cpu_capability.h"  // must precede every ATen include

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_convert.h"
#include "cpu_pin.h"
#include "palm_fast.h"

namespace palm_fast {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Tokens per task: enough rows to amortise the per-task setup, few enough blocks
// to keep the backward's partial dk/dv buffers small. (palm_fast/ops/block.py
// _cpu_mqa_scratch mirrors this to route shapes with a large backward scratch to ATen.)
int64_t token_block(int64_t T, int64_t H) {
  int64_t tb = std::max<int64_t>(1, 64 / std::max<int64_t>(1, H));
  tb = std::max<int64_t>(tb, (T + 31) / 32);   // at most 32 blocks per sequence
  return std::min<int64_t>(tb, T);
}

// Key counts are rounded up to kPad (the micro-kernel's column width): the scores of
// the padding keys are set to -inf (probability 0) and the padded k / v rows are zeros,
// so every product runs on whole vectors with no scalar tail.
constexpr int64_t kPad = 2 * kW;
inline int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// max of p[0:n], n a multiple of kW.
inline float row_max(const float* p, int64_t n) {
  Vec m(kNegInf);
  for (int64_t j = 0; j < n; j += kW) m = at::vec::maximum(m, Vec::loadu(p + j));
  alignas(64) float buf[kW];
  m.store(buf);
  float r = buf[0];
  for (int64_t i = 1; i < kW; ++i) r = std::max(r, buf[i]);
  return r;
}

// zig-zag: 0, n-1, 1, n-2, ...
inline int64_t zigzag(int64_t i, int64_t n) { return (i % 2 == 0) ? i / 2 : n - 1 - i / 2; }

// xt[d * ld + j] = x[j * D + d] for j < n (x: [n, D] rows of one sequence).
template <typename scalar_t>
void transpose_to_float(const scalar_t* x, float* xt, int64_t n, int64_t D, int64_t ld) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) xt[d * ld + j] = static_cast<float>(x[j * D + d]);
}

// y[0:D] += alpha * x[0:D]
inline void axpy(float alpha, const float* x, float* y, int64_t D) {
  int64_t d = 0;
  const Vec va(alpha);
  for (; d + kW <= D; d += kW) at::vec::fmadd(va, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  for (; d < D; ++d) y[d] += alpha * x[d];
}

// p[0:n] = exp(p - m), n a multiple of kW (key counts are padded); returns the sum.
inline float exp_sub_sum(float* p, int64_t n, float m) {
  const Vec vm(m);
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += kW) {
    const Vec e = (Vec::loadu(p + j) - vm).exp_u20();
    e.store(p + j);
    acc = acc + e;
  }
  alignas(64) float buf[kW];
  acc.store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += buf[i];
  return s;
}

// Heads of one token processed together: 4 heads x 2 vectors of accumulators stay in
// the 16 AVX2 registers with the operand loads and the broadcast.
constexpr int64_t kHB = 4;

// C[h][c] = sum_r A[h * sah + r * sar] * Bm[r * ldb + c] for h < NH, r < R, c < n:
// a few rows of a strided matrix times a row-major block. Every product of the kernel is
// one: scores (A = query rows, Bm = transposed keys), outputs (A = probabilities, Bm =
// value rows) and the backward's dq / dk / dv (A read transposed through its strides).
// NH is a template argument: with a run-time row count the compiler kept the
// accumulators of the guarded rows in memory.
template <int NH>
void few_rows_mm_n(const float* A, int64_t sah, int64_t sar, const float* Bm, int64_t ldb, int64_t R,
                   int64_t n, float* C, int64_t ldc) {
  int64_t c = 0;
  for (; c + 2 * kW <= n; c += 2 * kW) {
    Vec c0[NH], c1[NH];
    for (int h = 0; h < NH; ++h) c0[h] = c1[h] = Vec(0.f);
    const float* bp = Bm + c;
    const float* ap = A;
    for (int64_t r = 0; r < R; ++r, bp += ldb, ap += sar) {
      Vec b0 = Vec::loadu(bp), b1 = Vec::loadu(bp + kW);
      in_register(b0, b1);  // loaded once for all NH rows (cpu_pin.h)
      for (int h = 0; h < NH; ++h) {
        const Vec ah(ap[h * sah]);
        c0[h] = at::vec::fmadd(ah, b0, c0[h]);
        c1[h] = at::vec::fmadd(ah, b1, c1[h]);
      }
    }
    for (int h = 0; h < NH; ++h) {
      c0[h].store(C + h * ldc + c);
      c1[h].store(C + h * ldc + c + kW);
    }
  }
  for (; c + kW <= n; c += kW) {
    Vec c0[NH];
    for (int h = 0; h < NH; ++h) c0[h] = Vec(0.f);
    for (int64_t r = 0; r < R; ++r) {
      Vec b0 = Vec::loadu(Bm + r * ldb + c);
      in_register(b0);
      for (int h = 0; h < NH; ++h) c0[h] = at::vec::fmadd(Vec(A[h * sah + r * sar]), b0, c0[h]);
    }
    for (int h = 0; h < NH; ++h) c0[h].store(C + h * ldc + c);
  }
  for (; c < n; ++c)
    for (int h = 0; h < NH; ++h) {
      float acc = 0.f;
      for (int64_t r = 0; r < R; ++r) acc += A[h * sah + r * sar] * Bm[r * ldb + c];
      C[h * ldc + c] = acc;
    }
}

inline void few_rows_mm(const float* A, int64_t sah, int64_t sar, int64_t nh, const float* Bm,
                        int64_t ldb, int64_t R, int64_t n, float* C, int64_t ldc) {
  switch (nh) {
    case 4: few_rows_mm_n<4>(A, sah, sar, Bm, ldb, R, n, C, ldc); break;
    case 3: few_rows_mm_n<3>(A, sah, sar, Bm, ldb, R, n, C, ldc); break;
    case 2: few_rows_mm_n<2>(A, sah, sar, Bm, ldb, R, n, C, ldc); break;
    default: few_rows_mm_n<1>(A, sah, sar, Bm, ldb, R, n, C, ldc); break;
  }
}

// S[h][j] = sum_d a[h][d] * bt[d * ld + j] (a rows of stride lda; bt: D rows of ld floats).
inline void rows_times_t(const float* a, int64_t lda, int64_t nh, const float* bt, int64_t ld,
                         int64_t D, int64_t n, float* S, int64_t ldS) {
  few_rows_mm(a, lda, 1, nh, bt, ld, D, n, S, ldS);
}

// out[h][0:D] = sum_j W[h * sh + j * sj] * x[j][0:D] (x: n rows of D floats).
inline void weights_times_rows(const float* W, int64_t sh, int64_t sj, int64_t nh, const float* x,
                               int64_t D, int64_t n, float* out, int64_t ldo) {
  few_rows_mm(W, sh, sj, nh, x, D, n, D, out, ldo);
}

template <typename scalar_t>
void fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* o, float* lse,
                int64_t B, int64_t T, int64_t H, int64_t D, float scale) {
  // k transposed and v as fp32, once per sequence, zero-padded to Tp keys (see kPad).
  const int64_t Tp = padded(T);
  std::vector<float> kt(B * D * Tp, 0.f), vf(B * Tp * D, 0.f);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      transpose_to_float(k + b * T * D, kt.data() + b * D * Tp, T, D, Tp);
      to_float(v + b * T * D, vf.data() + b * Tp * D, T * D);
    }
  });
  const int64_t tb = token_block(T, H);
  const int64_t nb = (T + tb - 1) / tb;
  at::parallel_for(0, B * nb, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(kHB * Tp), qr(kHB * D), orow(kHB * D), inv(kHB);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t task = zigzag(i, B * nb);
      const int64_t b = task / nb, t0 = (task % nb) * tb, t1 = std::min(T, t0 + tb);
      const float* ktb = kt.data() + b * D * Tp;
      const float* vb = vf.data() + b * Tp * D;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t + 1, np = padded(n);   // keys read, rounded up to kPad
        for (int64_t h0 = 0; h0 < H; h0 += kHB) {
          const int64_t nh = std::min(kHB, H - h0);
          const int64_t row0 = (b * T + t) * H + h0;
          for (int64_t e = 0; e < nh * D; ++e) qr[e] = static_cast<float>(q[row0 * D + e]) * scale;
          rows_times_t(qr.data(), D, nh, ktb, Tp, D, np, p.data(), Tp);
          for (int64_t h = 0; h < nh; ++h) {
            float* ph = p.data() + h * Tp;
            std::fill(ph + n, ph + np, kNegInf);     // causal: keys past t
            const float m = row_max(ph, np);
            const float s = exp_sub_sum(ph, np, m);  // exp(-inf) = 0 on the padding
            lse[row0 + h] = m + std::log(s);
            inv[h] = 1.f / s;
          }
          // o = (unnormalised P) V / s: the zero-padded value rows add nothing.
          weights_times_rows(p.data(), Tp, 1, nh, vb, D, np, orow.data(), D);
          for (int64_t h = 0; h < nh; ++h) {
            for (int64_t d = 0; d < D; ++d) o[(row0 + h) * D + d] = static_cast<scalar_t>(orow[h * D + d] * inv[h]);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                const scalar_t* o, const float* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv,
                int64_t B, int64_t T, int64_t H, int64_t D, float scale) {
  const int64_t Tp = padded(T);
  std::vector<float> kt(B * D * Tp, 0.f), vt(B * D * Tp, 0.f), kf(B * Tp * D, 0.f);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      transpose_to_float(k + b * T * D, kt.data() + b * D * Tp, T, D, Tp);
      transpose_to_float(v + b * T * D, vt.data() + b * D * Tp, T, D, Tp);
      to_float(k + b * T * D, kf.data() + b * Tp * D, T * D);
    }
  });
  const int64_t tb = token_block(T, H);
  const int64_t nb = (T + tb - 1) / tb;
  // Partial dk / dv of each (sequence, block): rows 0 .. t1 - 1 are written.
  std::vector<float> pdk(B * nb * T * D, 0.f), pdv(B * nb * T * D, 0.f);
  at::parallel_for(0, B * nb, 1, [&](int64_t i0, int64_t i1) {
    // The task's rows (t, h), r = (t - t0) H + h: P and dS over keys 0 .. t1 - 1 (zero past
    // each row's causal end), s q and dO; dk / dv are then reduced over rows key block by
    // key block with the accumulators in registers.
    const int64_t R = tb * H;
    std::vector<float> p(R * Tp), dp(R * Tp), qs(R * D), dor(R * D), dqr(kHB * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t task = zigzag(i, B * nb);
      const int64_t b = task / nb, blk = task % nb, t0 = blk * tb, t1 = std::min(T, t0 + tb);
      const float* ktb = kt.data() + b * D * Tp;
      const float* vtb = vt.data() + b * D * Tp;
      const float* kb = kf.data() + b * Tp * D;
      const int64_t rows = (t1 - t0) * H;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t + 1, np = padded(n);
        for (int64_t h0 = 0; h0 < H; h0 += kHB) {
          const int64_t nh = std::min(kHB, H - h0);
          const int64_t row0 = (b * T + t) * H + h0;       // global row of (t, h0)
          const int64_t r0 = (t - t0) * H + h0;             // task row
          float* pr = p.data() + r0 * Tp;
          float* dpr = dp.data() + r0 * Tp;
          float* qsr = qs.data() + r0 * D;
          float* dorr = dor.data() + r0 * D;
          for (int64_t e = 0; e < nh * D; ++e) {
            qsr[e] = static_cast<float>(q[row0 * D + e]) * scale;
            dorr[e] = static_cast<float>(dout[row0 * D + e]);
          }
          rows_times_t(qsr, D, nh, ktb, Tp, D, np, pr, Tp);     // scaled scores
          rows_times_t(dorr, D, nh, vtb, Tp, D, np, dpr, Tp);   // dP = dO . v
          for (int64_t h = 0; h < nh; ++h) {
            float* ph = pr + h * Tp;
            float* dph = dpr + h * Tp;
            float dr = 0.f;
            for (int64_t d = 0; d < D; ++d)
              dr += dorr[h * D + d] * static_cast<float>(o[(row0 + h) * D + d]);
            const float l = lse[row0 + h];
            std::fill(ph + n, ph + np, kNegInf);      // causal: P = 0 past t
            const Vec vl(l), vdr(dr);
            for (int64_t j = 0; j < np; j += kW) {    // np is a multiple of kW
              const Vec pj = (Vec::loadu(ph + j) - vl).exp_u20();
              pj.store(ph + j);
              (pj * (Vec::loadu(dph + j) - vdr)).store(dph + j);   // dS
            }
            if (np < t1) {   // keys the block's later tokens see: zero for this row
              std::fill(ph + np, ph + t1, 0.f);
              std::fill(dph + np, dph + t1, 0.f);
            }
          }
          weights_times_rows(dpr, Tp, 1, nh, kb, D, np, dqr.data(), D);   // dq = dS k
          for (int64_t e = 0; e < nh * D; ++e) dq[row0 * D + e] = static_cast<scalar_t>(dqr[e] * scale);
        }
      }
      // dk[j] = sum_r dS[r, j] (s q)[r],  dv[j] = sum_r P[r, j] dO[r]  for keys j < t1.
      float* gk = pdk.data() + task * T * D;
      float* gv = pdv.data() + task * T * D;
      for (int64_t j0 = 0; j0 < t1; j0 += kHB) {
        const int64_t nj = std::min(kHB, t1 - j0);
        // rows of tokens before key j0 see none of these keys: start at token max(t0, j0)
        const int64_t rfirst = std::max<int64_t>(0, j0 - t0) * H;
        weights_times_rows(dp.data() + rfirst * Tp + j0, 1, Tp, nj, qs.data() + rfirst * D, D,
                           rows - rfirst, gk + j0 * D, D);
        weights_times_rows(p.data() + rfirst * Tp + j0, 1, Tp, nj, dor.data() + rfirst * D, D,
                           rows - rfirst, gv + j0 * D, D);
      }
    }
  });
  // dk[b, j] = sum over blocks whose tokens reach key j (t1 > j), in block order.
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> ak(D), av(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, j = r % T;
      std::fill(ak.begin(), ak.end(), 0.f);
      std::fill(av.begin(), av.end(), 0.f);
      for (int64_t blk = j / tb; blk < nb; ++blk) {
        const int64_t off = ((b * nb + blk) * T + j) * D;
        axpy(1.f, pdk.data() + off, ak.data(), D);
        axpy(1.f, pdv.data() + off, av.data(), D);
      }
      for (int64_t d = 0; d < D; ++d) {
        dk[r * D + d] = static_cast<scalar_t>(ak[d]);
        dv[r * D + d] = static_cast<scalar_t>(av[d]);
      }
    }
  });
}

// t's sizes are exactly (a, b, c) (plain integer compares: no ArrayRef of a temporary list)
bool sizes_are(const at::Tensor& t, int64_t a, int64_t b, int64_t c) {
  return t.dim() == 3 && t.size(0) == a && t.size(1) == b && t.size(2) == c;
}

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

std::tuple<at::Tensor, at::Tensor> mqa_attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, double scale) {
  check(q, "q", 4);
  check(k, "k", 3);
  check(v, "v", 3);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(sizes_are(k, B, T, D) && sizes_are(v, B, T, D),
              "k, v: expected shape [B, T, D] = [", B, ", ", T, ", ", D, "]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k, v: expected q's dtype");
  at::Tensor o = at::empty_like(q);
  at::Tensor lse = at::empty({B, T, H}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {o, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mqa_attn_fwd", [&] {
    fwd_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                         v.const_data_ptr<scalar_t>(), o.mutable_data_ptr<scalar_t>(),
                         lse.mutable_data_ptr<float>(), B, T, H, D, static_cast<float>(scale));
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mqa_attn_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& o, const at::Tensor& lse,
                                                            double scale) {
  check(dout, "grad_out", 4);
  check(q, "q", 4);
  check(k, "k", 3);
  check(v, "v", 3);
  check(o, "o", 4);
  check(lse, "lse", 3);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(dout.sizes() == q.sizes() && o.sizes() == q.sizes(), "grad_out, o: expected q's shape");
  TORCH_CHECK(sizes_are(k, B, T, D) && sizes_are(v, B, T, D),
              "k, v: expected shape [B, T, D] = [", B, ", ", T, ", ", D, "]");
  TORCH_CHECK(sizes_are(lse, B, T, H) && lse.scalar_type() == at::kFloat,
              "lse: expected fp32 [B, T, H]");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type() &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "grad_out, k, v, o: expected q's dtype");
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // No query (H = 0, or T = 0): k and v feed nothing, their gradients are zero.
  if (q.numel() == 0) return {dq, at::zeros_like(k), at::zeros_like(v)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mqa_attn_bwd", [&] {
    bwd_kernel<scalar_t>(dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                         k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                         o.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(),
                         dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                         dv.mutable_data_ptr<scalar_t>(), B, T, H, D, static_cast<float>(scale));
  });
  return {dq, dk, dv};
}

}  // namespace

void bind_mqa_attention(pybind11::module_& m) {
  m.def("mqa_attn_fwd", guarded(&mqa_attn_fwd), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("scale"),
        "Causal MQA attention forward on CPU: q [B, T, H, D], k, v [B, T, D] -> (o, lse [B, T, H] fp32)");
  m.def("mqa_attn_bwd", guarded(&mqa_attn_bwd), pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("o"), pybind11::arg("lse"), pybind11::arg("scale"),
        "Causal MQA attention backward on CPU -> (dq, dk, dv)");
}

}  // namespace palm_fast
