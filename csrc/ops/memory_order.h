// The two memory orders the CPU kernels take (da2ext/memory_order.py): contiguous
// (NCHW for 4-D) and channels_last (N x H x W x C in memory). Shared by the
// packed activation ops and the residual attention ops, so both tell the orders
// apart, and allocate their outputs, the same way.
#pragma once

#include <ATen/ATen.h>

namespace da2ext {
namespace ops {

// Whether `t` is channels_last and not also contiguous (C == 1 or H == W == 1
// make both orders one; such a tensor is read as contiguous).
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// A new uninitialised tensor of `like`'s sizes and options in its memory order.
inline at::Tensor empty_in_memory_order(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options(),
                   is_channels_last(like) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

}  // namespace ops
}  // namespace da2ext
