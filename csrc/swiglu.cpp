// SwiGLU CPU kernels (the CPU backend of palm_fast::swiglu / palm_fast::swiglu_bwd).
//
// Math (x = value | gate over the last dim, F = x.size(-1) / 2; s = sigmoid(gate)):
//   forward:   out      = silu(gate) * value = gate * s * value                  [..., F]
//   backward:  d_value  = g * gate * s                                           [..., 2F]
//              d_gate   = g * value * s * (1 + gate * (1 - s))
// The sigmoid is recomputed in the backward (never stored).  Math is done in
// fp32 (fp64 for fp64 inputs), results are written in the input dtype.
//
// Layout: the leading dims of x are collapsed to rows with ONE row stride when
// torch can express them so (reshape returns a view: e.g. proj[..., a:a + 2F]
// sliced out of a wider fused projection is read in place, no copy); otherwise,
// or if the last dim is not unit-stride, x is copied to a contiguous tensor
// first.  Outputs are contiguous.
//
// Work split: one fused pass; at::parallel_for over (row, column chunk) tasks so
// both many short rows and few long rows keep every core busy; each task runs a
// vectorised loop of at::vec::Vectorized<acc_t> (exp of the vector), the tail of
// a chunk goes through the same vector code on a zero-padded stack buffer so
// every element sees identical math.
// SIMD Vectorized (AVX2) for this extension: see cpu_capability.h.
#include "cpu_capability.h"  // must precede every ATen include

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>


#include "cpu_alloc.h"
#include "palm_fast.h"

namespace palm_fast {
namespace {

using at::vec::Vectorized;

// Elements per parallel task along a row (a multiple of every vector width).
constexpr int64_t kColChunk = 2048;
// Minimum elements per parallel_for grain (amortises thread dispatch).
constexpr int64_t kGrainElems = 32768;

// One "step" handles kStep(scalar_t) elements: two fp32 vectors (one
// Vectorized<BFloat16/Half>), or two Vectorized<float/double> for full types.
template <typename scalar_t>
constexpr int64_t step_size() {
  using acc_t = at::opmath_type<scalar_t>;
  return 2 * Vectorized<acc_t>::size();
}

// Load step_size<scalar_t>() elements at p as two vectors of the compute type.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void load2(const scalar_t* p, Vectorized<acc_t>& a, Vectorized<acc_t>& b) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    a = Vectorized<acc_t>::loadu(p);
    b = Vectorized<acc_t>::loadu(p + Vectorized<acc_t>::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
  }
}

// Store two compute-type vectors as step_size<scalar_t>() elements at p.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void store2(scalar_t* p, const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    a.store(p);
    b.store(p + Vectorized<acc_t>::size());
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

// Vectorized<float>::exp_u20 (a polynomial exp within 20 ULP, ~2x faster than
// Sleef's u10 exp) where the installed torch has it; exp() otherwise (and for
// fp64).  20 ULP in exp is ~2e-6 relative in the sigmoid, well inside the
// tolerance rule for fp32 and far below bf16/fp16 rounding.
template <typename V, typename = void>
struct has_exp_u20 : std::false_type {};
template <typename V>
struct has_exp_u20<V, std::void_t<decltype(std::declval<const V&>().exp_u20())>> : std::true_type {};

template <typename acc_t>
inline Vectorized<acc_t> fast_exp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float> && has_exp_u20<Vectorized<acc_t>>::value) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// 1 / d for d in [1, 2].  fp32 on AVX2/AVX512: the hardware reciprocal estimate plus one
// Newton step (~2^-22 relative error), several times the throughput of a vector divide,
// which otherwise bounds this kernel on small CPUs.
template <typename acc_t>
inline Vectorized<acc_t> reciprocal_1_2(const Vectorized<acc_t>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 r = _mm512_rcp14_ps(d);
    return Vectorized<float>(_mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f))));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 r = _mm256_rcp_ps(d);
    return Vectorized<float>(_mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f))));
  }
#endif
  return Vectorized<acc_t>(acc_t(1)) / d;
}

