// CUDA kernels of vae_fast: framework-free entry points (raw pointers, sizes, cudaStream_t and the
// launch descriptions of core/launch_args.h). No torch header here or in any .cu file of this folder, so
// nvcc compiles them on any machine.
//
// Every launcher only enqueues work on `stream` (no host synchronisation, no host read of device
// memory: CUDA-graph capture safe) and returns the launch error (cudaGetLastError after each
// launch), or cudaErrorInvalidValue for a description it cannot run (too many dims, float64 mixed
// with another dtype, an accumulate output not in the accumulation type, ...). It never exits.
//
// Determinism: no atomics anywhere. Every sum is taken in an order fixed by the shapes (and, for
// accumulated gradients, by RowLayout::n_blocks), never by scheduling, so two runs on the same
// inputs give bitwise equal results.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "core/launch_args.h"
#include "core/op_table.h"

namespace vae_fast::cuda {

// Forward (KlStdFwd, KlFwd, GaussLpFwd, BernLpFwd): out[0][row] = sum over the event of the term,
// or every term when args.layout.elementwise. Backward (KlStdBwd, KlBwd, GaussLpBwd, BernLpBwd):
// in[0] is the upstream gradient g (indexed through its strides, event strides 0 when it is one
// value per row); writes every out[i] whose data != nullptr, either through its strides or, when
// out[i].accumulate, by adding into the accumulation-type partial-sum slice of the row block that
// owns the row (slices pre-zeroed by the caller, summed by the caller in slice order afterwards).
cudaError_t launch_rows(OpKind op, const RowArgs& args, cudaStream_t stream);

// z[k, r, j] = mu[r, j] + exp(logvar[r, j] / 2) * eps, eps from core/philox.h's counter layout keyed by
// *args.seed (read on the device); optionally kl[r] and log_q[k, r].
cudaError_t launch_sample_forward(const SampleArgs& args, cudaStream_t stream);

// grad_mu / grad_logvar from grad_z (eps regenerated from the seed), grad_log_q and grad_kl.
cudaError_t launch_sample_backward(const SampleArgs& args, cudaStream_t stream);

// A good RowLayout::n_blocks for a launch_rows backward of `op` with accumulated outputs on `device`
// (the device the launch will run on). args: the launch as it will run, inputs bound, every wanted
// output's strides and `accumulate` set (an accumulated output's slices need not be bound yet).
// slice_numel: the largest block_stride among the accumulated outputs. Where the fast path applies
// (rows.cu's one-pass kernels: the (K, B, D) samples against (B, D) data, a (D,) prior against
// (B, D), a per-row or a scalar log-variance), their segments or blocks: a function of the shapes only. Otherwise returns 1 when
// slice_numel >= rows: the targets then follow the rows, and with n_blocks == 1 the kernels reduce
// every target over its broadcast dims in one pass, fully parallel over the targets, with no extra
// slice memory; else enough row blocks to fill the GPU (each reduced by one warp or block, its
// rows in order), capped so the slices (n_blocks * slice_numel) stay within
// max(rows * event_numel / 4, 2^20) elements. Correctness never depends on the choice; speed does.
// Never depends on data. Host only; no launch.
int64_t suggest_n_blocks(int device, OpKind op, const RowArgs& args, int64_t slice_numel);

// The discretized mixture of logistics (dmol.cu; core/launch_args.h's DmolArgs): one thread per pixel. Forward:
// per-pixel terms straight into out (PerPixel) or into args.scratch, then one group per output summing
// its pixels in a fixed order (compensated); backward: dx and dparams written per pixel (no sums across
// pixels); sampler: core/philox.h's generator with DmolArgs' counter layout.
cudaError_t launch_dmol_forward(const DmolArgs& args, cudaStream_t stream);
cudaError_t launch_dmol_backward(const DmolArgs& args, cudaStream_t stream);
cudaError_t launch_dmol_sample(const DmolArgs& args, cudaStream_t stream);

}  // namespace vae_fast::cuda
