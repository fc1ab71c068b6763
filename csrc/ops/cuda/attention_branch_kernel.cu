// CUDA kernels of the adaptor's small branch: the channel MLP, the 2 -> k spatial
// conv, the gates and their backward (attention_branch_kernel.h says how they tile
// and which launches make an adaptor). No torch header; C++14; sm_53 and later; no
// atomics (every sum has one owner and a fixed order).
//
// The arithmetic is the op-by-op path's (ops/residual_attention.py, whose small
// branch is ATen ops): what forward keeps (channel_mean, hidden_pre, channel_logits)
// is rounded to the map's dtype and read back rounded, as ATen's float16 addmm and
// conv outputs are; the gates and every gradient are in the accumulation type, the
// parameters' gradients stored in their own dtype at the end.
#include "../residual_attention_math.h"
#include "attention_branch_kernel.h"
#include "device_conversions.cuh"
#include "warp_sum.cuh"

namespace da2ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxSpatialTiles = 1024;    // blocks per image for the spatial conv, striding beyond
constexpr int64_t kMaxSharedBytes = 48 * 1024;  // a block's shared memory on every architecture (sm_53 included)
constexpr int64_t kMaxSumBlocks = int64_t(1) << 16;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int64_t spatial_tiles(int64_t HW) {
  const int64_t tiles = ceil_div(HW, kThreads);
  return tiles < kMaxSpatialTiles ? tiles : kMaxSpatialTiles;
}

// A value as the map's dtype holds it: the op-by-op path's ATen ops store their
// outputs (the conv's logits, the hidden layer, the channel logits) in that dtype
// before the next op reads them.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rounded(acc_t v) {
  scalar_t stored;
  store(&stored, v);
  return to_acc(stored);
}

// Stores v at `out` in the map's dtype (kept for backward) and returns it as stored.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t store_rounded(scalar_t* out, acc_t v) {
  store(out, v);
  return to_acc(*out);
}

// The spatial conv's logit for rank term r at (y, x) of image n's two descriptor maps
// ([2, H, W] at `maps`): bias + the K x K taps of both maps, zero outside the map.
template <typename scalar_t, typename acc_t>
__device__ acc_t spatial_logit(const scalar_t* __restrict__ maps, const scalar_t* __restrict__ weight,
                               const scalar_t* __restrict__ bias, int64_t r, int64_t y, int64_t x, int64_t H,
                               int64_t W, int64_t K) {
  const int64_t pad = K / 2, HW = H * W;
  acc_t sum = to_acc(bias[r]);
  for (int64_t i = 0; i < 2; ++i) {
    const scalar_t* map = maps + i * HW;
    const scalar_t* taps = weight + (r * 2 + i) * K * K;
    for (int64_t dy = 0; dy < K; ++dy) {
      const int64_t yy = y + dy - pad;
      if (yy < 0 || yy >= H) {
        continue;
      }
      for (int64_t dx = 0; dx < K; ++dx) {
        const int64_t xx = x + dx - pad;
        if (xx >= 0 && xx < W) {
          sum += to_acc(taps[dy * K + dx]) * to_acc(map[yy * W + xx]);
        }
      }
    }
  }
  return sum;
}

// dL/d(spatial logit) of rank term r at position q of image n: sigmoid'(a_s) * spatial_sum.
template <typename acc_t>
__device__ __forceinline__ acc_t spatial_logit_grad(const acc_t* __restrict__ gate_spatial,
                                                    const acc_t* __restrict__ spatial_sum, int64_t offset) {
  return math::sigmoid_grad_from_output(gate_spatial[offset]) * spatial_sum[offset];
}

struct GatesArgs {
  BranchShape s;
  int64_t tiles;  // the dual reduction's, of mean_partial
};

