#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <vector>
#include <cstring>
#include "score_2x4.h"  // V, in_reg, hs4, dot_2x4
// 4 rows x 2 keys variant
__attribute__((noinline)) void dot_4x2(const float* a, int lda, const float* const* b, int hd, float* o, int ldo){
  V c[4][2]; for(int i=0;i<4;i++) c[i][0]=c[i][1]=_mm256_setzero_ps();
  for(int d=0; d<hd; d+=8){
    V k0=_mm256_loadu_ps(b[0]+d),k1=_mm256_loadu_ps(b[1]+d);
    for(int i=0;i<4;i++){ V x=_mm256_loadu_ps(a+i*lda+d); c[i][0]=_mm256_fmadd_ps(x,k0,c[i][0]); c[i][1]=_mm256_fmadd_ps(x,k1,c[i][1]); }
  }
  for(int i=0;i<4;i++){ float t0[8],t1[8]; _mm256_storeu_ps(t0,c[i][0]); _mm256_storeu_ps(t1,c[i][1]); float s0=0,s1=0; for(int l=0;l<8;l++){s0+=t0[l];s1+=t1[l];} o[i*ldo]=s0; o[i*ldo+1]=s1; }
}
int main(int argc,char**argv){
  int T=atoi(argv[1]), hd=128, R=8;
  std::vector<float> K((size_t)T*hd), Q(R*hd), S(R*T);
  for(auto&x:K) x=rand()/(float)RAND_MAX; for(auto&x:Q) x=rand()/(float)RAND_MAX;
  std::vector<const float*> kr(T+4); for(int j=0;j<T;j++) kr[j]=K.data()+(size_t)j*hd;
  int reps = 400000000/(T*R*hd);
  for(int mode=0; mode<3; mode++){
  auto t0=std::chrono::steady_clock::now();
  for(int it=0; it<reps; it++){
    if(mode==0){ for(int j=0;j<T;j+=4) for(int r=0;r<R;r+=2) dot_2x4(Q.data()+r*hd,Q.data()+(r+1)*hd,kr.data()+j,hd,S.data()+r*T+j,S.data()+(r+1)*T+j); }
    else if(mode==1){ for(int r=0;r<R;r+=2) for(int j=0;j<T;j+=4) dot_2x4(Q.data()+r*hd,Q.data()+(r+1)*hd,kr.data()+j,hd,S.data()+r*T+j,S.data()+(r+1)*T+j); }
    else { for(int j=0;j<T;j+=2) for(int r=0;r<R;r+=4) dot_4x2(Q.data()+r*hd,hd,kr.data()+j,hd,S.data()+r*T+j,T); }
  }
  double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  double vf=(double)reps*T*R*hd/8;
  printf("T=%d mode %d: %.3f G vecFMA/s  (%.1f us per 1024x8 keys-rows)\n",T,mode,vf/s/1e9, s/reps*1e6*1024/T);
  }
}
