// Test-only: proves that the emulator (emu.h) catches a missing __syncthreads. A kernel sums
// values with common.cuh's group_sum over block-wide groups (the shared-memory step), several
// times in a row, exactly as the row and sampling kernels do. scripts/check_cuda_compile.sh builds
// it three times on the CPU emulator:
//   -DVF_DROP_BARRIER=0  every barrier in place: must print "race check: ok" and exit 0;
//   -DVF_DROP_BARRIER=1  without the barrier that protects the slots a previous call still reads;
//   -DVF_DROP_BARRIER=2  without the barrier between the slot writes and the reads;
// each of the last two must make the emulator abort with a shared-memory race.
// (nvcc also builds it, as the CMake target vf_cuda_race_check; it is never linked into the extension.)
#include "cuda/common.cuh"

#include <cstdio>
#include <vector>

namespace vc = vae_fast::cuda::detail;

namespace {

VF_GLOBAL void sums_kernel(const float* x, float* out, int rounds) {
  VF_SHARED_ARRAY(vc::SumPair<float>, smem, 32);
  const vc::ThreadGroup g(static_cast<int>(vc::bdim_x()));  // one block-wide group
  for (int r = 0; r < rounds; ++r) {
    vc::CSum<float> v;
    v.add(vc::ldg(x + r * vc::bdim_x() + g.lane));
    const float total = g.sum(v, smem);
    if (g.lane == 0) vc::st(out + vc::bid_x() * rounds + r, total);
  }
}

}  // namespace

int main() {
  const int block = 128, rounds = 3, grid = 2;
  float *x, *out;
  if (cudaMalloc(&x, block * rounds * sizeof(float)) != cudaSuccess ||
      cudaMalloc(&out, grid * rounds * sizeof(float)) != cudaSuccess)
    return 2;
  std::vector<float> h(block * rounds);
  for (int i = 0; i < block * rounds; ++i) h[i] = static_cast<float>(i % 7) - 3.0f;
  cudaMemcpy(x, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice);
  if (vc::launch_kernel(&sums_kernel, grid, block, nullptr, static_cast<const float*>(x), out, rounds) !=
      cudaSuccess)
    return 2;
  cudaDeviceSynchronize();
  std::vector<float> got(grid * rounds);
  cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost);
  for (int b = 0; b < grid; ++b)
    for (int r = 0; r < rounds; ++r) {
      float want = 0;
      for (int i = 0; i < block; ++i) want += h[r * block + i];
      if (got[b * rounds + r] != want) {
        std::printf("race check: block %d round %d: got %g want %g\n", b, r, got[b * rounds + r], want);
        return 1;
      }
    }
  std::printf("race check: ok\n");
  return 0;
}
