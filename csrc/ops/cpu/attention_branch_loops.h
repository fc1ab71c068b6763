// The adaptor's small branch as plain loops on the CPU (docs/design.md §2): the
// channel MLP, the 2 -> k spatial conv, the gates, and their backward, on the small
// tensors (O(N * (k*C + H*W)) numbers). For small sizes these loops cost less than
// the forty-odd ATen calls that compute the same (each an allocation and a trip
// through the dispatcher); residual_attention_composite.cpp picks them below a
// work bound and ATen (BLAS, oneDNN) above it.
//
// Layouts, all contiguous: channel_mean [N, C]; spatial [N, 2, H, W] (channel
// mean, channel max); fc1 [hidden, C] and [hidden]; fc2 [k*C, hidden] and [k*C];
// the spatial conv [k, 2, K, K] (padding K/2) and [k]; gamma [k*C] (rank 1: [C]);
// hidden_pre [N, hidden]; channel_logits [N, k*C]; the gates [N, k*C] and
// [N, k, H*W]. One type T throughout (float or double): the small branch of a
// float32 map computes in float32, of a float64 map in float64, as the ATen path.
#pragma once

#include "../residual_attention_math.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace da2ext {
namespace ops {
namespace cpu {

struct BranchShape {
  int64_t N, C, H, W, hidden, rank, K;
  int64_t HW() const { return H * W; }
  int64_t rows() const { return rank * C; }
};

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
#if defined(DA2EXT_OPENMP_SIMD)
#pragma omp simd reduction(+ : sum)
#endif
  for (int64_t i = 0; i < n; ++i) {
    sum += a[i] * b[i];
  }
  return sum;
}

// a_s = conv([d_mean; d_max]) for image n: [k, H*W].
template <typename T>
void spatial_logits_of_image(const BranchShape& s, const T* spatial, const T* weight, const T* bias, T* out) {
  const int64_t K = s.K, P = s.K / 2, H = s.H, W = s.W;
  for (int64_t r = 0; r < s.rank; ++r) {
    for (int64_t y = 0; y < H; ++y) {
      for (int64_t x = 0; x < W; ++x) {
        T sum = bias[r];
        for (int64_t t = 0; t < 2; ++t) {
          const T* map = spatial + t * H * W;
          const T* taps = weight + (r * 2 + t) * K * K;
          for (int64_t dy = std::max<int64_t>(0, P - y); dy < std::min<int64_t>(K, H + P - y); ++dy) {
            for (int64_t dx = std::max<int64_t>(0, P - x); dx < std::min<int64_t>(K, W + P - x); ++dx) {
              sum += taps[dy * K + dx] * map[(y + dy - P) * W + (x + dx - P)];
            }
          }
        }
        out[r * H * W + y * W + x] = sum;
      }
    }
  }
}

// gate_spatial = sigmoid(conv([d_mean; d_max])) for image n.
template <typename T>
void spatial_gates(const BranchShape& s, const T* spatial, const T* spatial_weight, const T* spatial_bias, int64_t n,
                   T* gate_spatial) {
  T* maps = gate_spatial + n * s.rank * s.HW();
  spatial_logits_of_image(s, spatial + n * 2 * s.HW(), spatial_weight, spatial_bias, maps);
  for (int64_t p = 0; p < s.rank * s.HW(); ++p) {
    maps[p] = math::sigmoid(maps[p]);
  }
}

// Forward: hidden_pre, channel_logits (a_c) and gate_spatial = sigmoid(a_s). The
// caller takes sigmoid(a_c) with ATen (vectorised: k*C exponentials per image are
// most of the branch's time at rank 4) and forms gate_channel with channel_gates.
template <typename T>
void branch_forward(const BranchShape& s, const T* channel_mean, const T* spatial, const T* fc1_weight,
                    const T* fc1_bias, const T* fc2_weight, const T* fc2_bias, const T* spatial_weight,
                    const T* spatial_bias, T* hidden_pre, T* channel_logits, T* gate_spatial) {
  std::vector<T> hidden(s.hidden);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t j = 0; j < s.hidden; ++j) {
      const T h = fc1_bias[j] + dot(fc1_weight + j * s.C, channel_mean + n * s.C, s.C);
      hidden_pre[n * s.hidden + j] = h;
      hidden[j] = h > T(0) ? h : T(0);
    }
    for (int64_t i = 0; i < s.rows(); ++i) {
      channel_logits[n * s.rows() + i] = fc2_bias[i] + dot(fc2_weight + i * s.hidden, hidden.data(), s.hidden);
    }
    spatial_gates(s, spatial, spatial_weight, spatial_bias, n, gate_spatial);
  }
}

// gate_channel = gamma * sigmoid(a_c), given sigmoid(a_c) [N, k*C].
template <typename T>
void channel_gates(const BranchShape& s, const T* channel_sigmoid, const T* gamma, T* gate_channel) {
  for (int64_t n = 0; n < s.N; ++n) {
#if defined(DA2EXT_OPENMP_SIMD)
#pragma omp simd
#endif
    for (int64_t i = 0; i < s.rows(); ++i) {
      gate_channel[n * s.rows() + i] = gamma[i] * channel_sigmoid[n * s.rows() + i];
    }
  }
}

