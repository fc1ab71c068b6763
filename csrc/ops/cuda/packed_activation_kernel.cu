// CUDA kernels of the packed activation (docs/design.md §3). No torch header: raw
// pointers in, launch status out (see packed_activation_kernel.h). C++14, for
// every architecture from sm_53 on: no atomics, warp votes in _sync form,
// float arithmetic for half storage.
//
// Forward: a warp owns one 32-element mask word per step (grid-stride over
// words): lane j loads element 32*word + j (one coalesced load), writes its
// output, and the warp packs the 32 gradient bits with __ballot_sync; lane 0
// writes the word. In the last, partial word the lanes past the end load
// nothing and vote 0, but still take part in the ballot (the loop bound depends
// on the warp only, so all 32 lanes reach it together). Backward: one thread per
// element, reading its word (the 32 threads of a warp read the same word, one
// transaction). Indices are 64-bit. The forward also runs in place (output ==
// input, packed_activation_): each thread stores only the element it loaded, so
// the two pointers carry no __restrict__.
#include <limits>

#include "../packed_activation_math.h"
#include "packed_activation_kernel.h"
#include "device_conversions.cuh"

namespace da2ext {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreadsPerBlock = 256;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond

static_assert(kWarpSize == math::kPackedBits, "one warp packs one mask word");

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int grid_size(int64_t blocks) {
  return static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}


template <bool bounded, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    packed_activation_kernel(const scalar_t* input, int64_t numel, int64_t words, acc_t upper, scalar_t* output,
                             uint32_t* __restrict__ mask) {
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t first_warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / kWarpSize);
  // `word` is the same for all lanes of a warp: every lane reaches every ballot.
  for (int64_t word = first_warp; word < words; word += warps) {
    const int64_t i = word * kWarpSize + lane;
    const bool in_range = i < numel;
    bool bit = false;
    if (in_range) {
      const acc_t v = to_acc(input[i]);
      store(output + i, math::clamp_activation(v, upper));
      bit = math::activation_passes_gradient<bounded>(v, upper);
    }
    const unsigned bits = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) {
      mask[word] = bits;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    packed_activation_backward_kernel(const scalar_t* __restrict__ grad_output, const uint32_t* __restrict__ mask,
                                      int64_t numel, scalar_t* __restrict__ grad_input) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const uint32_t word = mask[i / kWarpSize];
    const bool bit = math::mask_has_bit(word, math::mask_bit_value(static_cast<int>(i % kWarpSize)));
    store(grad_input + i, math::packed_activation_grad(to_acc(grad_output[i]), bit));
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t packed_activation(const scalar_t* input, int64_t numel, double upper, scalar_t* output, uint32_t* mask,
                              cudaStream_t stream) {
  if (numel <= 0) {
    return cudaSuccess;
  }
  typedef typename math::AccumulateType<scalar_t>::type acc_t;
  const int64_t words = math::packed_mask_words(numel);
  const int blocks = grid_size(ceil_div(words, kWarpsPerBlock));
  const acc_t upper_acc = static_cast<acc_t>(upper);
  // upper = +inf (in acc_t): ReLU, whose gradient passes at x = +inf too (no upper test).
  if (upper_acc < std::numeric_limits<acc_t>::infinity()) {
    packed_activation_kernel<true><<<blocks, kThreadsPerBlock, 0, stream>>>(input, numel, words, upper_acc, output,
                                                                            mask);
  } else {
    packed_activation_kernel<false><<<blocks, kThreadsPerBlock, 0, stream>>>(input, numel, words, upper_acc, output,
                                                                             mask);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t packed_activation_backward(const scalar_t* grad_output, const uint32_t* mask, int64_t numel,
                                       scalar_t* grad_input, cudaStream_t stream) {
  if (numel <= 0) {
    return cudaSuccess;
  }
  const int blocks = grid_size(ceil_div(numel, kThreadsPerBlock));
  packed_activation_backward_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(grad_output, mask, numel, grad_input);
  return cudaGetLastError();
}

#define DA2EXT_INSTANTIATE(scalar_t)                                                                               \
  template cudaError_t packed_activation<scalar_t>(const scalar_t*, int64_t, double, scalar_t*, uint32_t*,        \
                                                   cudaStream_t);                                                 \
  template cudaError_t packed_activation_backward<scalar_t>(const scalar_t*, const uint32_t*, int64_t, scalar_t*, \
                                                            cudaStream_t);

DA2EXT_INSTANTIATE(float)
DA2EXT_INSTANTIATE(double)
DA2EXT_INSTANTIATE(__half)

#undef DA2EXT_INSTANTIATE

}  // namespace cuda
}  // namespace da2ext
