// bf16 score micro-kernel: current (zero-extend + shift per 8) vs split (16 per load: even by
// shift, odd by AND with the mask from memory), 4 q rows x 3 keys, hd a multiple of 16. See
// benchmarks/results/cpu/NOTES.md (twenty-fifth session). dot_split (intrinsics) spills;
// dot_split_asm (-DDOTS=dot_split_asm) is the loop in inline assembly.
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <chrono>
#include <vector>
#include <cmath>
typedef __m256 V;
static inline void pin3(V& a, V& b, V& c){ asm("" : "+x"(a), "+x"(b), "+x"(c)); }
static inline void pin1(V& a){ asm("" : "+x"(a)); }
static inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256 v = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}
static inline V ld(const uint16_t* p){
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)),16));
}
alignas(32) static const uint32_t kMask[8] = {0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u};
static inline V ld_lo(const uint16_t* p){
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)p),16));
}
static inline V ld_hi(const uint16_t* p){
  V r;
#ifdef ASM_AND
  asm("vmovdqu (%1), %0\n\tvpand (%2), %0, %0" : "=&x"(r) : "r"(p), "r"(kMask) : "memory");
#else
  r = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i*)p), _mm256_load_si256((const __m256i*)kMask)));
#endif
  return r;
}
#ifndef DOTS
#define DOTS dot_split
#endif
#define FMA3(x, c0, c1, c2) c0=_mm256_fmadd_ps(x,k0,c0);c1=_mm256_fmadd_ps(x,k1,c1);c2=_mm256_fmadd_ps(x,k2,c2);
__attribute__((noinline)) void dot_cur(const float* a, int lda, const uint16_t* const* b, int hd, float* o, int ldo){
  V c00=_mm256_setzero_ps(),c01=c00,c02=c00,c10=c00,c11=c00,c12=c00,c20=c00,c21=c00,c22=c00,c30=c00,c31=c00,c32=c00;
  const uint16_t *b0=b[0],*b1=b[1],*b2=b[2];
  for(int d=0; d<hd; d+=8){
    V k0=ld(b0+d),k1=ld(b1+d),k2=ld(b2+d); pin3(k0,k1,k2);
    V x=_mm256_loadu_ps(a+d); pin1(x); FMA3(x,c00,c01,c02)
    x=_mm256_loadu_ps(a+lda+d); pin1(x); FMA3(x,c10,c11,c12)
    x=_mm256_loadu_ps(a+2*lda+d); pin1(x); FMA3(x,c20,c21,c22)
    x=_mm256_loadu_ps(a+3*lda+d); pin1(x); FMA3(x,c30,c31,c32)
  }
  float t[12];
  _mm_storeu_ps(t,sum4(c00,c01,c02,c10)); _mm_storeu_ps(t+4,sum4(c11,c12,c20,c21)); _mm_storeu_ps(t+8,sum4(c22,c30,c31,c32));
  for(int i=0;i<4;i++) for(int j=0;j<3;j++) o[i*ldo+j]=t[i*3+j];
}
// q rows stored split: per 16 columns, [even 8 | odd 8]
__attribute__((noinline)) void dot_split(const float* a, int lda, const uint16_t* const* b, int hd, float* o, int ldo){
  V c00=_mm256_setzero_ps(),c01=c00,c02=c00,c10=c00,c11=c00,c12=c00,c20=c00,c21=c00,c22=c00,c30=c00,c31=c00,c32=c00;
  const uint16_t *b0=b[0],*b1=b[1],*b2=b[2];
  for(int d=0; d<hd; d+=16){
    V k0=ld_lo(b0+d),k1=ld_lo(b1+d),k2=ld_lo(b2+d); pin3(k0,k1,k2);
    V x=_mm256_loadu_ps(a+d); pin1(x); FMA3(x,c00,c01,c02)
    x=_mm256_loadu_ps(a+lda+d); pin1(x); FMA3(x,c10,c11,c12)
    x=_mm256_loadu_ps(a+2*lda+d); pin1(x); FMA3(x,c20,c21,c22)
    x=_mm256_loadu_ps(a+3*lda+d); pin1(x); FMA3(x,c30,c31,c32)
    k0=ld_hi(b0+d); k1=ld_hi(b1+d); k2=ld_hi(b2+d); pin3(k0,k1,k2);
    x=_mm256_loadu_ps(a+d+8); pin1(x); FMA3(x,c00,c01,c02)
    x=_mm256_loadu_ps(a+lda+d+8); pin1(x); FMA3(x,c10,c11,c12)
    x=_mm256_loadu_ps(a+2*lda+d+8); pin1(x); FMA3(x,c20,c21,c22)
    x=_mm256_loadu_ps(a+3*lda+d+8); pin1(x); FMA3(x,c30,c31,c32)
  }
  float t[12];
  _mm_storeu_ps(t,sum4(c00,c01,c02,c10)); _mm_storeu_ps(t+4,sum4(c11,c12,c20,c21)); _mm_storeu_ps(t+8,sum4(c22,c30,c31,c32));
  for(int i=0;i<4;i++) for(int j=0;j<3;j++) o[i*ldo+j]=t[i*3+j];
}


