// Select ATen's SIMD implementation of at::vec::Vectorized for this extension.
//
// ATen specialises Vectorized<T> for AVX2/AVX512 only when CPU_CAPABILITY_* is
// defined (it compiles each of its own kernel files once per capability); an
// extension that does not define it silently gets the portable scalar fallback,
// which is slower than eager PyTorch. We compile with -march=native (setup.py), so
// pick AVX2 when the compiler targets it. AVX512 is deliberately not selected: AVX2
// is what CI and our development machines run, so it is the tested path (AVX512
// machines run it too). The capability also names an inline namespace, so these
// instantiations cannot clash with ATen's own. With PALM_FAST_PORTABLE=1 (no
// -march) the portable fallback is used.
//
// Include this header FIRST in every csrc/*.cpp, before any ATen/torch header.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif
