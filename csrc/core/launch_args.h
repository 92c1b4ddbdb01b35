// Framework-free description of one kernel launch, shared by the CPU kernels, the CUDA kernels
// (which include no torch header) and the torch-facing glue that fills it in (glue/row_problem.cpp, sample_ops.cpp, dmol_ops.cpp).
//
// Every deterministic op is "elementwise terms over a broadcast shape S, summed over the trailing
// event dimensions". The glue splits S into row (batch) dims and event dims, coalesces each group,
// and gives every tensor argument its strides over both groups (0 where it is broadcast), so the
// kernels read broadcast arguments in place and never materialise them.
#pragma once
#include <cstdint>

namespace vae_fast {

constexpr int kMaxDims = 8;

enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// An input read as clamp(x, lo, hi) (torch.clamp: a NaN stays NaN). Its gradient is torch.clamp's:
// the gradient of the clamped value where lo <= x <= hi (edges included), 0 elsewhere (NaN included).
struct Clamp {
  bool on = false;
  double lo = 0.0, hi = 0.0;
};

struct Operand {
  void* data = nullptr;  // nullptr: this output is not wanted
  DType dtype = DType::Float32;
  // Inputs only: clamped on load. In a backward op, the gradient output of this input (out[j - 1] for
  // in[j], in[0] being the upstream gradient) is masked to where the raw input lies in [lo, hi].
  Clamp clamp;
  int64_t row_strides[kMaxDims] = {};    // in elements, over RowLayout::row_sizes
  int64_t event_strides[kMaxDims] = {};  // in elements, over RowLayout::event_sizes
  // Outputs only. accumulate: the argument is broadcast, so `data` is a block of partial sums in
  // the accumulation type, one slice of `block_stride` elements per row block; the glue sums the
  // slices in a fixed order afterwards (deterministic, no atomics).
  bool accumulate = false;
  int64_t block_stride = 0;
};

struct RowLayout {
  int n_row_dims = 0;
  int64_t row_sizes[kMaxDims] = {};
  int64_t rows = 1;
  int n_event_dims = 0;
  int64_t event_sizes[kMaxDims] = {};  // innermost last
  int64_t event_numel = 1;
  // Forward: false sums each row's terms into out[row]; true (event_dims == 0) writes every term.
  bool elementwise = false;
  // Row blocks for accumulated gradients: block b owns rows [b * rows / n_blocks, (b+1) * rows / n_blocks).
  int64_t n_blocks = 1;
};


constexpr int kMaxOperands = 5;

struct RowArgs {
  RowLayout layout;
  Operand in[kMaxOperands];
  Operand out[kMaxOperands];
};

// How the CPU row engine walks the rows (cpu/rows.cpp): r = o * inner + i, where i runs over the trailing
// row dims along which more inputs are broadcast than along the leading ones (glue/row_problem.cpp walks those
// innermost): the K samples of a (K, B, D) operand against (B, D) data. Tiles of `tile` outer rows
// (256K elements: 1 MiB of a float32 operand, in L2); accumulated gradients split into blocks of outer rows.
struct RowTiling {
  int64_t outer, inner, tile;
};

inline RowTiling row_tiling(const RowArgs& args, int n_inputs) {
  const RowLayout& L = args.layout;
  auto broadcast_count = [&](int d) {
    int c = 0;
    for (int j = 0; j < n_inputs; ++j) c += args.in[j].row_strides[d] == 0;
    return c;
  };
  int64_t inner = 1;
  if (L.n_row_dims >= 2) {
    const int lead = broadcast_count(0);
    for (int d = L.n_row_dims - 1; d > 0 && broadcast_count(d) > lead; --d) inner *= L.row_sizes[d];
  }
  const int64_t tile = (int64_t{1} << 18) / (L.event_numel > 1 ? L.event_numel : 1);
  return {L.rows / inner, inner, tile > 1 ? tile : 1};
}

// Whether blocks of outer rows write disjoint elements of output `out` (its strides over every outer
// row dim nonzero): its per-block partial sums can then share one slice (the CPU engine).
inline bool outer_rows_disjoint(const RowArgs& args, const Operand& out, int n_inputs) {
  const RowLayout& L = args.layout;
  const RowTiling t = row_tiling(args, n_inputs);
  int64_t outer = 1;
  for (int d = 0; d < L.n_row_dims && outer < t.outer; ++d) {
    if (out.row_strides[d] == 0) return false;
    outer *= L.row_sizes[d];
  }
  return true;
}

// Reparameterised sampling over mu and logvar viewed as (rows, event_numel) in logical C order:
// z[k, r, j] = mu[r, j] + exp(logvar[r, j] / 2) * eps(seed, k * rows * event_numel + r * event_numel + j).
// Memory: logical flat element m (0 <= m < rows * event_numel) of mu sits at
//   (m / run) * mu_run_stride + (m % run)      (logvar: logvar_run_stride, the same run),
// so chunks of an encoder output (along the last dim, or channel halves along dim 1) are read in
// place; contiguous inputs have run == mu_run_stride == logvar_run_stride (any run dividing the
// element count). z, log_q and kl are contiguous; grad_mu and grad_logvar lie in runs of grad_run
// elements at grad_mu_run_stride / grad_logvar_run_stride (contiguous: all three equal; the two halves
// of one parameters-shaped gradient buffer otherwise).
struct SampleArgs {
  const void* mu = nullptr;
  const void* logvar = nullptr;
  DType dtype = DType::Float32;  // of mu, logvar, z and the z/mu/logvar gradients
  int64_t rows = 0, event_numel = 0, num_samples = 1;
  int64_t run = 0, mu_run_stride = 0, logvar_run_stride = 0;  // memory layout, see above (run >= 1)
  int64_t grad_run = 0, grad_mu_run_stride = 0, grad_logvar_run_stride = 0;  // the gradients' (run >= 1)
  // logvar is clamped on load (forward and backward); grad_logvar is then torch.clamp's (see Clamp).
  Clamp logvar_clamp;
  // The Philox key: *seed when seed != nullptr (one int64 on the op's device, read there: CUDA-graph
  // safe), else seed_value (passed by value: no host-to-device copy, no sync).
  const int64_t* seed = nullptr;
  uint64_t seed_value = 0;
  // Backward: log_q's gradient flows only through z ("sticking the landing" / DReG): log q is
  // log q(z; stop_grad(mu), stop_grad(logvar)), so d log_q / d z_k = -eps_k / sigma and nothing
  // flows to mu and logvar directly. Off: log_q = -0.5 * sum(log 2 pi + logvar + eps^2) at fixed eps.
  bool log_q_path_only = false;
  // forward outputs (nullptr when not wanted); log_q is (K, rows), kl is (rows), both in the accumulation type
  void* z = nullptr;
  void* log_q = nullptr;
  void* kl = nullptr;
  // backward inputs (nullptr when no gradient flows from that output), contiguous
  const void* grad_z = nullptr;     // (K, rows, event_numel), dtype
  const void* grad_log_q = nullptr;  // (K, rows), accumulation type
  const void* grad_kl = nullptr;     // (rows), accumulation type
  // backward outputs (nullptr when not wanted), dtype, laid out by grad_run (see above)
  void* grad_mu = nullptr;
  void* grad_logvar = nullptr;
};


// ---- discretized mixture of logistics (DMOL): one launch --------------------------------------
// x is read as [rows][C][H][W] and params as [rows][P][H][W], each through its own element strides
// over those four axes (any layout read in place: channels_first, channels_last, PixelCNN++'s
// (B, H, W, P), chunks), rows as a two-level (outer, inner) walk: row r = o * inner + i lies at
// o * outer + i * inner (strides 0 where a tensor is broadcast over the rows, e.g. x of (B, C, H, W)
// against params of (K, B, P, H, W)). P = M * (1 + 2C + C(C-1)/2); where each parameter lies on the
// P axis is given by the offsets (dmol_math.h: dmol_logit / dmol_mean / dmol_log_scale / dmol_coeff).
struct DmolStrides {
  int64_t outer = 0, inner = 0, c = 0, h = 0, w = 0;  // elements; c: the channel (x) or P (params) axis
};

enum class DmolReduce : int32_t {
  PerPixel = 0,  // out[o, i, h, w]
  PerLine = 1,   // out[o, i, h] = sum over w (in w order)
  PerRow = 2,    // out[o, i] = sum over h, w (each line summed in w order, the lines in h order)
};

struct DmolArgs {
  const void* x = nullptr;
  DType x_dtype = DType::Float32;
  DmolStrides xs;
  const void* params = nullptr;
  DType params_dtype = DType::Float32;
  DmolStrides ps;
  int32_t channels = 3, mixtures = 1, num_bits = 8;
  // How far (in levels) x may lie from the 2^bits grid: the forward gives NaN beyond (dmol_math.h's
  // nan_off_support); the glue adds x's dtype's rounding of the levels (glue/dmol_ops.cpp).
  double grid_tol = 0.1;
  int64_t outer = 1, inner = 1, height = 1, width = 1;
  // P-axis offsets of component k's parameters (in P-axis units):
  //   logit k: logit_base + k * component_step
  //   mean of channel c: mean_base + c * mean_channel_step + k * component_step
  //   log-scale of channel c: log_scale_base + c * log_scale_channel_step + k * component_step
  //   raw coupling coefficient j (C = 3; j = 0, 1, 2 for c0, c1, c2): coeff_base + j * coeff_step + k * component_step
  // channels_first: [logits | means (C x M) | log-scales (C x M) | coeffs (3 x M)];
  // pixelcnn++: [logits | channel 0: means, log-scales, coeffs | channel 1 ... ] (PixelCNN++ / VDVAE).
  int64_t logit_base = 0, mean_base = 0, mean_channel_step = 0, log_scale_base = 0, log_scale_channel_step = 0,
          coeff_base = 0, coeff_step = 0, component_step = 1;
  // Accumulation type: Float64 for float64 inputs, else Float32 (x and params may differ otherwise).
  DType acc_dtype = DType::Float32;
  // Forward: out (acc_dtype) indexed by os over (outer, inner, -, h, w); `reduce` says what is summed
  // (in double on the CPU; compensated on CUDA), in a fixed order: bitwise the same for any thread count.
  DmolReduce reduce = DmolReduce::PerRow;
  void* out = nullptr;
  DmolStrides os;
  // CUDA forward with reduce != PerPixel: a contiguous (rows, H, W) buffer of acc_dtype the launcher
  // writes per-pixel terms into before summing them (the glue allocates it). Unused on the CPU.
  void* scratch = nullptr;
  // Backward: grad (acc_dtype) indexed by gs like out; dx (x_dtype) and dparams (params_dtype) written
  // through their strides where not nullptr (every element of each, once).
  const void* grad = nullptr;
  DmolStrides gs;
  // dx and dparams in their own dtypes: float32 where a half input was broadcast, so the glue sums
  // its full-size gradient in float32 and rounds once.
  void* dx = nullptr;
  DType dx_dtype = DType::Float32;
  DmolStrides dxs;
  void* dparams = nullptr;
  DType dparams_dtype = DType::Float32;
  DmolStrides dps;
  // Sampler: sample (params_dtype) indexed by ss over (outer, inner, c, h, w), its key *seed (a device
  // int64) when seed != nullptr, else seed_value. Counter layout: the uniforms of pixel
  // n = r * H * W + h * W + w (r the logical row) come from Philox4x32-10 blocks with
  // counter = (n & 0xffffffff, n >> 32, j, kDmolCounterTag), key = (seed & 0xffffffff, seed >> 32):
  // uniform i of the pixel (i < M: the Gumbel noise of component i; M + c: channel c's logistic) is
  // output i % 4 of block j = i / 4, mapped by dmol_math.h's dmol_uniform.
  void* sample = nullptr;
  DmolStrides ss;
  const int64_t* seed = nullptr;
  uint64_t seed_value = 0;
};
constexpr uint32_t kDmolCounterTag = 0x444D4F4Cu;  // "DMOL": a stream apart from the Gaussian sampler's

}  // namespace vae_fast
