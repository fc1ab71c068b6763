// CUDA kernels of the residual attention adaptor (docs/design.md §2). No torch
// header: raw pointers in, launch status out (see residual_attention_kernel.h).
// Written for every architecture from sm_53 (Jetson Nano) on: C++14, no atomics
// at all (so no double/half atomicAdd question), warp shuffles in _sync form,
// float accumulation for half storage.
//
// Dual reductions (descriptor pooling, backward reduction): a block owns one
// image and a tile of 32 consecutive positions; its 8 warps take interleaved
// channels, so every load of a warp is one coalesced row segment. Per position
// each thread keeps the cross-channel state in registers; per channel the warp
// sums its 32 values with shuffles and writes one partial row sum per tile. A
// second small kernel adds the partials in a fixed order, so results are
// deterministic (no atomics) and F is read exactly once.
//
// Rank k > 1 (gates [N, k, C] and [N, k, HW]) takes kernels of its own, so that
// k == 1 runs exactly the rank-1 kernels: the elementwise ones sum the k terms
// per element (math::rank_attention), the backward reduction keeps k column sums
// per thread and writes k partial row sums per channel and tile.
#include "../residual_attention_math.h"
#include "residual_attention_kernel.h"
#include "attention_branch_kernel.h"
#include "device_conversions.cuh"
#include "warp_sum.cuh"

