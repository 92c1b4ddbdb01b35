// CUDA kernels of vae_fast: framework-free entry points (raw pointers, sizes, cudaStream_t and the
// launch descriptions of ../layout.h). No torch header here or in any .cu file of this folder, so
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

#include "../layout.h"

namespace vae_fast::cuda {

// Forward (KlStdFwd, KlFwd, GaussLpFwd, BernLpFwd): out[0][row] = sum over the event of the term,
// or every term when args.layout.elementwise. Backward (KlStdBwd, KlBwd, GaussLpBwd, BernLpBwd):
// in[0] is the upstream gradient g (indexed through its strides, event strides 0 when it is one
// value per row); writes every out[i] whose data != nullptr, either through its strides or, when
// out[i].accumulate, by adding into the accumulation-type partial-sum slice of the row block that
// owns the row (slices pre-zeroed by the caller, summed by the caller in slice order afterwards).
cudaError_t launch_rows(OpKind op, const RowArgs& args, cudaStream_t stream);

// z[k, r, j] = mu[r, j] + exp(logvar[r, j] / 2) * eps, eps from philox.h's counter layout keyed by
// *args.seed (read on the device); optionally kl[r] and log_q[k, r].
cudaError_t launch_sample_forward(const SampleArgs& args, cudaStream_t stream);

// grad_mu / grad_logvar from grad_z (eps regenerated from the seed), grad_log_q and grad_kl.
cudaError_t launch_sample_backward(const SampleArgs& args, cudaStream_t stream);

// A good RowLayout::n_blocks for a launch_rows backward with accumulate outputs on the current
// device: enough row blocks to fill the GPU (each row block is reduced by one warp or block, rows
// in order), capped so that the partial-sum slices (n_blocks * slice_numel elements, slice_numel
// = the largest block_stride) stay no larger than about the gradient itself. Returns 1 when the
// slices would be as large as the data (then the kernels reduce each target over its broadcast
// dims in one pass, fully parallel over the targets). Depends only on the shapes and the device's
// SM count, never on data. Host only; no launch.
int64_t suggest_n_blocks(int64_t rows, int64_t event_numel, int64_t slice_numel);

}  // namespace vae_fast::cuda