// Block (n, 0): image n's channel gates (forward: from the pool's partial sums through the
// MLP; backward, where kept_logits is given: from the logits forward kept). Blocks (n, 1..):
// the spatial gates of image n.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    branch_gates_kernel(GatesArgs a, const acc_t* __restrict__ mean_partial, const scalar_t* __restrict__ spatial,
                        const scalar_t* __restrict__ fc1_weight, const scalar_t* __restrict__ fc1_bias,
                        const scalar_t* __restrict__ fc2_weight, const scalar_t* __restrict__ fc2_bias,
                        const scalar_t* __restrict__ spatial_weight, const scalar_t* __restrict__ spatial_bias,
                        const scalar_t* __restrict__ gamma, scalar_t* __restrict__ channel_mean,
                        const scalar_t* __restrict__ kept_logits, scalar_t* __restrict__ hidden_pre,
                        scalar_t* __restrict__ channel_logits,
                        acc_t* __restrict__ gate_channel, acc_t* __restrict__ gate_spatial) {
  const BranchShape& s = a.s;
  const int64_t n = blockIdx.x, HW = s.HW(), rows = s.rows();
  if (blockIdx.y > 0) {
    const int64_t stride = int64_t(gridDim.y - 1) * kThreads;
    for (int64_t p = int64_t(blockIdx.y - 1) * kThreads + threadIdx.x; p < HW; p += stride) {
      const int64_t y = p / s.W, x = p % s.W;
      for (int64_t r = 0; r < s.rank; ++r) {
        const acc_t logit = rounded<scalar_t>(
            spatial_logit<scalar_t, acc_t>(spatial + n * 2 * HW, spatial_weight, spatial_bias, r, y, x, s.H, s.W, s.K));
        gate_spatial[(n * s.rank + r) * HW + p] = math::sigmoid(logit);
      }
    }
    return;
  }
  if (kept_logits != nullptr) {  // backward
    for (int64_t o = threadIdx.x; o < rows; o += kThreads) {
      gate_channel[n * rows + o] = to_acc(gamma[o]) * math::sigmoid(to_acc(kept_logits[n * rows + o]));
    }
    return;
  }
  extern __shared__ __align__(8) unsigned char shared_bytes[];
  acc_t* hidden = reinterpret_cast<acc_t*>(shared_bytes);  // relu(hidden_pre) of image n
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // The descriptor mean, in sum_row_partials' order (the op-by-op path's bits).
  for (int64_t c = threadIdx.x; c < s.C; c += kThreads) {
    acc_t sum = 0;
    for (int64_t t = 0; t < a.tiles; ++t) {
      sum += mean_partial[(n * a.tiles + t) * s.C + c];
    }
    store(channel_mean + n * s.C + c, sum / static_cast<acc_t>(HW));
  }
  __syncthreads();  // channel_mean is read by every warp below
  const scalar_t* mean = channel_mean + n * s.C;
  // The loop bounds depend on the warp only, so all 32 lanes reach every shuffle.
  for (int64_t j = warp; j < s.hidden; j += kWarps) {
    acc_t partial = 0;
    for (int64_t c = lane; c < s.C; c += 32) {
      partial += to_acc(fc1_weight[j * s.C + c]) * to_acc(mean[c]);
    }
    partial = warp_sum(partial);
    if (lane == 0) {
      const acc_t pre = store_rounded(hidden_pre + n * s.hidden + j, partial + to_acc(fc1_bias[j]));
      hidden[j] = pre > acc_t(0) ? pre : acc_t(0);
    }
  }
  __syncthreads();
  for (int64_t o = warp; o < rows; o += kWarps) {
    acc_t partial = 0;
    for (int64_t j = lane; j < s.hidden; j += 32) {
      partial += to_acc(fc2_weight[o * s.hidden + j]) * hidden[j];
    }
    partial = warp_sum(partial);
    if (lane == 0) {
      const acc_t logit = store_rounded(channel_logits + n * rows + o, partial + to_acc(fc2_bias[o]));
      gate_channel[n * rows + o] = to_acc(gamma[o]) * math::sigmoid(logit);
    }
  }
}