namespace da2ext {
namespace cuda {
namespace {

using math::Mode;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kTile = kWarpSize;  // positions per dual-reduction block
constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxElementwiseBlocks = int64_t(1) << 20;  // grid-stride beyond

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    descriptor_pool_kernel(const scalar_t* __restrict__ input, int64_t C, int64_t HW, int64_t tiles,
                           acc_t* __restrict__ row_partial, scalar_t* __restrict__ spatial,
                           int32_t* __restrict__ argmax) {
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t task = blockIdx.x, n = task / tiles;
  const int64_t hw = (task % tiles) * kTile + lane;
  const bool active = hw < HW;
  const int64_t base = n * C * HW + hw;  // an offset only: lanes past HW read nothing

  acc_t sum = 0, max = 0;
  int index = -1;  // -1: this thread saw no channel (C < kWarpsPerBlock)
  // The loop bound depends on the warp only, so all 32 lanes reach every shuffle.
  for (int64_t c = warp; c < C; c += kWarpsPerBlock) {
    const acc_t v = active ? to_acc(input[base + c * HW]) : acc_t(0);
    if (active) {
      sum += v;
      if (index < 0 || math::replaces_running_max(v, max)) {
        max = v;
        index = static_cast<int>(c);
      }
    }
    const acc_t row = warp_sum(v);
    if (lane == 0) {
      row_partial[task * C + c] = row;
    }
  }

  __shared__ acc_t shared_sum[kWarpsPerBlock][kWarpSize];
  __shared__ acc_t shared_max[kWarpsPerBlock][kWarpSize];
  __shared__ int shared_index[kWarpsPerBlock][kWarpSize];
  shared_sum[warp][lane] = sum;
  shared_max[warp][lane] = max;
  shared_index[warp][lane] = index;
  __syncthreads();
  if (warp == 0 && active) {  // warp 0 always saw channel 0
    for (int w = 1; w < kWarpsPerBlock; ++w) {
      sum += shared_sum[w][lane];
      const int other = shared_index[w][lane];
      if (other >= 0 && math::replaces_partial_max(shared_max[w][lane], other, max, index)) {
        max = shared_max[w][lane];
        index = other;
      }
    }
    scalar_t* mean_out = spatial + n * 2 * HW + hw;
    store(mean_out, sum / static_cast<acc_t>(C));
    store(mean_out + HW, max);
    argmax[n * HW + hw] = index;
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    attention_backward_reduce_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                     const acc_t* __restrict__ gate_channel, const acc_t* __restrict__ gate_spatial,
                                     int64_t C, int64_t HW, int64_t tiles, acc_t* __restrict__ row_partial,
                                     acc_t* __restrict__ spatial_sum) {
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t task = blockIdx.x, n = task / tiles;
  const int64_t hw = (task % tiles) * kTile + lane;
  const bool active = hw < HW;
  const int64_t base = n * C * HW + hw;
  const acc_t gs = active ? gate_spatial[n * HW + hw] : acc_t(0);

  acc_t column = 0;
  for (int64_t c = warp; c < C; c += kWarpsPerBlock) {
    acc_t t = 0;
    if (active) {
      const int64_t offset = base + c * HW;
      const acc_t f = mode == Mode::Mul ? to_acc(input[offset]) : acc_t(0);
      t = math::attention_grad_term(mode, to_acc(grad_output[offset]), f);
      column += t * gate_channel[n * C + c];
    }
    const acc_t row = warp_sum(t * gs);
    if (lane == 0) {
      row_partial[task * C + c] = row;
    }
  }

  __shared__ acc_t shared_column[kWarpsPerBlock][kWarpSize];
  shared_column[warp][lane] = column;
  __syncthreads();
  if (warp == 0 && active) {
    for (int w = 1; w < kWarpsPerBlock; ++w) {
      column += shared_column[w][lane];
    }
    spatial_sum[n * HW + hw] = column;
  }
}

// Rank k > 1: the same blocks and the same single read of F; per channel each
// warp sums t*gate_spatial[j] for every term j (one partial row sum per term,
// [j][c] within the task's k*C), and every thread keeps k column sums in
// registers (the loops over the terms are unrolled to kMaxRank and guarded by
// j < k, which is uniform over the block, so every lane reaches every shuffle).
template <Mode mode, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    attention_backward_reduce_rank_kernel(const scalar_t* __restrict__ grad_output,
                                          const scalar_t* __restrict__ input, const acc_t* __restrict__ gate_channel,
                                          const acc_t* __restrict__ gate_spatial, int64_t C, int64_t HW,
                                          int64_t tiles, int k, acc_t* __restrict__ row_partial,
                                          acc_t* __restrict__ spatial_sum) {
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t task = blockIdx.x, n = task / tiles;
  const int64_t hw = (task % tiles) * kTile + lane;
  const bool active = hw < HW;
  const int64_t base = n * C * HW + hw;
  const acc_t* channel_gates = gate_channel + n * k * C;
  acc_t* partial = row_partial + task * k * C;

  acc_t gs[math::kMaxRank], column[math::kMaxRank];
#pragma unroll
  for (int j = 0; j < math::kMaxRank; ++j) {
    gs[j] = (j < k && active) ? gate_spatial[(n * k + j) * HW + hw] : acc_t(0);
    column[j] = 0;
  }
  for (int64_t c = warp; c < C; c += kWarpsPerBlock) {
    acc_t t = 0;
    if (active) {
      const int64_t offset = base + c * HW;
      const acc_t f = mode == Mode::Mul ? to_acc(input[offset]) : acc_t(0);
      t = math::attention_grad_term(mode, to_acc(grad_output[offset]), f);
    }
#pragma unroll
    for (int j = 0; j < math::kMaxRank; ++j) {
      if (j < k) {
        column[j] += t * channel_gates[j * C + c];  // t == 0 on inactive lanes
        const acc_t row = warp_sum(t * gs[j]);
        if (lane == 0) {
          partial[j * C + c] = row;
        }
      }
    }
  }

  __shared__ acc_t shared_column[kWarpsPerBlock][kWarpSize];
#pragma unroll
  for (int j = 0; j < math::kMaxRank; ++j) {
    if (j < k) {
      shared_column[warp][lane] = column[j];
      __syncthreads();
      if (warp == 0 && active) {
        acc_t sum = column[j];
        for (int w = 1; w < kWarpsPerBlock; ++w) {
          sum += shared_column[w][lane];
        }
        spatial_sum[(n * k + j) * HW + hw] = sum;
      }
      __syncthreads();
    }
  }
}

// out[n, c] = sum over tiles of the partial row sums (divided by mean_count when > 0).
template <typename acc_t, typename out_t>
__global__ void sum_row_partials_kernel(const acc_t* __restrict__ partial, int64_t N, int64_t C, int64_t tiles,
                                        int64_t mean_count, out_t* __restrict__ out) {
  const int64_t total = N * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i % C;
    acc_t sum = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      sum += partial[(n * tiles + t) * C + c];
    }
    store(out + i, mean_count > 0 ? sum / static_cast<acc_t>(mean_count) : sum);
  }
}

// Elementwise kernels index with index_t: 32-bit when the tensor allows it
// (cheaper division), 64-bit past 2^31 elements.
template <Mode mode, typename index_t, typename scalar_t, typename acc_t>
__global__ void attention_apply_kernel(const scalar_t* __restrict__ input, const acc_t* __restrict__ gate_channel,
                                       const acc_t* __restrict__ gate_spatial, index_t C, index_t HW, index_t total,
                                       scalar_t* __restrict__ output) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t plane = i / HW, hw = i - plane * HW;
    store(output + i, math::apply_attention(mode, to_acc(input[i]), gate_channel[plane],
                                            gate_spatial[(plane / C) * HW + hw]));
  }
}

