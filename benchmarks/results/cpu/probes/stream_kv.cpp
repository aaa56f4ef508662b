#include <immintrin.h>
#include <omp.h>
#include <cstdio>
#include <vector>
#include <chrono>
#include <cstdlib>
// 2 threads; NSETS sets of (K, V) each [2 seq][1024][128] floats; thread t reads seq t
int main(int argc, char** argv){
  const int NS=8, T=1024, hd=128; const size_t per=(size_t)2*T*hd;
  std::vector<float*> K(NS), V(NS);
  for(int s=0;s<NS;s++){ K[s]=(float*)aligned_alloc(64,per*4); V[s]=(float*)aligned_alloc(64,per*4); for(size_t i=0;i<per;i++){K[s][i]=1;V[s][i]=2;} }
  for(int mode=0; mode<4; mode++){
    double best=1e9; std::vector<double> ts;
    float sink=0;
    for(int it=0; it<400; it++){
      int s=it%NS;
      auto t0=std::chrono::steady_clock::now();
      #pragma omp parallel num_threads(2) reduction(+:sink)
      {
        int t=omp_get_thread_num();
        const float* k=K[s]+(size_t)t*T*hd; const float* v=V[s]+(size_t)t*T*hd;
        __m256 a=_mm256_setzero_ps(), b=a;
        if(mode==0){ // K then V, contiguous
          for(size_t i=0;i<(size_t)T*hd;i+=16){ a=_mm256_add_ps(a,_mm256_load_ps(k+i)); b=_mm256_add_ps(b,_mm256_load_ps(k+i+8)); }
          for(size_t i=0;i<(size_t)T*hd;i+=16){ a=_mm256_add_ps(a,_mm256_load_ps(v+i)); b=_mm256_add_ps(b,_mm256_load_ps(v+i+8)); }
        } else if(mode==1){ // K and V interleaved by row
          for(int j=0;j<T;j++){ for(int d=0;d<hd;d+=16){ a=_mm256_add_ps(a,_mm256_load_ps(k+j*hd+d)); b=_mm256_add_ps(b,_mm256_load_ps(k+j*hd+d+8)); }
                                for(int d=0;d<hd;d+=16){ a=_mm256_add_ps(a,_mm256_load_ps(v+j*hd+d)); b=_mm256_add_ps(b,_mm256_load_ps(v+j*hd+d+8)); } }
        } else if(mode==2){ // blocks of 64 keys: K block then V block
          for(int j0=0;j0<T;j0+=64){ for(size_t i=(size_t)j0*hd;i<(size_t)(j0+64)*hd;i+=16){ a=_mm256_add_ps(a,_mm256_load_ps(k+i)); b=_mm256_add_ps(b,_mm256_load_ps(k+i+8)); }
                                     for(size_t i=(size_t)j0*hd;i<(size_t)(j0+64)*hd;i+=16){ a=_mm256_add_ps(a,_mm256_load_ps(v+i)); b=_mm256_add_ps(b,_mm256_load_ps(v+i+8)); } }
        } else { // mode 2 + sw prefetch next block
          for(int j0=0;j0<T;j0+=64){
            const char* pk=(const char*)(k+(size_t)(j0+64)*hd); const char* pv=(const char*)(v+(size_t)(j0+64)*hd);
            bool pf = j0+64<T;
            for(size_t i=(size_t)j0*hd, c=0;i<(size_t)(j0+64)*hd;i+=16, c+=64){ if(pf){ _mm_prefetch(pk+c,_MM_HINT_T0);} a=_mm256_add_ps(a,_mm256_load_ps(k+i)); b=_mm256_add_ps(b,_mm256_load_ps(k+i+8)); }
            for(size_t i=(size_t)j0*hd, c=0;i<(size_t)(j0+64)*hd;i+=16, c+=64){ if(pf){ _mm_prefetch(pv+c,_MM_HINT_T0);} a=_mm256_add_ps(a,_mm256_load_ps(v+i)); b=_mm256_add_ps(b,_mm256_load_ps(v+i+8)); } }
        }
        float tmp[8]; _mm256_storeu_ps(tmp,_mm256_add_ps(a,b)); sink+=tmp[0];
      }
      ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count());
    }
    std::sort(ts.begin(),ts.end()); double med=ts[ts.size()/2];
    printf("mode %d: median %.1f us  %.2f GB/s (sink %g)\n",mode,med*1e6, per*2*4/med/1e9, sink);
  }
}
