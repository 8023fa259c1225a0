// XLA FFI custom call for MoE decode on CPU: y[p] = x[p] @ W[idx[p]]
// W is the *whole stacked* expert array viewed as [G, K, N] ("in x out" layout,
// G = L*E), read in place: no slice is ever materialised.  Pairs that share an
// expert are grouped so each chosen expert matrix is streamed from memory once
// (rows of the group are accumulated together).  Work is split over the K
// (contraction) rows across std::thread::hardware_concurrency() threads so each
// thread streams contiguous memory; per-thread partial sums are added at the end.
// Threads are spawned per call (no pool): ~tens of microseconds per call.
#include <algorithm>
#include <cstdint>
#include <map>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
constexpr int RB = 8;         // rows (pairs sharing an expert) accumulated together

// Thread t owns the contiguous row range [k0, k1) of every chosen matrix and
// accumulates a private partial y (full width N); partials are summed at the end.
void Work(const float* x, const float* W, float* part, int64_t K, int64_t N,
          int64_t k0, int64_t k1,
          const std::vector<std::pair<int32_t, std::vector<int>>>& groups) {
  for (const auto& g : groups) {
    const float* Wm = W + static_cast<int64_t>(g.first) * K * N;
    const std::vector<int>& rows = g.second;
    for (size_t r0 = 0; r0 < rows.size(); r0 += RB) {
      const int mb = static_cast<int>(std::min<size_t>(RB, rows.size() - r0));
      for (int64_t k = k0; k < k1; ++k) {
        const float* __restrict wr = Wm + k * N;
        for (int r = 0; r < mb; ++r) {
          const int64_t p = rows[r0 + r];
          const float xv = x[p * K + k];
          float* __restrict a = part + p * N;
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) a[j] += xv * wr[j];
        }
      }
    }
  }
}

ffi::Error MoeMvImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> W,
                     ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = W.dimensions();
  if (wd.size() != 3) return ffi::Error::InvalidArgument("W must be [G,K,N]");
  const int64_t G = wd[0], K = wd[1], N = wd[2];
  const int64_t P = idx.element_count();
  std::map<int32_t, std::vector<int>> m;
  const int32_t* id = idx.typed_data();
  for (int64_t p = 0; p < P; ++p) {
    if (id[p] < 0 || id[p] >= G) return ffi::Error::InvalidArgument("expert index out of range");
    m[id[p]].push_back(static_cast<int>(p));
  }
  std::vector<std::pair<int32_t, std::vector<int>>> groups(m.begin(), m.end());
  const int T = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  float* out = y->typed_data();
  std::fill(out, out + P * N, 0.f);
  std::vector<std::vector<float>> parts(T > 1 ? T - 1 : 0, std::vector<float>(P * N, 0.f));
  std::vector<std::thread> th;
  const int64_t per = (K + T - 1) / T;
  for (int t = 1; t < T; ++t) {
    const int64_t k0 = t * per, k1 = std::min(K, (t + 1) * per);
    if (k0 >= k1) break;
    th.emplace_back(Work, x.typed_data(), W.typed_data(), parts[t - 1].data(), K, N, k0, k1, std::cref(groups));
  }
  Work(x.typed_data(), W.typed_data(), out, K, N, 0, std::min(K, per), groups);
  for (auto& t : th) t.join();
  for (int t = 1; t < T && t - 1 < static_cast<int>(parts.size()); ++t)
    for (int64_t i = 0; i < P * N; ++i) out[i] += parts[t - 1][i];
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeMv, MoeMvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [P, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // W [G, K, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // idx [P]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y [P, N]