// s = sigmoid(g) and oms = 1 - s = sigmoid(-g), without overflow or cancellation: with
// e = exp(-|g|) in [0, 1] and r = 1 / (1 + e), sigmoid(|g|) = r and sigmoid(-|g|) = e r.
// (1 / (1 + exp(-g)) overflowed exp for g < -88, and its cutoff returned 0 below g = -69.3
// where the sigmoid is still a normal fp32 number; 1 - s cancelled for g >> 0.) exp_u20
// returns 0 below about -86.99 (its range limit, just above ln(FLT_MIN) = -87.34): there the
// exact sigmoid is below 1.7e-38, and silu(g) below 1.5e-36 in magnitude is flushed to 0
// where torch keeps it (an absolute difference under 1.5e-36). A NaN gate still propagates
// through the products with the gate (exp_u20 clamps NaN to a number).
template <typename acc_t>
inline void sigmoid_pair(const Vectorized<acc_t>& g, Vectorized<acc_t>& s, Vectorized<acc_t>& oms) {
  const Vectorized<acc_t> e = fast_exp(g.abs().neg());
  const Vectorized<acc_t> r = reciprocal_1_2(Vectorized<acc_t>(acc_t(1)) + e);
  const Vectorized<acc_t> er = e * r;
  const Vectorized<acc_t> pos = g >= Vectorized<acc_t>(acc_t(0));
  s = Vectorized<acc_t>::blendv(er, r, pos);
  oms = Vectorized<acc_t>::blendv(r, er, pos);
}

// Forward on one step: out = gate * sigmoid(gate) * value.
template <typename acc_t>
inline Vectorized<acc_t> fwd_math(const Vectorized<acc_t>& v, const Vectorized<acc_t>& g) {
  Vectorized<acc_t> s, oms;
  sigmoid_pair(g, s, oms);
  return g * s * v;
}

// Backward on one step: (d_value, d_gate) from grad go, value v, gate g.
template <typename acc_t>
inline void bwd_math(const Vectorized<acc_t>& go, const Vectorized<acc_t>& v,
                     const Vectorized<acc_t>& g, Vectorized<acc_t>& dv, Vectorized<acc_t>& dg) {
  Vectorized<acc_t> s, oms;
  sigmoid_pair(g, s, oms);
  const Vectorized<acc_t> gs = go * s;
  dv = gs * g;
  dg = gs * v * (Vectorized<acc_t>(acc_t(1)) + g * oms);
}

// Runs body(row, c0, c1) over all rows and [c0, c1) column chunks of width F in parallel.
template <typename Body>
void for_each_chunk(int64_t rows, int64_t F, const Body& body) {
  const int64_t chunk = std::min<int64_t>(F, kColChunk);
  const int64_t n_chunks = (F + chunk - 1) / chunk;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / chunk);
  at::parallel_for(0, rows * n_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / n_chunks;
      const int64_t c0 = (t % n_chunks) * chunk;
      body(r, c0, std::min(F, c0 + chunk));
    }
  });
}

template <typename scalar_t>
void fwd_kernel(const scalar_t* x, int64_t x_row_stride, scalar_t* out, int64_t rows, int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t S = step_size<scalar_t>();
  for_each_chunk(rows, F, [&](int64_t r, int64_t c0, int64_t c1) {
    const scalar_t* vp = x + r * x_row_stride;
    const scalar_t* gp = vp + F;
    scalar_t* op = out + r * F;
    int64_t c = c0;
    Vec v0, v1, g0, g1;
    for (; c + S <= c1; c += S) {
      load2(vp + c, v0, v1);
      load2(gp + c, g0, g1);
      store2(op + c, fwd_math(v0, g0), fwd_math(v1, g1));
    }
    if (c < c1) {  // tail: same vector math on zero-padded copies
      const int64_t n = c1 - c;
      alignas(64) scalar_t vb[S] = {}, gb[S] = {}, ob[S];
      std::memcpy(vb, vp + c, n * sizeof(scalar_t));
      std::memcpy(gb, gp + c, n * sizeof(scalar_t));
      load2(vb, v0, v1);
      load2(gb, g0, g1);
      store2(ob, fwd_math(v0, g0), fwd_math(v1, g1));
      std::memcpy(op + c, ob, n * sizeof(scalar_t));
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const scalar_t* go, int64_t go_row_stride, const scalar_t* x, int64_t x_row_stride,
                scalar_t* gx, int64_t gx_row_stride, int64_t rows, int64_t F) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t S = step_size<scalar_t>();
  for_each_chunk(rows, F, [&](int64_t r, int64_t c0, int64_t c1) {
    const scalar_t* gop = go + r * go_row_stride;
    const scalar_t* vp = x + r * x_row_stride;
    const scalar_t* gp = vp + F;
    scalar_t* dvp = gx + r * gx_row_stride;
    scalar_t* dgp = dvp + F;
    int64_t c = c0;
    Vec o0, o1, v0, v1, g0, g1, dv0, dv1, dg0, dg1;
    for (; c + S <= c1; c += S) {
      load2(gop + c, o0, o1);
      load2(vp + c, v0, v1);
      load2(gp + c, g0, g1);
      bwd_math(o0, v0, g0, dv0, dg0);
      bwd_math(o1, v1, g1, dv1, dg1);
      store2(dvp + c, dv0, dv1);
      store2(dgp + c, dg0, dg1);
    }
    if (c < c1) {  // tail: same vector math on zero-padded copies
      const int64_t n = c1 - c;
      alignas(64) scalar_t ob[S] = {}, vb[S] = {}, gb[S] = {}, dvb[S], dgb[S];
      std::memcpy(ob, gop + c, n * sizeof(scalar_t));
      std::memcpy(vb, vp + c, n * sizeof(scalar_t));
      std::memcpy(gb, gp + c, n * sizeof(scalar_t));
      load2(ob, o0, o1);
      load2(vb, v0, v1);
      load2(gb, g0, g1);
      bwd_math(o0, v0, g0, dv0, dg0);
      bwd_math(o1, v1, g1, dv1, dg1);
      store2(dvb, dv0, dv1);
      store2(dgb, dg0, dg1);
      std::memcpy(dvp + c, dvb, n * sizeof(scalar_t));
      std::memcpy(dgp + c, dgb, n * sizeof(scalar_t));
    }
  });
}

// [..., K] -> [rows, K] with unit last stride and one row stride: a view when
// possible (no copy), a contiguous copy otherwise.
at::Tensor as_rows(const at::Tensor& t) {
  at::Tensor u = (t.size(-1) > 1 && t.stride(-1) != 1) ? t.contiguous() : t;
  return u.reshape({-1, u.size(-1)});
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() >= 1, name, ": expected at least 1 dim, got ", t.dim());
}

at::Tensor swiglu_fwd(const at::Tensor& x) {
  check_input(x, "x");
  const int64_t two_f = x.size(-1);
  TORCH_CHECK(two_f > 0 && two_f % 2 == 0, "x: expected an even, positive last dim, got ", two_f);
  const int64_t F = two_f / 2;
  auto out_shape = x.sizes().vec();
  out_shape.back() = F;
  at::Tensor out = empty_output(out_shape, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor x2 = as_rows(x);
  const int64_t rows = x2.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swiglu_fwd", [&] {
    fwd_kernel<scalar_t>(x2.const_data_ptr<scalar_t>(), x2.stride(0), out.mutable_data_ptr<scalar_t>(),
                         rows, F);
  });
  return out;
}

