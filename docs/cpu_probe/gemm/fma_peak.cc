// Standalone probe: one core's float32 FMA peak (24 independent 16-float FMA chains).
//   g++ -O3 -march=native docs/cpu_probe/gemm/fma_peak.cc -o /tmp/fma_peak && /tmp/fma_peak
// Here: 193-197 GFLOP/s, on each core alone and on both at once (two processes).
#include <chrono>
#include <cstdio>
typedef float v16 __attribute__((vector_size(64)));
int main(){
  v16 a[24]; v16 b = {1.0001f}, c={0.9999f};
  for(int i=0;i<24;i++) a[i]=v16{}+(float)i;
  auto t0=std::chrono::steady_clock::now();
  long it=200000000;
  for(long k=0;k<it;k++){
#pragma GCC unroll 24
    for(int i=0;i<24;i++) a[i]=a[i]*b+c;
    asm volatile("" : "+v"(b));
  }
  double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  float t=0; for(int i=0;i<24;i++) t+=a[i][0];
  printf("%.1f GFLOP/s one core (%f)\n", it*24.0*32/s/1e9, t);
}
