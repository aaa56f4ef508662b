// in_register(v...): keep loaded fp32 vectors in registers.
//
// GCC folds every use of a loaded vector into its FMA as a memory operand, so a vector
// that feeds k FMAs is loaded k times. In the small register-blocked products of the CPU
// kernels (decode scores and values, the training attention) that made the loops
// load-bound: 15 loads per 12 FMAs in the decode score block, 12 per 8 in the
// attention's, where an AVX2 core issues two 256-bit loads per cycle against two FMAs.
// An empty asm statement that "modifies" the register makes the compiler materialise
// the load once. No effect on the arithmetic (results are bitwise the same).
// Include after cpu_capability.h and <ATen/cpu/vec/vec.h>.
#pragma once

namespace palm_fast {

template <typename... V>
inline void in_register(V&... v) {
#if defined(CPU_CAPABILITY_AVX2) && (defined(__GNUC__) || defined(__clang__))
  auto pin = [](at::vec::Vectorized<float>& a) {
    __m256 r = a;
    asm("" : "+x"(r));
    a = r;
  };
  (pin(v), ...);
#else
  ((void)v, ...);
#endif
}

}  // namespace palm_fast
