// Element-type conversion shared by the C++ kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace palm_fast {

// Half or BFloat16 (c10::is_reduced_floating_point_v is not in torch 2.6's headers).
template <typename T>
inline constexpr bool kReducedFloat = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// n elements of src as fp32 into dst: a copy for float, vectorised for Half / BFloat16.
template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (kReducedFloat<scalar_t>) {
    using VecS = at::vec::Vectorized<scalar_t>;
    constexpr int64_t kF = at::vec::Vectorized<float>::size();
    int64_t i = 0;
    for (; i + VecS::size() <= n; i += VecS::size()) {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(VecS::loadu(src + i));
      a.store(dst + i);
      b.store(dst + i + kF);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {  // double: only reachable through the dispatch macros, never called (fp32/16/bf16 only)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

}  // namespace palm_fast