template <Mode mode, typename index_t, typename scalar_t, typename acc_t>
__global__ void attention_input_grad_kernel(const scalar_t* __restrict__ grad_output,
                                            const acc_t* __restrict__ gate_channel,
                                            const acc_t* __restrict__ gate_spatial,
                                            const acc_t* __restrict__ grad_channel_mean,
                                            const acc_t* __restrict__ grad_spatial,
                                            const int32_t* __restrict__ argmax, index_t C, index_t HW, index_t total,
                                            acc_t inv_hw, acc_t inv_c, scalar_t* __restrict__ grad_input) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t plane = i / HW, hw = i - plane * HW;
    const index_t n = plane / C, c = plane - n * C;
    const index_t position = n * HW + hw, spatial_offset = 2 * n * HW + hw;
    store(grad_input + i,
          math::input_grad(mode, to_acc(grad_output[i]), gate_channel[plane], gate_spatial[position],
                           grad_channel_mean[plane] * inv_hw, grad_spatial[spatial_offset] * inv_c,
                           static_cast<index_t>(argmax[position]) == c, grad_spatial[spatial_offset + HW]));
  }
}

// Rank k > 1 elementwise kernels: the rank sum of math::rank_attention per element.
template <Mode mode, typename index_t, typename scalar_t, typename acc_t>
__global__ void attention_apply_rank_kernel(const scalar_t* __restrict__ input,
                                            const acc_t* __restrict__ gate_channel,
                                            const acc_t* __restrict__ gate_spatial, index_t C, index_t HW,
                                            index_t total, int k, scalar_t* __restrict__ output) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t plane = i / HW, hw = i - plane * HW;
    const index_t n = plane / C, c = plane - n * C;
    const acc_t attention = math::rank_attention(gate_channel + n * index_t(k) * C + c, C,
                                                 gate_spatial + n * index_t(k) * HW + hw, HW, k);
    store(output + i, math::combine_attention(mode, to_acc(input[i]), attention));
  }
}