// Backward, from the attention sums (channel_sum [N, k*C], spatial_sum [N, k, H*W]),
// sigmoid(a_c) and the recomputed gate_spatial: every parameter gradient, and the descriptors' gradients
// (grad_channel_mean [N, C], grad_spatial [N, 2, H, W]; zeroed here).
template <typename T>
void branch_backward(const BranchShape& s, const T* channel_mean, const T* spatial, const T* hidden_pre,
                     const T* channel_sigmoid, const T* gate_spatial, const T* channel_sum, const T* spatial_sum,
                     const T* fc1_weight, const T* fc2_weight, const T* spatial_weight, const T* gamma,
                     T* grad_fc1_weight, T* grad_fc1_bias, T* grad_fc2_weight, T* grad_fc2_bias,
                     T* grad_spatial_weight, T* grad_spatial_bias, T* grad_gamma, T* grad_channel_mean,
                     T* grad_spatial) {
  const int64_t rows = s.rows(), hidden = s.hidden, C = s.C, HW = s.HW(), K = s.K, P = s.K / 2;
  std::fill(grad_fc1_weight, grad_fc1_weight + hidden * C, T(0));
  std::fill(grad_fc1_bias, grad_fc1_bias + hidden, T(0));
  std::fill(grad_fc2_weight, grad_fc2_weight + rows * hidden, T(0));
  std::fill(grad_fc2_bias, grad_fc2_bias + rows, T(0));
  std::fill(grad_spatial_weight, grad_spatial_weight + s.rank * 2 * K * K, T(0));
  std::fill(grad_spatial_bias, grad_spatial_bias + s.rank, T(0));
  std::fill(grad_gamma, grad_gamma + rows, T(0));
  std::fill(grad_channel_mean, grad_channel_mean + s.N * C, T(0));
  std::fill(grad_spatial, grad_spatial + s.N * 2 * HW, T(0));
  std::vector<T> grad_logits(rows), relu_hidden(hidden), grad_hidden(hidden);
  for (int64_t n = 0; n < s.N; ++n) {
    // The channel gates: da_c = gamma * sigmoid'(a_c) * channel_sum; dgamma = sigmoid(a_c) * channel_sum.
    for (int64_t i = 0; i < rows; ++i) {
      const T sig = channel_sigmoid[n * rows + i];
      const T sum = channel_sum[n * rows + i];
      grad_gamma[i] += sig * sum;
      grad_logits[i] = gamma[i] * math::sigmoid_grad_from_output(sig) * sum;
      grad_fc2_bias[i] += grad_logits[i];
    }
    for (int64_t j = 0; j < hidden; ++j) {
      const T h = hidden_pre[n * hidden + j];
      relu_hidden[j] = h > T(0) ? h : T(0);
      grad_hidden[j] = 0;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const T g = grad_logits[i];
      T* grad_row = grad_fc2_weight + i * hidden;
      const T* weight_row = fc2_weight + i * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        grad_row[j] += g * relu_hidden[j];
        grad_hidden[j] += g * weight_row[j];
      }
    }
    const T* mean = channel_mean + n * C;
    T* grad_mean = grad_channel_mean + n * C;
    for (int64_t j = 0; j < hidden; ++j) {
      // relu' = 1 where the pre-activation is positive, as autograd's relu backward
      const T g = hidden_pre[n * hidden + j] > T(0) ? grad_hidden[j] : T(0);
      grad_fc1_bias[j] += g;
      T* grad_row = grad_fc1_weight + j * C;
      const T* weight_row = fc1_weight + j * C;
#if defined(DA2EXT_OPENMP_SIMD)
#pragma omp simd
#endif
      for (int64_t c = 0; c < C; ++c) {
        grad_row[c] += g * mean[c];
        grad_mean[c] += g * weight_row[c];
      }
    }
    // The spatial gates: da_s = sigmoid'(a_s) * spatial_sum, through the 2 -> k conv.
    const T* maps = spatial + n * 2 * HW;
    T* grad_maps = grad_spatial + n * 2 * HW;
    for (int64_t r = 0; r < s.rank; ++r) {
      for (int64_t y = 0; y < s.H; ++y) {
        for (int64_t x = 0; x < s.W; ++x) {
          const int64_t p = (n * s.rank + r) * HW + y * s.W + x;
          const T g = math::sigmoid_grad_from_output(gate_spatial[p]) * spatial_sum[p];
          grad_spatial_bias[r] += g;
          for (int64_t t = 0; t < 2; ++t) {
            const T* taps = spatial_weight + (r * 2 + t) * K * K;
            T* grad_taps = grad_spatial_weight + (r * 2 + t) * K * K;
            for (int64_t dy = std::max<int64_t>(0, P - y); dy < std::min<int64_t>(K, s.H + P - y); ++dy) {
              for (int64_t dx = std::max<int64_t>(0, P - x); dx < std::min<int64_t>(K, s.W + P - x); ++dx) {
                const int64_t q = t * HW + (y + dy - P) * s.W + (x + dx - P);
                grad_taps[dy * K + dx] += g * maps[q];
                grad_maps[q] += g * taps[dy * K + dx];
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace ops
}  // namespace da2ext