// Block (n, 0): image n's channel sums, the logits' and the hidden layer's gradients and
// grad_channel_mean. Blocks (n, 1..): grad_spatial of image n (the conv's transpose over
// the logits' gradients, formed on the fly from the gates and the spatial sums).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    branch_backward_kernel(GatesArgs a, const acc_t* __restrict__ sum_partial, const acc_t* __restrict__ spatial_sum,
                           const acc_t* __restrict__ gate_spatial, const scalar_t* __restrict__ channel_logits,
                           const scalar_t* __restrict__ hidden_pre, const scalar_t* __restrict__ fc1_weight,
                           const scalar_t* __restrict__ fc2_weight, const scalar_t* __restrict__ spatial_weight,
                           const scalar_t* __restrict__ gamma, acc_t* __restrict__ channel_sum,
                           acc_t* __restrict__ grad_channel_logits, acc_t* __restrict__ grad_hidden,
                           acc_t* __restrict__ grad_channel_mean, acc_t* __restrict__ grad_spatial) {
  const BranchShape& s = a.s;
  const int64_t n = blockIdx.x, HW = s.HW(), rows = s.rows(), K = s.K, pad = K / 2;
  if (blockIdx.y > 0) {
    const int64_t stride = int64_t(gridDim.y - 1) * kThreads;
    for (int64_t p = int64_t(blockIdx.y - 1) * kThreads + threadIdx.x; p < HW; p += stride) {
      const int64_t y = p / s.W, x = p % s.W;
      for (int64_t i = 0; i < 2; ++i) {
        acc_t sum = 0;
        for (int64_t r = 0; r < s.rank; ++r) {
          const scalar_t* taps = spatial_weight + (r * 2 + i) * K * K;
          const int64_t base = (n * s.rank + r) * HW;
          for (int64_t dy = 0; dy < K; ++dy) {
            const int64_t yo = y - dy + pad;  // the output position whose tap dy reads row y
            if (yo < 0 || yo >= s.H) {
              continue;
            }
            for (int64_t dx = 0; dx < K; ++dx) {
              const int64_t xo = x - dx + pad;
              if (xo >= 0 && xo < s.W) {
                sum += to_acc(taps[dy * K + dx]) * spatial_logit_grad(gate_spatial, spatial_sum, base + yo * s.W + xo);
              }
            }
          }
        }
        grad_spatial[(n * 2 + i) * HW + p] = sum;
      }
    }
    return;
  }
  extern __shared__ __align__(8) unsigned char shared_bytes[];
  acc_t* hidden_grad = reinterpret_cast<acc_t*>(shared_bytes);  // dL/d(hidden_pre) of image n
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t o = threadIdx.x; o < rows; o += kThreads) {
    acc_t sum = 0;
    for (int64_t t = 0; t < a.tiles; ++t) {
      sum += sum_partial[(n * a.tiles + t) * rows + o];
    }
    channel_sum[n * rows + o] = sum;
    const acc_t sigmoid = math::sigmoid(to_acc(channel_logits[n * rows + o]));
    grad_channel_logits[n * rows + o] = to_acc(gamma[o]) * sigmoid * (acc_t(1) - sigmoid) * sum;
  }
  __syncthreads();  // the logits' gradients are read by every warp below
  const acc_t* logit_grad = grad_channel_logits + n * rows;
  for (int64_t j = warp; j < s.hidden; j += kWarps) {
    acc_t partial = 0;
    for (int64_t o = lane; o < rows; o += 32) {
      partial += to_acc(fc2_weight[o * s.hidden + j]) * logit_grad[o];
    }
    partial = warp_sum(partial);
    if (lane == 0) {
      // relu' = 1 where the pre-activation is positive, as autograd's relu backward
      const acc_t g = to_acc(hidden_pre[n * s.hidden + j]) > acc_t(0) ? partial : acc_t(0);
      hidden_grad[j] = g;
      grad_hidden[n * s.hidden + j] = g;
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < s.C; c += kThreads) {
    acc_t sum = 0;
    for (int64_t j = 0; j < s.hidden; ++j) {
      sum += to_acc(fc1_weight[j * s.C + c]) * hidden_grad[j];
    }
    grad_channel_mean[n * s.C + c] = sum;
  }
}