template <Mode mode, typename index_t, typename scalar_t, typename acc_t>
__global__ void attention_input_grad_rank_kernel(const scalar_t* __restrict__ grad_output,
                                                 const acc_t* __restrict__ gate_channel,
                                                 const acc_t* __restrict__ gate_spatial,
                                                 const acc_t* __restrict__ grad_channel_mean,
                                                 const acc_t* __restrict__ grad_spatial,
                                                 const int32_t* __restrict__ argmax, index_t C, index_t HW,
                                                 index_t total, int k, acc_t inv_hw, acc_t inv_c,
                                                 scalar_t* __restrict__ grad_input) {
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t plane = i / HW, hw = i - plane * HW;
    const index_t n = plane / C, c = plane - n * C;
    const index_t position = n * HW + hw, spatial_offset = 2 * n * HW + hw;
    // mode Add's direct scale is 1: the gates are not read
    const acc_t attention = mode == Mode::Mul ? math::rank_attention(gate_channel + n * index_t(k) * C + c, C,
                                                                     gate_spatial + n * index_t(k) * HW + hw, HW, k)
                                              : acc_t(0);
    store(grad_input + i,
          math::input_grad_of_attention(mode, to_acc(grad_output[i]), attention, grad_channel_mean[plane] * inv_hw,
                                        grad_spatial[spatial_offset] * inv_c,
                                        static_cast<index_t>(argmax[position]) == c,
                                        grad_spatial[spatial_offset + HW]));
  }
}

int elementwise_blocks(int64_t total) {
  const int64_t blocks = ceil_div(total, kThreadsPerBlock);
  return static_cast<int>(blocks < kMaxElementwiseBlocks ? blocks : kMaxElementwiseBlocks);
}

bool fits_int32(int64_t total) {
  return total <= int64_t(INT32_MAX);
}

template <typename acc_t, typename out_t>
cudaError_t launch_sum_row_partials(const acc_t* partial, int64_t N, int64_t C, int64_t tiles, int64_t mean_count,
                                    out_t* out, cudaStream_t stream) {
  sum_row_partials_kernel<<<elementwise_blocks(N * C), kThreadsPerBlock, 0, stream>>>(partial, N, C, tiles,
                                                                                       mean_count, out);
  return cudaGetLastError();
}

template <Mode mode, typename index_t, typename scalar_t, typename acc_t>
cudaError_t launch_apply(const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial, int64_t total,
                         int64_t C, int64_t HW, scalar_t* output, cudaStream_t stream) {
  attention_apply_kernel<mode, index_t><<<elementwise_blocks(total), kThreadsPerBlock, 0, stream>>>(
      input, gate_channel, gate_spatial, index_t(C), index_t(HW), index_t(total), output);
  return cudaGetLastError();
}

template <Mode mode, typename index_t, typename scalar_t, typename acc_t>
cudaError_t launch_input_grad(const scalar_t* grad_output, const acc_t* gate_channel, const acc_t* gate_spatial,
                              const acc_t* grad_channel_mean, const acc_t* grad_spatial, const int32_t* argmax,
                              int64_t total, int64_t C, int64_t HW, scalar_t* grad_input, cudaStream_t stream) {
  attention_input_grad_kernel<mode, index_t><<<elementwise_blocks(total), kThreadsPerBlock, 0, stream>>>(
      grad_output, gate_channel, gate_spatial, grad_channel_mean, grad_spatial, argmax, index_t(C), index_t(HW),
      index_t(total), acc_t(1) / static_cast<acc_t>(HW), acc_t(1) / static_cast<acc_t>(C), grad_input);
  return cudaGetLastError();
}

template <Mode mode, typename index_t, typename scalar_t, typename acc_t>
cudaError_t launch_apply_rank(const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial,
                              int64_t total, int64_t C, int64_t HW, int k, scalar_t* output, cudaStream_t stream) {
  attention_apply_rank_kernel<mode, index_t><<<elementwise_blocks(total), kThreadsPerBlock, 0, stream>>>(
      input, gate_channel, gate_spatial, index_t(C), index_t(HW), index_t(total), k, output);
  return cudaGetLastError();
}

