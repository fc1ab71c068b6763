// The sizes of the adaptor's small branch, which its CPU loops (cpu/attention_branch_loops.h)
// and its CUDA kernels (cuda/attention_branch_kernel.h) both take: N images of C channels on
// H x W maps, a hidden layer of `hidden` units, rank k (`rank`) and a K x K spatial conv.
// No torch header: the CUDA kernel translation unit includes it.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace da2ext {
namespace ops {

struct BranchShape {
  int64_t N, C, H, W, hidden, rank, K;
  DA2_HOST_DEVICE int64_t HW() const { return H * W; }
  DA2_HOST_DEVICE int64_t rows() const { return rank * C; }  // the channel logits an image: k*C
};

}  // namespace ops
}  // namespace da2ext
