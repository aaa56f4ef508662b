// Output allocation shared by the C++ kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace palm_fast {

// A fresh output tensor. On Linux, outputs of 8 MiB and more are advised to use
// transparent huge pages before their first touch (what torch's own
// THP_MEM_ALLOC_ENABLE=1 does for every allocation): with THP in "madvise" mode a
// 64 MiB output otherwise takes 16k page faults, which on a small CPU costs as much
// as a memory-bound kernel itself. Best effort: a failing madvise changes nothing,
// and the tensor stays an ordinary ATen tensor.
inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t bytes = t.nbytes();
  if (bytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (p + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (p + bytes) & ~(kHuge - 1);
    if (last > first) {
      (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
    }
  }
#endif
  return t;
}

}  // namespace palm_fast
