// Rotary position embedding (RoPE) of queries and keys on the CPU.
//
// Math (palm_fast.reference.functional.apply_rope): for a token at position p and the
// R/2 = len(inv_freq) frequencies, theta_i = float(p) * inv_freq[i], c_i = cos(theta_i),
// s_i = sin(theta_i) (negated for the inverse rotation, the backward). Each head vector
// x of q and k is rotated pairwise, (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), with pairs
// (x[i], x[i + R/2]) (rotate-half) or (x[2i], x[2i+1]) (interleaved); features R..D-1
// pass through.
//
// Work split: at::parallel_for over the B*T tokens. Per token, cos/sin are computed once
// (vectorised Sleef cos/sin over the R/2 frequencies) into a thread-local table, then
// every head of q and of k is rotated with at::vec::Vectorized<float>: fp32 in-place on
// the row for float, or through a per-thread fp32 row buffer for Half/BFloat16. Inputs
// may have any strides in B, T, H (unit stride in D); the outputs may alias the inputs
// (in place): each vector step reads both elements of its pairs before writing them.

// SIMD Vectorized (AVX2) for this extension: see cpu_capability.h.
#include "cpu_capability.h"  // must precede every ATen include

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <vector>

#include "palm_fast.h"
#include "rope_math.h"

namespace palm_fast {
namespace {

using Vec = at::vec::Vectorized<float>;

// Angles of one token: c[i] = cos(p * inv_freq[i]), s[i] = +-sin(p * inv_freq[i]).
using rope_math::rotate_row;
using rope_math::token_cos_sin;

// Rotate one head row of any dtype: src -> dst (dst may equal src).
template <typename scalar_t>
inline void rotate_head(const scalar_t* src, scalar_t* dst, int64_t head_dim, const float* c,
                        const float* s, int64_t half, bool interleaved, float* buf) {
  const int64_t R = 2 * half;
  if constexpr (std::is_same_v<scalar_t, float>) {
    rotate_row(src, dst, c, s, half, interleaved);
  } else {
    at::vec::convert(src, buf, R);
    rotate_row(buf, buf, c, s, half, interleaved);
    at::vec::convert(buf, dst, R);
  }
  if (R < head_dim && dst != src) {
    std::memcpy(dst + R, src + R, (head_dim - R) * sizeof(scalar_t));
  }
}

template <typename scalar_t>
void rope_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
                 const at::Tensor& k_out, const at::Tensor& inv_freq, const at::Tensor& pos,
                 bool pos_is_offset, bool interleaved, bool inverse) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), HK = k.size(2);
  const int64_t half = inv_freq.numel();
  const float* inv = inv_freq.data_ptr<float>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  scalar_t* qop = q_out.data_ptr<scalar_t>();
  scalar_t* kop = k_out.data_ptr<scalar_t>();
  const bool pos64 = pos.scalar_type() == at::kLong;
  const void* pp = pos.data_ptr();
  const int64_t psb = pos.stride(0), pst = pos_is_offset ? 0 : pos.stride(1);
  // position of token (b, t)
  auto position = [&](int64_t b, int64_t t) -> int64_t {
    const int64_t idx = b * psb + t * pst;
    const int64_t p = pos64 ? static_cast<const int64_t*>(pp)[idx]
                            : static_cast<int64_t>(static_cast<const int32_t*>(pp)[idx]);
    return pos_is_offset ? p + t : p;
  };
  // Grain: roughly 32K elements of work per chunk.
  const int64_t per_token = std::max<int64_t>(1, (H + HK) * D);
  const int64_t grain = std::max<int64_t>(1, 32768 / per_token);
  at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> table(2 * half + D + 2 * Vec::size());
    float* c = table.data();
    float* s = c + half;
    float* buf = s + half;
    for (int64_t tok = begin; tok < end; ++tok) {
      const int64_t b = tok / T, t = tok % T;
      token_cos_sin(static_cast<float>(position(b, t)), inv, half, inverse, c, s);
      const scalar_t* qrow = qp + b * q.stride(0) + t * q.stride(1);
      scalar_t* qorow = qop + b * q_out.stride(0) + t * q_out.stride(1);
      for (int64_t h = 0; h < H; ++h) {
        rotate_head(qrow + h * q.stride(2), qorow + h * q_out.stride(2), D, c, s, half,
                    interleaved, buf);
      }
      const scalar_t* krow = kp + b * k.stride(0) + t * k.stride(1);
      scalar_t* korow = kop + b * k_out.stride(0) + t * k_out.stride(1);
      for (int64_t h = 0; h < HK; ++h) {
        rotate_head(krow + h * k.stride(2), korow + h * k_out.stride(2), D, c, s, half,
                    interleaved, buf);
      }
    }
  });
}

// q [B,T,H,D], k [B,T,Hk,D] -> q_out, k_out (preallocated; may alias q, k for in place).
void rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out,
              const at::Tensor& k_out, const at::Tensor& inv_freq, const at::Tensor& pos,
              bool pos_is_offset, bool interleaved, bool inverse) {
  // Memory-safety guards only; argument checking with good messages is in palm_fast/ops.
  for (const at::Tensor* t : {&q, &k, &q_out, &k_out}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4, "rope_cpu: expected 4-dim CPU tensors");
    TORCH_CHECK(t->numel() == 0 || t->size(-1) <= 1 || t->stride(-1) == 1,
                "rope_cpu: last dim must be unit-stride");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "rope_cpu: dtype mismatch");
  }
  TORCH_CHECK(q_out.sizes() == q.sizes() && k_out.sizes() == k.sizes(), "rope_cpu: output shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "rope_cpu: q and k must share B, T, D");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 &&
                  inv_freq.is_contiguous() && 2 * inv_freq.numel() <= q.size(3),
              "rope_cpu: inv_freq must be contiguous fp32 [R/2] with R <= D");
  TORCH_CHECK(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt,
              "rope_cpu: positions must be int32 or int64");
  TORCH_CHECK(pos_is_offset ? (pos.dim() == 1 && pos.size(0) == q.size(0))
                            : (pos.dim() == 2 && pos.size(0) == q.size(0) && pos.size(1) == q.size(1)),
              "rope_cpu: positions shape");
  if (q.numel() == 0 && k.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope_cpu", [&] {
    rope_kernel<scalar_t>(q, k, q_out, k_out, inv_freq, pos, pos_is_offset, interleaved, inverse);
  });
}

}  // namespace

void bind_rope(pybind11::module_& m) {
  m.def("rope_cpu", guarded(&rope_cpu),
        "RoPE of q [B,T,H,D] and k [B,T,Hk,D] into q_out, k_out (may alias q, k)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("q_out"), pybind11::arg("k_out"),
        pybind11::arg("inv_freq"), pybind11::arg("pos"), pybind11::arg("pos_is_offset"),
        pybind11::arg("interleaved"), pybind11::arg("inverse"));
}

}  // namespace palm_fast