template <Mode mode, typename index_t, typename scalar_t, typename acc_t>
cudaError_t launch_input_grad_rank(const scalar_t* grad_output, const acc_t* gate_channel, const acc_t* gate_spatial,
                                   const acc_t* grad_channel_mean, const acc_t* grad_spatial, const int32_t* argmax,
                                   int64_t total, int64_t C, int64_t HW, int k, scalar_t* grad_input,
                                   cudaStream_t stream) {
  attention_input_grad_rank_kernel<mode, index_t><<<elementwise_blocks(total), kThreadsPerBlock, 0, stream>>>(
      grad_output, gate_channel, gate_spatial, grad_channel_mean, grad_spatial, argmax, index_t(C), index_t(HW),
      index_t(total), k, acc_t(1) / static_cast<acc_t>(HW), acc_t(1) / static_cast<acc_t>(C), grad_input);
  return cudaGetLastError();
}

// 32-bit indices need the gates' offsets (N*k*C, N*k*HW) to fit as well as F's.
bool rank_fits_int32(int64_t total, int64_t N, int64_t C, int64_t HW, int k) {
  return fits_int32(total) && fits_int32(N * k * C) && fits_int32(N * k * HW);
}

const dim3 kDualReductionBlock(kWarpSize, kWarpsPerBlock);

}  // namespace

int64_t row_partial_count(int64_t N, int64_t C, int64_t HW) {
  return N * ceil_div(HW, kTile) * C;
}

int64_t dual_reduction_tiles(int64_t HW) {
  return ceil_div(HW, kTile);
}