// out (optional): where grad_x goes, a [rows, 2F] view with a unit last stride (e.g. the
// SwiGLU columns of the block's dproj), instead of a new contiguous tensor.
at::Tensor swiglu_bwd(const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& out) {
  check_input(x, "x");
  check_input(grad_out, "grad_out");
  const int64_t two_f = x.size(-1);
  TORCH_CHECK(two_f > 0 && two_f % 2 == 0, "x: expected an even, positive last dim, got ", two_f);
  const int64_t F = two_f / 2;
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out: expected dtype ",
              x.scalar_type(), ", got ", grad_out.scalar_type());
  auto go_shape = x.sizes().vec();
  go_shape.back() = F;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(go_shape), "grad_out: expected shape ",
              at::IntArrayRef(go_shape), ", got ", grad_out.sizes());
  const at::Tensor x2 = as_rows(x);
  const at::Tensor go2 = as_rows(grad_out);
  const int64_t rows = x2.size(0);
  at::Tensor grad_x;
  if (out.has_value()) {
    grad_x = *out;
    TORCH_CHECK(grad_x.device().is_cpu() && grad_x.scalar_type() == x.scalar_type() && grad_x.dim() == 2 &&
                    grad_x.size(0) == rows && grad_x.size(1) == two_f && grad_x.stride(1) == 1 &&
                    grad_x.stride(0) >= two_f,
                "out: expected a [rows, 2F] CPU tensor of x's dtype with a unit last stride");
  } else {
    grad_x = empty_output(x.sizes(), x.options());
  }
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swiglu_bwd", [&] {
    bwd_kernel<scalar_t>(go2.const_data_ptr<scalar_t>(), go2.stride(0), x2.const_data_ptr<scalar_t>(),
                         x2.stride(0), grad_x.mutable_data_ptr<scalar_t>(),
                         out.has_value() ? grad_x.stride(0) : two_f, rows, F);
  });
  return grad_x;
}

}  // namespace

void bind_swiglu(pybind11::module_& m) {
  m.def("swiglu_fwd", guarded(&swiglu_fwd), pybind11::arg("x"),
        "SwiGLU forward on CPU: x [..., 2F] (value | gate) -> silu(gate) * value [..., F], contiguous");
  m.def("swiglu_bwd", guarded(&swiglu_bwd), pybind11::arg("grad_out"), pybind11::arg("x"),
        pybind11::arg("out") = pybind11::none(),
        "SwiGLU backward on CPU: (grad_out [..., F], x [..., 2F]) -> grad_x [..., 2F], contiguous "
        "(or written into out, a [rows, 2F] view with a unit last stride)");
}

}  // namespace palm_fast
