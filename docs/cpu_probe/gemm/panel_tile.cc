// Standalone probe: the panel path's register tile (12 weight rows x 32 token columns,
// rows taken in threes from one pointer each) on one matrix shape, 1 or 2 threads.
//   g++ -O3 -march=native -pthread -DMR=12 docs/cpu_probe/gemm/panel_tile.cc -o /tmp/panel_tile
//   /tmp/panel_tile M KC THREADS [N K]     e.g. /tmp/panel_tile 128 1024 1   (N 3600, K 1024)
// Prints ms per [N, K] x [K, M] product (8 per timed round) and GFLOP/s; the source of the
// "163-166 GFLOP/s on one core, 270-300 on two" in csrc/moe_cpu.cc.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <thread>
#include <cmath>
typedef float v16 __attribute__((vector_size(64), aligned(4)));
#ifndef MR
#define MR 12
#endif
template<int NV>
inline void micro(const float* a, long lda, const float* b, long K, float* c, long ldc, bool accum){
  v16 acc[MR][NV];
  for(int i=0;i<MR;i++) for(int v=0;v<NV;v++) acc[i][v]= accum? *(v16*)(c+i*ldc+16*v) : v16{};
  const float* p[MR/3];
  for(int g=0;g<MR/3;g++) p[g]=a+3*g*lda;
  for(long k=0;k<K;k++){
    v16 bv[NV];
    for(int v=0;v<NV;v++) bv[v]=*(const v16*)(b+k*16*NV+16*v);
    for(int g=0;g<MR/3;g++){
      const float* q=p[g]+k;
      float s0=q[0], s1=q[lda], s2=q[2*lda];
      for(int v=0;v<NV;v++){ acc[3*g][v]+= s0*bv[v]; acc[3*g+1][v]+= s1*bv[v]; acc[3*g+2][v]+= s2*bv[v]; }
    }
  }
  for(int i=0;i<MR;i++) for(int v=0;v<NV;v++) *(v16*)(c+i*ldc+16*v)=acc[i][v];
}
int main(int argc,char**argv){
  long M=atoi(argv[1]), N=3600, K=1024; long KC=atoi(argv[2]); int thr=argc>3?atoi(argv[3]):1; if(argc>5){N=atoi(argv[4])/MR*MR;K=atoi(argv[5]);} if(KC>K)KC=K;
  std::vector<float> W(N*K), X(K*M), C(N*M);
  for(auto&v:W) v=rand()/(float)RAND_MAX-0.5f; for(auto&v:X) v=rand()/(float)RAND_MAX-0.5f;
  // X packed: panels of 32 cols: Xp[p][k][32] (last panel 16 wide if needed)
  auto run=[&](long n0,long n1){
    for(long kb=0;kb<K;kb+=KC){
    for(long n=n0;n<n1;n+=MR){
      long m=0;
      for(;m+32<=M;m+=32) micro<2>(W.data()+n*K+kb,K,X.data()+m*K+kb*32,KC,C.data()+n*M+m,M,kb>0);
      for(;m+16<=M;m+=16) micro<1>(W.data()+n*K+kb,K,X.data()+m*K+kb*16,KC,C.data()+n*M+m,M,kb>0);
    }}
  };
  for(int rep=0;rep<5;rep++){
    auto t0=std::chrono::steady_clock::now();
    for(int e=0;e<8;e++){
      if(thr==1) run(0,N);
      else { long half=(N/MR/2)*MR; std::thread t(run,0,half); run(half,N); t.join(); }
    }
    double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
    printf("M=%ld MR=%d KC=%ld thr=%d: %.2f ms per matrix, %.1f GFLOP/s\n",M,MR,KC,thr,s/8*1e3,8*2.0*M*N*K/s/1e9);
  }
}