extern "C" { extern const uint32_t palm_hi_mask[8]; alignas(32) const uint32_t palm_hi_mask[8] = {0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u,0xFFFF0000u}; }
__attribute__((noinline)) void dot_split_asm(const float* a, int lda, const uint16_t* const* b, int hd, float* o, int ldo){
  V c00=_mm256_setzero_ps(),c01=c00,c02=c00,c10=c00,c11=c00,c12=c00,c20=c00,c21=c00,c22=c00,c30=c00,c31=c00,c32=c00;
  const uint16_t *b0=b[0],*b1=b[1],*b2=b[2];
  const float *a3=a+3*lda; long L = (long)lda*4;
  for(int d=0; d<hd; d+=16){
#define F3(ADDR,C0,C1,C2) "vmovups " ADDR ", %%ymm15\n\t" \
    "vfmadd231ps %%ymm12, %%ymm15, %[" #C0 "]\n\tvfmadd231ps %%ymm13, %%ymm15, %[" #C1 "]\n\tvfmadd231ps %%ymm14, %%ymm15, %[" #C2 "]\n\t"
    asm("vmovdqu (%[b0]), %%ymm12\n\tvpslld $16, %%ymm12, %%ymm12\n\t"
        "vmovdqu (%[b1]), %%ymm13\n\tvpslld $16, %%ymm13, %%ymm13\n\t"
        "vmovdqu (%[b2]), %%ymm14\n\tvpslld $16, %%ymm14, %%ymm14\n\t"
        F3("(%[a0])",c00,c01,c02) F3("(%[a0],%[L],1)",c10,c11,c12) F3("(%[a0],%[L],2)",c20,c21,c22) F3("(%[a3])",c30,c31,c32)
        "vmovdqu (%[b0]), %%ymm12\n\tvpand palm_hi_mask(%%rip), %%ymm12, %%ymm12\n\t"
        "vmovdqu (%[b1]), %%ymm13\n\tvpand palm_hi_mask(%%rip), %%ymm13, %%ymm13\n\t"
        "vmovdqu (%[b2]), %%ymm14\n\tvpand palm_hi_mask(%%rip), %%ymm14, %%ymm14\n\t"
        F3("32(%[a0])",c00,c01,c02) F3("32(%[a0],%[L],1)",c10,c11,c12) F3("32(%[a0],%[L],2)",c20,c21,c22) F3("32(%[a3])",c30,c31,c32)
        : [c00]"+x"(c00),[c01]"+x"(c01),[c02]"+x"(c02),[c10]"+x"(c10),[c11]"+x"(c11),[c12]"+x"(c12),
          [c20]"+x"(c20),[c21]"+x"(c21),[c22]"+x"(c22),[c30]"+x"(c30),[c31]"+x"(c31),[c32]"+x"(c32)
        : [b0]"r"(b0+d),[b1]"r"(b1+d),[b2]"r"(b2+d),[a0]"r"(a+d),[L]"r"(L),[a3]"r"(a3+d)
        : "memory","xmm12","xmm13","xmm14","xmm15");
  }
  float t[12];
  _mm_storeu_ps(t,sum4(c00,c01,c02,c10)); _mm_storeu_ps(t+4,sum4(c11,c12,c20,c21)); _mm_storeu_ps(t+8,sum4(c22,c30,c31,c32));
  for(int i=0;i<4;i++) for(int j=0;j<3;j++) o[i*ldo+j]=t[i*3+j];
}
static uint16_t bf(float f){ uint32_t u; memcpy(&u,&f,4); return u>>16; }
int main(int argc,char**argv){
  int T=atoi(argv[1]), hd=128, R=8;
  std::vector<uint16_t> K((size_t)T*hd); std::vector<float> Q(R*hd), Qs(R*hd), S1(R*(T+4)), S2(R*(T+4));
  for(auto&x:K) x=bf(rand()/(float)RAND_MAX-0.5f); for(auto&x:Q) x=rand()/(float)RAND_MAX-0.5f;
  for(int r=0;r<R;r++) for(int d=0;d<hd;d+=16) for(int i=0;i<8;i++){ Qs[r*hd+d+i]=Q[r*hd+d+2*i]; Qs[r*hd+d+8+i]=Q[r*hd+d+2*i+1]; }
  std::vector<const uint16_t*> kr(T+4); for(int j=0;j<T+4;j++) kr[j]=K.data()+(size_t)(j%T)*hd;
  int reps = 400000000/(T*R*hd);
  for(int rep=0;rep<3;rep++) for(int mode=0; mode<2; mode++){
    auto t0=std::chrono::steady_clock::now();
    for(int it=0; it<reps; it++){
      if(mode==0){ for(int j=0;j<T;j+=3) for(int r=0;r<R;r+=4) dot_cur(Q.data()+r*hd,hd,kr.data()+j,hd,S1.data()+r*(T+4)+j,T+4); }
      else { for(int j=0;j<T;j+=3) for(int r=0;r<R;r+=4) DOTS(Qs.data()+r*hd,hd,kr.data()+j,hd,S2.data()+r*(T+4)+j,T+4); }
    }
    double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
    double vf=(double)reps*T*R*hd/8;
    printf("T=%d %s: %.3f G vecFMA/s (%.1f us per 1024 keys x 8 rows)\n",T,mode?"split":"cur  ",vf/s/1e9,s/reps*1e6*1024/T);
  }
  double md=0; for(size_t i=0;i<S1.size();i++){ double e=fabs(S1[i]-S2[i]); if(e>md) md=e; }
  printf("max |cur - split| = %g\n", md);
}