template <typename scalar_t, typename acc_t>
cudaError_t descriptor_pool_partials(const scalar_t* input, int64_t N, int64_t C, int64_t HW, scalar_t* spatial,
                                     int32_t* argmax, acc_t* row_partial, cudaStream_t stream) {
  if (N == 0 || C == 0 || HW == 0) {  // nothing to do (and no empty grid to launch)
    return cudaSuccess;
  }
  const int64_t tiles = ceil_div(HW, kTile);
  if (N * tiles > int64_t(INT32_MAX)) {
    return cudaErrorInvalidConfiguration;
  }
  descriptor_pool_kernel<<<static_cast<unsigned>(N * tiles), kDualReductionBlock, 0, stream>>>(
      input, C, HW, tiles, row_partial, spatial, argmax);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t descriptor_pool(const scalar_t* input, int64_t N, int64_t C, int64_t HW, scalar_t* channel_mean,
                            scalar_t* spatial, int32_t* argmax, acc_t* row_partial, cudaStream_t stream) {
  const cudaError_t status = descriptor_pool_partials(input, N, C, HW, spatial, argmax, row_partial, stream);
  if (status != cudaSuccess || N == 0 || C == 0 || HW == 0) {
    return status;
  }
  return launch_sum_row_partials(row_partial, N, C, ceil_div(HW, kTile), HW, channel_mean, stream);
}

template <typename scalar_t, typename acc_t>
cudaError_t attention_apply(const scalar_t* input, const acc_t* gate_channel, const acc_t* gate_spatial, int64_t N,
                            int64_t C, int64_t HW, int rank, bool multiplicative, scalar_t* output,
                            cudaStream_t stream) {
  const int64_t total = N * C * HW;
  if (total == 0) {
    return cudaSuccess;
  }
  if (rank > 1) {
    if (rank_fits_int32(total, N, C, HW, rank)) {
      return multiplicative ? launch_apply_rank<Mode::Mul, uint32_t>(input, gate_channel, gate_spatial, total, C, HW,
                                                                     rank, output, stream)
                            : launch_apply_rank<Mode::Add, uint32_t>(input, gate_channel, gate_spatial, total, C, HW,
                                                                     rank, output, stream);
    }
    return multiplicative ? launch_apply_rank<Mode::Mul, int64_t>(input, gate_channel, gate_spatial, total, C, HW,
                                                                  rank, output, stream)
                          : launch_apply_rank<Mode::Add, int64_t>(input, gate_channel, gate_spatial, total, C, HW,
                                                                  rank, output, stream);
  }
  if (fits_int32(total)) {
    return multiplicative
               ? launch_apply<Mode::Mul, uint32_t>(input, gate_channel, gate_spatial, total, C, HW, output, stream)
               : launch_apply<Mode::Add, uint32_t>(input, gate_channel, gate_spatial, total, C, HW, output, stream);
  }
  return multiplicative
             ? launch_apply<Mode::Mul, int64_t>(input, gate_channel, gate_spatial, total, C, HW, output, stream)
             : launch_apply<Mode::Add, int64_t>(input, gate_channel, gate_spatial, total, C, HW, output, stream);
}

template <typename scalar_t, typename acc_t>
cudaError_t attention_backward_reduce_partials(const scalar_t* grad_output, const scalar_t* input,
                                               const acc_t* gate_channel, const acc_t* gate_spatial, int64_t N,
                                               int64_t C, int64_t HW, int rank, bool multiplicative,
                                               acc_t* spatial_sum, acc_t* row_partial, cudaStream_t stream) {
  if (N == 0 || C == 0 || HW == 0) {  // nothing to do (and no empty grid to launch)
    return cudaSuccess;
  }
  const int64_t tiles = ceil_div(HW, kTile);
  if (N * tiles > int64_t(INT32_MAX)) {
    return cudaErrorInvalidConfiguration;
  }
  const unsigned blocks = static_cast<unsigned>(N * tiles);
  if (rank > 1) {
    if (multiplicative) {
      attention_backward_reduce_rank_kernel<Mode::Mul><<<blocks, kDualReductionBlock, 0, stream>>>(
          grad_output, input, gate_channel, gate_spatial, C, HW, tiles, rank, row_partial, spatial_sum);
    } else {
      attention_backward_reduce_rank_kernel<Mode::Add><<<blocks, kDualReductionBlock, 0, stream>>>(
          grad_output, input, gate_channel, gate_spatial, C, HW, tiles, rank, row_partial, spatial_sum);
    }
  } else if (multiplicative) {
    attention_backward_reduce_kernel<Mode::Mul><<<blocks, kDualReductionBlock, 0, stream>>>(
        grad_output, input, gate_channel, gate_spatial, C, HW, tiles, row_partial, spatial_sum);
  } else {
    attention_backward_reduce_kernel<Mode::Add><<<blocks, kDualReductionBlock, 0, stream>>>(
        grad_output, input, gate_channel, gate_spatial, C, HW, tiles, row_partial, spatial_sum);
  }
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t attention_backward_reduce(const scalar_t* grad_output, const scalar_t* input, const acc_t* gate_channel,
                                      const acc_t* gate_spatial, int64_t N, int64_t C, int64_t HW, int rank,
                                      bool multiplicative, acc_t* channel_sum, acc_t* spatial_sum,
                                      acc_t* row_partial, cudaStream_t stream) {
  const cudaError_t status = attention_backward_reduce_partials(grad_output, input, gate_channel, gate_spatial, N, C,
                                                                HW, rank, multiplicative, spatial_sum, row_partial,
                                                                stream);
  if (status != cudaSuccess || N == 0 || C == 0 || HW == 0) {
    return status;
  }
  return launch_sum_row_partials(row_partial, N, int64_t(rank) * C, ceil_div(HW, kTile), /*mean_count=*/int64_t(0),
                                 channel_sum, stream);
}

template <typename scalar_t, typename acc_t>
cudaError_t attention_input_grad(const scalar_t* grad_output, const acc_t* gate_channel, const acc_t* gate_spatial,
                                 const acc_t* grad_channel_mean, const acc_t* grad_spatial, const int32_t* argmax,
                                 int64_t N, int64_t C, int64_t HW, int rank, bool multiplicative,
                                 scalar_t* grad_input, cudaStream_t stream) {
  const int64_t total = N * C * HW;
  if (total == 0) {
    return cudaSuccess;
  }
  if (rank > 1) {
    if (rank_fits_int32(total, N, C, HW, rank)) {
      return multiplicative ? launch_input_grad_rank<Mode::Mul, uint32_t>(grad_output, gate_channel, gate_spatial,
                                                                          grad_channel_mean, grad_spatial, argmax,
                                                                          total, C, HW, rank, grad_input, stream)
                            : launch_input_grad_rank<Mode::Add, uint32_t>(grad_output, gate_channel, gate_spatial,
                                                                          grad_channel_mean, grad_spatial, argmax,
                                                                          total, C, HW, rank, grad_input, stream);
    }
    return multiplicative ? launch_input_grad_rank<Mode::Mul, int64_t>(grad_output, gate_channel, gate_spatial,
                                                                       grad_channel_mean, grad_spatial, argmax,
                                                                       total, C, HW, rank, grad_input, stream)
                          : launch_input_grad_rank<Mode::Add, int64_t>(grad_output, gate_channel, gate_spatial,
                                                                       grad_channel_mean, grad_spatial, argmax,
                                                                       total, C, HW, rank, grad_input, stream);
  }
  if (fits_int32(total)) {
    return multiplicative ? launch_input_grad<Mode::Mul, uint32_t>(grad_output, gate_channel, gate_spatial,
                                                                   grad_channel_mean, grad_spatial, argmax, total, C,
                                                                   HW, grad_input, stream)
                          : launch_input_grad<Mode::Add, uint32_t>(grad_output, gate_channel, gate_spatial,
                                                                   grad_channel_mean, grad_spatial, argmax, total, C,
                                                                   HW, grad_input, stream);
  }
  return multiplicative ? launch_input_grad<Mode::Mul, int64_t>(grad_output, gate_channel, gate_spatial,
                                                                grad_channel_mean, grad_spatial, argmax, total, C, HW,
                                                                grad_input, stream)
                        : launch_input_grad<Mode::Add, int64_t>(grad_output, gate_channel, gate_spatial,
                                                                grad_channel_mean, grad_spatial, argmax, total, C, HW,
                                                                grad_input, stream);
}

#define DA2EXT_INSTANTIATE(scalar_t, acc_t)                                                                        \
  template cudaError_t descriptor_pool<scalar_t, acc_t>(const scalar_t*, int64_t, int64_t, int64_t, scalar_t*,    \
                                                        scalar_t*, int32_t*, acc_t*, cudaStream_t);               \
  template cudaError_t attention_apply<scalar_t, acc_t>(const scalar_t*, const acc_t*, const acc_t*, int64_t,     \
                                                        int64_t, int64_t, int, bool, scalar_t*, cudaStream_t);    \
  template cudaError_t attention_backward_reduce<scalar_t, acc_t>(                                                \
      const scalar_t*, const scalar_t*, const acc_t*, const acc_t*, int64_t, int64_t, int64_t, int, bool, acc_t*, \
      acc_t*, acc_t*, cudaStream_t);                                                                              \
  template cudaError_t attention_input_grad<scalar_t, acc_t>(                                                     \
      const scalar_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*, const int32_t*, int64_t, int64_t,  \
      int64_t, int, bool, scalar_t*, cudaStream_t);                                                               \
  template cudaError_t descriptor_pool_partials<scalar_t, acc_t>(const scalar_t*, int64_t, int64_t, int64_t,      \
                                                                 scalar_t*, int32_t*, acc_t*, cudaStream_t);      \
  template cudaError_t attention_backward_reduce_partials<scalar_t, acc_t>(                                       \
      const scalar_t*, const scalar_t*, const acc_t*, const acc_t*, int64_t, int64_t, int64_t, int, bool, acc_t*, \
      acc_t*, cudaStream_t);

DA2EXT_INSTANTIATE(float, float)
DA2EXT_INSTANTIATE(double, double)
DA2EXT_INSTANTIATE(__half, float)

#undef DA2EXT_INSTANTIATE

}  // namespace cuda
}  // namespace da2ext
