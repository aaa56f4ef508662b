#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(){
  __m256 a[10]; for(int i=0;i<10;i++) a[i]=_mm256_set1_ps(1.0f+i*1e-7f);
  __m256 x=_mm256_set1_ps(0.9999999f), y=_mm256_set1_ps(1e-7f);
  struct timespec t0,t1; long N=200000000;
  clock_gettime(CLOCK_MONOTONIC,&t0);
  for(long i=0;i<N;i++){ for(int j=0;j<10;j++) a[j]=_mm256_fmadd_ps(a[j],x,y); }
  clock_gettime(CLOCK_MONOTONIC,&t1);
  double s=(t1.tv_sec-t0.tv_sec)+(t1.tv_nsec-t0.tv_nsec)*1e-9;
  float r=0; for(int j=0;j<10;j++) r+=a[j][0];
  printf("%.2f G vecFMA/s  (%.1f GFLOP/s) %f\n", N*10/s/1e9, N*10*16/s/1e9, r);
}
