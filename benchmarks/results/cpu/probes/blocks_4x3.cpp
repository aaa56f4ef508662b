// Micro-kernels of the CPU decode alone, data in L1/L2 (eighth session). dot_2x4 comes
// from score_2x4.h (as in dot_2x4.cpp), so both score blocks are timed in one binary.
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <vector>
#include "score_2x4.h"  // V, in_reg, hs4, fin, dot_2x4
static inline void in_reg3(V& a, V& b, V& c){ asm("" : "+x"(a), "+x"(b), "+x"(c)); }
// -DPIN_Q (twelfth session): each q vector pinned too, as csrc/mqa_decode.cpp now does;
// without it GCC folds the q load into its three FMAs (15 loads per 12 FMAs).
#ifdef PIN_Q
static inline void in_reg1(V& a){ asm("" : "+x"(a)); }
#else
static inline void in_reg1(V&){}
#endif
// 4 q rows x 3 keys: out[i*ldo + j]
__attribute__((noinline)) void dot_4x3(const float* a, int lda, const float* const* b, int hd, float* o, int ldo){
  V c00=_mm256_setzero_ps(),c01=c00,c02=c00,c10=c00,c11=c00,c12=c00,c20=c00,c21=c00,c22=c00,c30=c00,c31=c00,c32=c00;
  const float *b0=b[0],*b1=b[1],*b2=b[2];
  for(int d=0; d<hd; d+=8){
    V k0=_mm256_loadu_ps(b0+d),k1=_mm256_loadu_ps(b1+d),k2=_mm256_loadu_ps(b2+d);
    in_reg3(k0,k1,k2);
    V x=_mm256_loadu_ps(a+d); in_reg1(x); c00=_mm256_fmadd_ps(x,k0,c00);c01=_mm256_fmadd_ps(x,k1,c01);c02=_mm256_fmadd_ps(x,k2,c02);
    x=_mm256_loadu_ps(a+lda+d); in_reg1(x); c10=_mm256_fmadd_ps(x,k0,c10);c11=_mm256_fmadd_ps(x,k1,c11);c12=_mm256_fmadd_ps(x,k2,c12);
    x=_mm256_loadu_ps(a+2*lda+d); in_reg1(x); c20=_mm256_fmadd_ps(x,k0,c20);c21=_mm256_fmadd_ps(x,k1,c21);c22=_mm256_fmadd_ps(x,k2,c22);
    x=_mm256_loadu_ps(a+3*lda+d); in_reg1(x); c30=_mm256_fmadd_ps(x,k0,c30);c31=_mm256_fmadd_ps(x,k1,c31);c32=_mm256_fmadd_ps(x,k2,c32);
  }
  // sums: (c00,c01,c02,c10) (c11,c12,c20,c21) (c22,c30,c31,c32)
  float t[12];
  _mm_storeu_ps(t,fin(hs4(c00,c01,c02,c10))); _mm_storeu_ps(t+4,fin(hs4(c11,c12,c20,c21))); _mm_storeu_ps(t+8,fin(hs4(c22,c30,c31,c32)));
  for(int i=0;i<4;i++) for(int j=0;j<3;j++) o[i*ldo+j]=t[i*3+j];
}
// PV: acc[NR rows][hd] += p[i*ldp + j] * V[j] ; strip of 4 vectors, 2 rows
__attribute__((noinline)) void pv_2x4(float* acc, int hd, const float* p, int ldp, const float* const* vrow, int n){
  for(int d=0; d<hd; d+=32){
    V a[2][4];
    for(int i=0;i<2;i++) for(int u=0;u<4;u++) a[i][u]=_mm256_loadu_ps(acc+i*hd+d+u*8);
    for(int j=0;j<n;j++){
      const float* vr=vrow[j]+d;
      V v0=_mm256_loadu_ps(vr),v1=_mm256_loadu_ps(vr+8),v2=_mm256_loadu_ps(vr+16),v3=_mm256_loadu_ps(vr+24);
      for(int i=0;i<2;i++){ V pj=_mm256_broadcast_ss(p+i*ldp+j); a[i][0]=_mm256_fmadd_ps(pj,v0,a[i][0]);a[i][1]=_mm256_fmadd_ps(pj,v1,a[i][1]);a[i][2]=_mm256_fmadd_ps(pj,v2,a[i][2]);a[i][3]=_mm256_fmadd_ps(pj,v3,a[i][3]); }
    }
    for(int i=0;i<2;i++) for(int u=0;u<4;u++) _mm256_storeu_ps(acc+i*hd+d+u*8,a[i][u]);
  }
}
// 4 rows x 3 vectors (24 floats); hd=128 = 5 strips of 24 + 8 tail (4 rows x 1 vector)
__attribute__((noinline)) void pv_4x3(float* acc, int hd, const float* p, int ldp, const float* const* vrow, int n){
  int d=0;
  for(; d+24<=hd; d+=24){
    V a00=_mm256_loadu_ps(acc+d),a01=_mm256_loadu_ps(acc+d+8),a02=_mm256_loadu_ps(acc+d+16);
    V a10=_mm256_loadu_ps(acc+hd+d),a11=_mm256_loadu_ps(acc+hd+d+8),a12=_mm256_loadu_ps(acc+hd+d+16);
    V a20=_mm256_loadu_ps(acc+2*hd+d),a21=_mm256_loadu_ps(acc+2*hd+d+8),a22=_mm256_loadu_ps(acc+2*hd+d+16);
    V a30=_mm256_loadu_ps(acc+3*hd+d),a31=_mm256_loadu_ps(acc+3*hd+d+8),a32=_mm256_loadu_ps(acc+3*hd+d+16);
    for(int j=0;j<n;j++){
      const float* vr=vrow[j]+d;
      V v0=_mm256_loadu_ps(vr),v1=_mm256_loadu_ps(vr+8),v2=_mm256_loadu_ps(vr+16);
      in_reg3(v0,v1,v2);
      V pj=_mm256_broadcast_ss(p+j); a00=_mm256_fmadd_ps(pj,v0,a00);a01=_mm256_fmadd_ps(pj,v1,a01);a02=_mm256_fmadd_ps(pj,v2,a02);
      pj=_mm256_broadcast_ss(p+ldp+j); a10=_mm256_fmadd_ps(pj,v0,a10);a11=_mm256_fmadd_ps(pj,v1,a11);a12=_mm256_fmadd_ps(pj,v2,a12);
      pj=_mm256_broadcast_ss(p+2*ldp+j); a20=_mm256_fmadd_ps(pj,v0,a20);a21=_mm256_fmadd_ps(pj,v1,a21);a22=_mm256_fmadd_ps(pj,v2,a22);
      pj=_mm256_broadcast_ss(p+3*ldp+j); a30=_mm256_fmadd_ps(pj,v0,a30);a31=_mm256_fmadd_ps(pj,v1,a31);a32=_mm256_fmadd_ps(pj,v2,a32);
    }
    _mm256_storeu_ps(acc+d,a00);_mm256_storeu_ps(acc+d+8,a01);_mm256_storeu_ps(acc+d+16,a02);
    _mm256_storeu_ps(acc+hd+d,a10);_mm256_storeu_ps(acc+hd+d+8,a11);_mm256_storeu_ps(acc+hd+d+16,a12);
    _mm256_storeu_ps(acc+2*hd+d,a20);_mm256_storeu_ps(acc+2*hd+d+8,a21);_mm256_storeu_ps(acc+2*hd+d+16,a22);
    _mm256_storeu_ps(acc+3*hd+d,a30);_mm256_storeu_ps(acc+3*hd+d+8,a31);_mm256_storeu_ps(acc+3*hd+d+16,a32);
  }
  for(; d+8<=hd; d+=8){
    V a0=_mm256_loadu_ps(acc+d),a1=_mm256_loadu_ps(acc+hd+d),a2=_mm256_loadu_ps(acc+2*hd+d),a3=_mm256_loadu_ps(acc+3*hd+d);
    for(int j=0;j<n;j++){ V v=_mm256_loadu_ps(vrow[j]+d);
      a0=_mm256_fmadd_ps(_mm256_broadcast_ss(p+j),v,a0);a1=_mm256_fmadd_ps(_mm256_broadcast_ss(p+ldp+j),v,a1);
      a2=_mm256_fmadd_ps(_mm256_broadcast_ss(p+2*ldp+j),v,a2);a3=_mm256_fmadd_ps(_mm256_broadcast_ss(p+3*ldp+j),v,a3);}
    _mm256_storeu_ps(acc+d,a0);_mm256_storeu_ps(acc+hd+d,a1);_mm256_storeu_ps(acc+2*hd+d,a2);_mm256_storeu_ps(acc+3*hd+d,a3);
  }
}
int main(int argc,char**argv){
  int T=atoi(argv[1]), hd=128, R=8, blk=64;
  std::vector<float> K((size_t)T*hd), Q(R*hd), S(R*(T+4)), Acc(R*hd);
  for(auto&x:K) x=rand()/(float)RAND_MAX; for(auto&x:Q) x=rand()/(float)RAND_MAX;
  std::vector<const float*> kr(T+4); for(int j=0;j<T+4;j++) kr[j]=K.data()+(size_t)(j%T)*hd;
  int reps = 400000000/(T*R*hd);
  const char* names[]={"dot_2x4","dot_4x3","pv_2x4","pv_4x3"};
  for(int rep=0;rep<2;rep++)
  for(int mode=0; mode<4; mode++){
  auto t0=std::chrono::steady_clock::now();
  for(int it=0; it<reps; it++){
    if(mode==0){ for(int j=0;j<T;j+=4) for(int r=0;r<R;r+=2) dot_2x4(Q.data()+r*hd,Q.data()+(r+1)*hd,kr.data()+j,hd,S.data()+r*T+j,S.data()+(r+1)*T+j); }
    else if(mode==1){ for(int j=0;j<T;j+=3) for(int r=0;r<R;r+=4) dot_4x3(Q.data()+r*hd,hd,kr.data()+j,hd,S.data()+r*(T+4)+j,T+4); }
    else if(mode==2){ for(int j0=0;j0<T;j0+=blk) for(int r=0;r<R;r+=2) pv_2x4(Acc.data()+r*hd,hd,S.data()+r*(T+4)+j0,T+4,kr.data()+j0,blk); }
    else { for(int j0=0;j0<T;j0+=blk) for(int r=0;r<R;r+=4) pv_4x3(Acc.data()+r*hd,hd,S.data()+r*(T+4)+j0,T+4,kr.data()+j0,blk); }
  }
  double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  double vf=(double)reps*T*R*hd/8;
  printf("T=%d %s: %.3f G vecFMA/s  (%.1f us per 1024 keys x 8 rows)\n",T,names[mode],vf/s/1e9, s/reps*1e6*1024/T);
  }
}