// The parameters' gradients. Blocks [0, sum_blocks): a thread per element of fc2's
// weight and bias, fc1's weight and bias and gamma, summing over the images in order.
// Then a block per element of the conv's weight and bias, its threads over positions
// (image by image), added in one fixed tree.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    branch_parameter_grads_kernel(BranchShape s, int64_t sum_blocks, const acc_t* __restrict__ channel_sum,
                                  const acc_t* __restrict__ grad_channel_logits,
                                  const acc_t* __restrict__ grad_hidden, const acc_t* __restrict__ spatial_sum,
                                  const acc_t* __restrict__ gate_spatial, const scalar_t* __restrict__ channel_mean,
                                  const scalar_t* __restrict__ spatial, const scalar_t* __restrict__ hidden_pre,
                                  const scalar_t* __restrict__ channel_logits, scalar_t* __restrict__ grad_fc1_weight,
                                  scalar_t* __restrict__ grad_fc1_bias, scalar_t* __restrict__ grad_fc2_weight,
                                  scalar_t* __restrict__ grad_fc2_bias, scalar_t* __restrict__ grad_spatial_weight,
                                  scalar_t* __restrict__ grad_spatial_bias, scalar_t* __restrict__ grad_gamma) {
  const int64_t N = s.N, C = s.C, hid = s.hidden, rows = s.rows(), HW = s.HW(), K = s.K;
  if (int64_t(blockIdx.x) < sum_blocks) {
    const int64_t fc2_w = rows * hid, fc1_w = hid * C;
    const int64_t total = fc2_w + rows + fc1_w + hid + rows;
    for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += sum_blocks * kThreads) {
      acc_t sum = 0;
      if (e < fc2_w) {
        const int64_t o = e / hid, j = e % hid;
        for (int64_t n = 0; n < N; ++n) {
          const acc_t h = to_acc(hidden_pre[n * hid + j]);
          sum += grad_channel_logits[n * rows + o] * (h > acc_t(0) ? h : acc_t(0));
        }
        store(grad_fc2_weight + e, sum);
      } else if (e < fc2_w + rows) {
        const int64_t o = e - fc2_w;
        for (int64_t n = 0; n < N; ++n) {
          sum += grad_channel_logits[n * rows + o];
        }
        store(grad_fc2_bias + o, sum);
      } else if (e < fc2_w + rows + fc1_w) {
        const int64_t f = e - fc2_w - rows, j = f / C, c = f % C;
        for (int64_t n = 0; n < N; ++n) {
          sum += grad_hidden[n * hid + j] * to_acc(channel_mean[n * C + c]);
        }
        store(grad_fc1_weight + f, sum);
      } else if (e < fc2_w + rows + fc1_w + hid) {
        const int64_t j = e - fc2_w - rows - fc1_w;
        for (int64_t n = 0; n < N; ++n) {
          sum += grad_hidden[n * hid + j];
        }
        store(grad_fc1_bias + j, sum);
      } else {
        const int64_t o = e - fc2_w - rows - fc1_w - hid;
        for (int64_t n = 0; n < N; ++n) {
          sum += math::sigmoid(to_acc(channel_logits[n * rows + o])) * channel_sum[n * rows + o];
        }
        store(grad_gamma + o, sum);
      }
    }
    return;
  }
  // One element of the conv's weight [k, 2, K, K] (jobs [0, k*2*K*K)) or bias [k].
  const int64_t job = int64_t(blockIdx.x) - sum_blocks, weights = s.rank * 2 * K * K;
  const bool is_bias = job >= weights;
  const int64_t r = is_bias ? job - weights : job / (2 * K * K);
  const int64_t i = (job / (K * K)) % 2, dy = (job / K) % K - K / 2, dx = job % K - K / 2;
  acc_t sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t base = (n * s.rank + r) * HW;
    const scalar_t* map = spatial + (n * 2 + i) * HW;
    acc_t image = 0;
    for (int64_t p = threadIdx.x; p < HW; p += kThreads) {
      const acc_t g = spatial_logit_grad(gate_spatial, spatial_sum, base + p);
      if (is_bias) {
        image += g;
      } else {
        const int64_t yy = p / s.W + dy, xx = p % s.W + dx;
        if (yy >= 0 && yy < s.H && xx >= 0 && xx < s.W) {
          image += g * to_acc(map[yy * s.W + xx]);
        }
      }
    }
    sum += image;
  }
  __shared__ acc_t partial[kThreads];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (int(threadIdx.x) < width) {
      partial[threadIdx.x] += partial[threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    store(is_bias ? grad_spatial_bias + r : grad_spatial_weight + job, partial[0]);
  }
}

