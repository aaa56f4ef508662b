// The CPU decode's 2 rows x 4 keys score micro-kernel as the probes time it (shared by
// dot_2x4.cpp and blocks_4x3.cpp): lane sums in the library's sum4 order.
#pragma once
#include <immintrin.h>
typedef __m256 V;
static inline void in_reg(V& a, V& b, V& c, V& d){ asm("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d)); }
static inline V hs4(V a, V b, V c, V d){ V ab=_mm256_add_ps(_mm256_unpacklo_ps(a,b),_mm256_unpackhi_ps(a,b)); V cd=_mm256_add_ps(_mm256_unpacklo_ps(c,d),_mm256_unpackhi_ps(c,d)); return _mm256_add_ps(_mm256_shuffle_ps(ab,cd,0x44),_mm256_shuffle_ps(ab,cd,0xEE)); }
static inline __m128 fin(V r){ return _mm_add_ps(_mm256_castps256_ps128(r),_mm256_extractf128_ps(r,1)); }
__attribute__((noinline)) void dot_2x4(const float* a0, const float* a1, const float* const* b, int hd, float* o0, float* o1){
  V c00=_mm256_setzero_ps(),c01=c00,c02=c00,c03=c00,c10=c00,c11=c00,c12=c00,c13=c00;
  for(int d=0; d<hd; d+=8){
    V x0=_mm256_loadu_ps(a0+d), x1=_mm256_loadu_ps(a1+d);
    V k0=_mm256_loadu_ps(b[0]+d),k1=_mm256_loadu_ps(b[1]+d),k2=_mm256_loadu_ps(b[2]+d),k3=_mm256_loadu_ps(b[3]+d);
    in_reg(k0,k1,k2,k3);
    c00=_mm256_fmadd_ps(x0,k0,c00);c01=_mm256_fmadd_ps(x0,k1,c01);c02=_mm256_fmadd_ps(x0,k2,c02);c03=_mm256_fmadd_ps(x0,k3,c03);
    c10=_mm256_fmadd_ps(x1,k0,c10);c11=_mm256_fmadd_ps(x1,k1,c11);c12=_mm256_fmadd_ps(x1,k2,c12);c13=_mm256_fmadd_ps(x1,k3,c13);
  }
  _mm_storeu_ps(o0,fin(hs4(c00,c01,c02,c03))); _mm_storeu_ps(o1,fin(hs4(c10,c11,c12,c13)));
}
