// Rotary math shared by the C++ kernels that rotate (rope.cpp, mqa_decode.cpp's
// rope_append): per-token cos/sin and the rotation of one fp32 row, vectorised.
#pragma once

#include "cpu_capability.h"  // must precede every ATen include

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace palm_fast {
namespace rope_math {

using Vec = at::vec::Vectorized<float>;

// cos / sin (negated sin when inverse) of pos * inv_freq[i] for i < half.
inline void token_cos_sin(float pos, const float* inv_freq, int64_t half, bool inverse,
                          float* c, float* s) {
  const Vec vpos(pos);
  const Vec sign(inverse ? -1.0f : 1.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= half; i += Vec::size()) {
    const Vec theta = vpos * Vec::loadu(inv_freq + i);
    theta.cos().store(c + i);
    (theta.sin() * sign).store(s + i);
  }
  if (i < half) {
    const int64_t n = half - i;
    const Vec theta = vpos * Vec::loadu(inv_freq + i, n);
    theta.cos().store(c + i, n);
    (theta.sin() * sign).store(s + i, n);
  }
}

// Rotate the first R = 2*half features of one fp32 row; y may alias x.
inline void rotate_row(const float* x, float* y, const float* c, const float* s, int64_t half,
                       bool interleaved) {
  constexpr int64_t N = Vec::size();
  if (!interleaved) {
    int64_t i = 0;
    for (; i + N <= half; i += N) {
      const Vec x1 = Vec::loadu(x + i), x2 = Vec::loadu(x + half + i);
      const Vec vc = Vec::loadu(c + i), vs = Vec::loadu(s + i);
      (x1 * vc - x2 * vs).store(y + i);
      (x2 * vc + x1 * vs).store(y + half + i);
    }
    if (i < half) {
      const int64_t n = half - i;
      const Vec x1 = Vec::loadu(x + i, n), x2 = Vec::loadu(x + half + i, n);
      const Vec vc = Vec::loadu(c + i, n), vs = Vec::loadu(s + i, n);
      (x1 * vc - x2 * vs).store(y + i, n);
      (x2 * vc + x1 * vs).store(y + half + i, n);
    }
  } else {
    int64_t i = 0;  // pair index
    for (; i + N <= half; i += N) {
      // 2N consecutive floats = N pairs; split into even (x1) and odd (x2) members.
      auto [x1, x2] = at::vec::deinterleave2(Vec::loadu(x + 2 * i), Vec::loadu(x + 2 * i + N));
      const Vec vc = Vec::loadu(c + i), vs = Vec::loadu(s + i);
      auto [y0, y1] = at::vec::interleave2(x1 * vc - x2 * vs, x2 * vc + x1 * vs);
      y0.store(y + 2 * i);
      y1.store(y + 2 * i + N);
    }
    for (; i < half; ++i) {
      const float x1 = x[2 * i], x2 = x[2 * i + 1];
      y[2 * i] = x1 * c[i] - x2 * s[i];
      y[2 * i + 1] = x2 * c[i] + x1 * s[i];
    }
  }
}

}  // namespace rope_math
}  // namespace palm_fast
