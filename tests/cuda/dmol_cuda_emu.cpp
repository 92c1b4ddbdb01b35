// Runs csrc/cuda/dmol.cu's kernels on the CUDA emulator (common.cuh compiled with -DVF_EMULATE: threads as
// fibers, bounds-checked memory, one writer per output element) for tests/test_dmol.py, which compares the
// results with the CPU op. Built by that test (from the repository root) with
//   g++ -std=c++17 -O1 -DVF_EMULATE -x c++ -I<cuda include> -Icsrc -Icsrc/cuda -Itests/cuda
//       tests/cuda/dmol_cuda_emu.cpp
// Usage: dmol_cuda_emu DIR. DIR/args.txt holds whitespace-separated integers:
//   f64 C M bits R H W reduce  xs[5] ps[5] os[5]  logit_base mean_base mean_channel_step log_scale_base
//   log_scale_channel_step coeff_base coeff_step component_step  seed
// (strides as launch_args.h's DmolStrides: outer inner c h w; outer = 1, inner = R; gs = os, dxs = ss = xs,
// dps = ps), and DIR/x.bin, params.bin, grad.bin the inputs (float32, or float64 when f64). Writes
// DIR/out.bin, dx.bin, dparams.bin, sample.bin.
#include "cuda/dmol.cu"

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const void* p, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
}

void* to_device(const std::vector<char>& host) {
  void* d = nullptr;
  if (cudaMalloc(&d, std::max<size_t>(host.size(), 8)) != cudaSuccess) std::abort();
  std::memcpy(d, host.data(), host.size());
  return d;
}

void* device_buffer(size_t bytes) {
  void* d = nullptr;
  if (cudaMalloc(&d, std::max<size_t>(bytes, 8)) != cudaSuccess) std::abort();
  return d;
}

void read_strides(std::ifstream& f, vae_fast::DmolStrides& s) { f >> s.outer >> s.inner >> s.c >> s.h >> s.w; }

}  // namespace

int main(int argc, char** argv) {
  using namespace vae_fast;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  std::ifstream f(dir + "/args.txt");
  int64_t f64, C, M, bits, R, H, W, reduce;
  f >> f64 >> C >> M >> bits >> R >> H >> W >> reduce;
  DmolArgs a;
  read_strides(f, a.xs);
  read_strides(f, a.ps);
  read_strides(f, a.os);
  f >> a.logit_base >> a.mean_base >> a.mean_channel_step >> a.log_scale_base >> a.log_scale_channel_step >>
      a.coeff_base >> a.coeff_step >> a.component_step;
  int64_t seed;
  f >> seed;
  if (!f) {
    std::fprintf(stderr, "bad args.txt\n");
    return 2;
  }
  const DType dt = f64 ? DType::Float64 : DType::Float32;
  const size_t es = f64 ? 8 : 4;
  a.channels = static_cast<int32_t>(C);
  a.mixtures = static_cast<int32_t>(M);
  a.num_bits = static_cast<int32_t>(bits);
  a.outer = 1;
  a.inner = R;
  a.height = H;
  a.width = W;
  a.x_dtype = a.params_dtype = a.dx_dtype = a.dparams_dtype = a.acc_dtype = dt;
  a.reduce = static_cast<DmolReduce>(reduce);
  const auto x = read_file(dir + "/x.bin"), params = read_file(dir + "/params.bin"), grad = read_file(dir + "/grad.bin");
  a.x = to_device(x);
  a.params = to_device(params);
  const size_t n_out = a.reduce == DmolReduce::PerPixel ? R * H * W : a.reduce == DmolReduce::PerLine ? R * H : R;
  a.out = device_buffer(n_out * es);
  a.scratch = device_buffer(static_cast<size_t>(R * H * W) * es);
  if (cuda::launch_dmol_forward(a, nullptr) != cudaSuccess) return 3;
  write_file(dir + "/out.bin", a.out, n_out * es);
  // backward
  a.grad = to_device(grad);
  a.gs = a.os;
  a.dx = device_buffer(x.size());
  a.dxs = a.xs;
  a.dparams = device_buffer(params.size());
  a.dps = a.ps;
  if (cuda::launch_dmol_backward(a, nullptr) != cudaSuccess) return 4;
  write_file(dir + "/dx.bin", a.dx, x.size());
  write_file(dir + "/dparams.bin", a.dparams, params.size());
  // sampler (x's layout)
  a.sample = device_buffer(x.size());
  a.ss = a.xs;
  a.seed_value = static_cast<uint64_t>(seed);
  if (cuda::launch_dmol_sample(a, nullptr) != cudaSuccess) return 5;
  write_file(dir + "/sample.bin", a.sample, x.size());
  std::printf("ok\n");
  return 0;
}