dim3 per_image_grid(const BranchShape& s) {
  return dim3(static_cast<unsigned>(s.N), static_cast<unsigned>(1 + spatial_tiles(s.HW())));
}

// Whether to launch a per-image kernel with `shared_bytes` of shared memory a block: not for
// no image (*status success), nor where the grid or the shared memory does not fit (*status an error).
bool per_image_launch(const BranchShape& s, int64_t shared_bytes, cudaError_t* status) {
  *status = cudaSuccess;
  if (s.N == 0) {
    return false;
  }
  if (s.N > int64_t(INT32_MAX) || shared_bytes > kMaxSharedBytes) {
    *status = cudaErrorInvalidConfiguration;
    return false;
  }
  return true;
}

}  // namespace

int64_t branch_max_hidden(bool double_accumulation) {
  return kMaxSharedBytes / (double_accumulation ? 8 : 4);
}

template <typename scalar_t, typename acc_t>
cudaError_t attention_branch_forward(const BranchShape& s, const acc_t* mean_partial, const scalar_t* spatial,
                                     const scalar_t* fc1_weight, const scalar_t* fc1_bias,
                                     const scalar_t* fc2_weight, const scalar_t* fc2_bias,
                                     const scalar_t* spatial_weight, const scalar_t* spatial_bias,
                                     const scalar_t* gamma, scalar_t* channel_mean, scalar_t* hidden_pre,
                                     scalar_t* channel_logits, acc_t* gate_channel, acc_t* gate_spatial,
                                     cudaStream_t stream) {
  cudaError_t status;
  if (!per_image_launch(s, s.hidden * int64_t(sizeof(acc_t)), &status)) {
    return status;
  }
  const GatesArgs args{s, dual_reduction_tiles(s.HW())};
  branch_gates_kernel<scalar_t, acc_t><<<per_image_grid(s), kThreads, s.hidden * sizeof(acc_t), stream>>>(
      args, mean_partial, spatial, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight, spatial_bias, gamma,
      channel_mean, nullptr, hidden_pre, channel_logits, gate_channel, gate_spatial);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t attention_branch_gates(const BranchShape& s, const scalar_t* channel_logits, const scalar_t* spatial,
                                   const scalar_t* spatial_weight, const scalar_t* spatial_bias,
                                   const scalar_t* gamma, acc_t* gate_channel, acc_t* gate_spatial,
                                   cudaStream_t stream) {
  cudaError_t status;
  if (!per_image_launch(s, 0, &status)) {
    return status;
  }
  const GatesArgs args{s, 0};
  branch_gates_kernel<scalar_t, acc_t><<<per_image_grid(s), kThreads, 0, stream>>>(
      args, nullptr, spatial, nullptr, nullptr, nullptr, nullptr, spatial_weight, spatial_bias, gamma, nullptr,
      channel_logits, nullptr, nullptr, gate_channel, gate_spatial);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t attention_branch_backward(const BranchShape& s, const acc_t* sum_partial, const acc_t* spatial_sum,
                                      const acc_t* gate_spatial, const scalar_t* channel_logits,
                                      const scalar_t* hidden_pre, const scalar_t* fc1_weight,
                                      const scalar_t* fc2_weight, const scalar_t* spatial_weight,
                                      const scalar_t* gamma, acc_t* channel_sum, acc_t* grad_channel_logits,
                                      acc_t* grad_hidden, acc_t* grad_channel_mean, acc_t* grad_spatial,
                                      cudaStream_t stream) {
  cudaError_t status;
  if (!per_image_launch(s, s.hidden * int64_t(sizeof(acc_t)), &status)) {
    return status;
  }
  const GatesArgs args{s, dual_reduction_tiles(s.HW())};
  branch_backward_kernel<scalar_t, acc_t><<<per_image_grid(s), kThreads, s.hidden * sizeof(acc_t), stream>>>(
      args, sum_partial, spatial_sum, gate_spatial, channel_logits, hidden_pre, fc1_weight, fc2_weight,
      spatial_weight, gamma, channel_sum, grad_channel_logits, grad_hidden, grad_channel_mean, grad_spatial);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t attention_branch_parameter_grads(const BranchShape& s, const acc_t* channel_sum,
                                             const acc_t* grad_channel_logits, const acc_t* grad_hidden,
                                             const acc_t* spatial_sum, const acc_t* gate_spatial,
                                             const scalar_t* channel_mean, const scalar_t* spatial,
                                             const scalar_t* hidden_pre, const scalar_t* channel_logits,
                                             scalar_t* grad_fc1_weight, scalar_t* grad_fc1_bias,
                                             scalar_t* grad_fc2_weight, scalar_t* grad_fc2_bias,
                                             scalar_t* grad_spatial_weight, scalar_t* grad_spatial_bias,
                                             scalar_t* grad_gamma, cudaStream_t stream) {
  const int64_t rows = s.rows();
  const int64_t elements = rows * s.hidden + rows + s.hidden * s.C + s.hidden + rows;
  const int64_t sum_blocks_wanted = ceil_div(elements, kThreads);
  const int64_t sum_blocks = sum_blocks_wanted < kMaxSumBlocks ? sum_blocks_wanted : kMaxSumBlocks;
  const int64_t conv_blocks = s.rank * 2 * s.K * s.K + s.rank;
  // With no image every sum is empty: the kernel writes zeros.
  branch_parameter_grads_kernel<scalar_t, acc_t><<<static_cast<unsigned>(sum_blocks + conv_blocks), kThreads, 0,
                                                   stream>>>(
      s, sum_blocks, channel_sum, grad_channel_logits, grad_hidden, spatial_sum, gate_spatial, channel_mean, spatial,
      hidden_pre, channel_logits, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias,
      grad_spatial_weight, grad_spatial_bias, grad_gamma);
  return cudaGetLastError();
}

#define DA2EXT_INSTANTIATE_BRANCH(scalar_t, acc_t)                                                                  \
  template cudaError_t attention_branch_forward<scalar_t, acc_t>(                                                 \
      const BranchShape&, const acc_t*, const scalar_t*, const scalar_t*, const scalar_t*, const scalar_t*,       \
      const scalar_t*, const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, scalar_t*, scalar_t*, acc_t*, \
      acc_t*, cudaStream_t);                                                                                      \
  template cudaError_t attention_branch_gates<scalar_t, acc_t>(const BranchShape&, const scalar_t*,                \
                                                               const scalar_t*, const scalar_t*, const scalar_t*,  \
                                                               const scalar_t*, acc_t*, acc_t*, cudaStream_t);     \
  template cudaError_t attention_branch_backward<scalar_t, acc_t>(                                                \
      const BranchShape&, const acc_t*, const acc_t*, const acc_t*, const scalar_t*, const scalar_t*,             \
      const scalar_t*, const scalar_t*, const scalar_t*, const scalar_t*, acc_t*, acc_t*, acc_t*, acc_t*, acc_t*, \
      cudaStream_t);                                                                                              \
  template cudaError_t attention_branch_parameter_grads<scalar_t, acc_t>(                                         \
      const BranchShape&, const acc_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*, const scalar_t*,  \
      const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, scalar_t*, scalar_t*, scalar_t*, scalar_t*,   \
      scalar_t*, scalar_t*, cudaStream_t);

DA2EXT_INSTANTIATE_BRANCH(float, float)
DA2EXT_INSTANTIATE_BRANCH(double, double)
DA2EXT_INSTANTIATE_BRANCH(__half, float)

#undef DA2EXT_INSTANTIATE_BRANCH

}  // namespace cuda
}  // namespace da2ext
