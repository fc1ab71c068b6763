// Bodies of the small branch's CPU loops (see attention_branch_loops.h). Each
// entry point is cloned for AVX2 (vectorization.h); the bodies are inlined into
// each clone.
#include "attention_branch_loops.h"
#include "scratch_buffer.h"
#include "vectorization.h"

#include "../residual_attention_math.h"

#include <algorithm>

namespace da2ext {
namespace ops {
namespace cpu {
namespace {

template <typename T>
DA2EXT_ALWAYS_INLINE T dot(const T* a, const T* b, int64_t n) {
  T sum = 0;
  DA2EXT_VECTORIZE_SUM(sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += a[i] * b[i];
  }
  return sum;
}

// out[j] = dot(matrix row j, x) for the `count` rows of `length` numbers: four rows at a
// time, so that four sums are in flight (one sum's additions wait on each other).
template <typename T>
DA2EXT_ALWAYS_INLINE void dots(const T* x, const T* matrix, int64_t count, int64_t length, T* out) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const T* a = matrix + j * length;
    const T *b = a + length, *c = b + length, *d = c + length;
    T sa = 0, sb = 0, sc = 0, sd = 0;
    DA2EXT_VECTORIZE_SUM4(sa, sb, sc, sd)
    for (int64_t i = 0; i < length; ++i) {
      const T v = x[i];
      sa += a[i] * v;
      sb += b[i] * v;
      sc += c[i] * v;
      sd += d[i] * v;
    }
    out[j] = sa;
    out[j + 1] = sb;
    out[j + 2] = sc;
    out[j + 3] = sd;
  }
  for (; j < count; ++j) {
    out[j] = dot(matrix + j * length, x, length);
  }
}

// out[r * out_stride + i] += sum over j of coef[r * coef_stride + j] * matrix[j * stride + i],
// for r < rows and i < length, each output's terms added in order of j onto its value: a
// block of `rows` x `lanes` outputs at a time is kept in registers over the j loop (one
// load and one store of out per element, not one per term). Its vector sums (eight of
// them for 4 x 16 floats in AVX2) are independent, so the j loop runs at the rate
// additions issue, not at the rate one addition's result comes back (one row of 16
// lanes, two sums, waited on its additions).
template <int64_t rows, int64_t lanes, typename T>
DA2EXT_ALWAYS_INLINE void add_products_block(const T* coef, int64_t coef_stride, int64_t count, const T* matrix,
                                             int64_t stride, T* out, int64_t out_stride) {
  T sum[rows][lanes];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < lanes; ++b) {
      sum[r][b] = out[r * out_stride + b];
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    const T* row = matrix + j * stride;
    T c[rows];
    for (int64_t r = 0; r < rows; ++r) {
      c[r] = coef[r * coef_stride + j];
    }
    for (int64_t r = 0; r < rows; ++r) {
      // along the lanes: left to itself, GCC vectorised across the rows instead, with shuffles
      DA2EXT_VECTORIZE
      for (int64_t b = 0; b < lanes; ++b) {
        sum[r][b] += c[r] * row[b];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < lanes; ++b) {
      out[r * out_stride + b] = sum[r][b];
    }
  }
}

// `rows` (a compile-time count) rows of outputs: blocks of 16 lanes, then 8, then one output at a time.
template <int64_t rows, typename T>
DA2EXT_ALWAYS_INLINE void add_products_rows(const T* coef, int64_t coef_stride, int64_t count, const T* matrix,
                                            int64_t stride, int64_t length, T* out, int64_t out_stride) {
  int64_t i = 0;
  for (; i + 16 <= length; i += 16) {
    add_products_block<rows, 16>(coef, coef_stride, count, matrix + i, stride, out + i, out_stride);
  }
  if (i + 8 <= length) {
    add_products_block<rows, 8>(coef, coef_stride, count, matrix + i, stride, out + i, out_stride);
    i += 8;
  }
  for (; i < length; ++i) {
    add_products_block<rows, 1>(coef, coef_stride, count, matrix + i, stride, out + i, out_stride);
  }
}

// out [rows, length] += coef [rows, count] x matrix [count, length] (row strides as given):
// four rows of outputs at a time, then one.
template <typename T>
DA2EXT_ALWAYS_INLINE void add_products(const T* coef, int64_t coef_stride, int64_t rows, int64_t count,
                                       const T* matrix, int64_t stride, int64_t length, T* out,
                                       int64_t out_stride) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    add_products_rows<4>(coef + r * coef_stride, coef_stride, count, matrix, stride, length, out + r * out_stride,
                         out_stride);
  }
  for (; r < rows; ++r) {
    add_products_rows<1>(coef + r * coef_stride, coef_stride, count, matrix, stride, length, out + r * out_stride,
                         out_stride);
  }
}

// a_s = conv([d_mean; d_max]) for one image: [k, H*W].
template <typename T>
DA2EXT_ALWAYS_INLINE void spatial_logits_of_image(const BranchShape& s, const T* spatial, const T* weight,
                                                  const T* bias, T* out) {
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

template <typename T>
DA2EXT_ALWAYS_INLINE void spatial_gates_body(const BranchShape& s, const T* spatial, const T* spatial_weight,
                                             const T* spatial_bias, T* gate_spatial) {
  for (int64_t n = 0; n < s.N; ++n) {
    T* maps = gate_spatial + n * s.rank * s.HW();
    spatial_logits_of_image(s, spatial + n * 2 * s.HW(), spatial_weight, spatial_bias, maps);
    for (int64_t p = 0; p < s.rank * s.HW(); ++p) {
      maps[p] = math::sigmoid(maps[p]);
    }
  }
}

// matrix [rows, columns] as [columns, rows], in blocks of kBlock x kBlock: a column of
// the matrix written whole would touch `columns` lines k*C numbers apart, which at
// k*C = 1024 floats (4 KiB) all fall in one cache set.
constexpr int64_t kBlock = 8;

template <typename T>
DA2EXT_ALWAYS_INLINE void transpose(const T* matrix, int64_t rows, int64_t columns, T* out) {
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j0 = 0; j0 < columns; j0 += kBlock) {
      const int64_t j1 = std::min(columns, j0 + kBlock);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          out[j * rows + i] = matrix[i * columns + j];
        }
      }
    }
  }
}

// fc2 over its transpose ([hidden, k*C], made here: k*C*hidden numbers), so that the long
// k*C side is the vectorised one; a dot of `hidden` (8 to a few hundred) numbers per logit
// cost several times more where hidden is small.
template <typename T>
DA2EXT_ALWAYS_INLINE void branch_forward_body(const BranchShape& s, const T* channel_mean, const T* spatial,
                                              const T* fc1_weight, const T* fc1_bias, const T* fc2_weight,
                                              const T* fc2_bias, const T* spatial_weight, const T* spatial_bias,
                                              T* hidden_pre, T* channel_logits, T* gate_spatial) {
  const int64_t rows = s.rows(), hidden = s.hidden;
  // scratch: fc2's transpose [hidden, k*C], the hidden layer after its relu [N, hidden]
  const std::unique_ptr<T[]> scratch = uninitialized_buffer<T>(rows * hidden + s.N * hidden);
  T* fc2_transposed = scratch.get();
  T* relu_hidden = fc2_transposed + rows * hidden;
  transpose(fc2_weight, rows, hidden, fc2_transposed);
  for (int64_t n = 0; n < s.N; ++n) {
    T* pre = hidden_pre + n * hidden;
    dots(channel_mean + n * s.C, fc1_weight, hidden, s.C, pre);
    for (int64_t j = 0; j < hidden; ++j) {
      pre[j] = fc1_bias[j] + pre[j];
      relu_hidden[n * hidden + j] = pre[j] > T(0) ? pre[j] : T(0);
    }
    std::copy(fc2_bias, fc2_bias + rows, channel_logits + n * rows);
  }
  add_products(relu_hidden, hidden, s.N, hidden, fc2_transposed, rows, rows, channel_logits, rows);
  spatial_gates_body(s, spatial, spatial_weight, spatial_bias, gate_spatial);
}

template <typename T>
DA2EXT_ALWAYS_INLINE void channel_gates_body(const BranchShape& s, const T* channel_sigmoid, const T* gamma,
                                             T* gate_channel) {
  const int64_t rows = s.rows();
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t i = 0; i < rows; ++i) {
      gate_channel[n * rows + i] = gamma[i] * channel_sigmoid[n * rows + i];
    }
  }
}

// Rows of a long sum taken together before their partial sum is added to the total.
constexpr int64_t kSumBlock = 32;

template <typename T>
DA2EXT_ALWAYS_INLINE void branch_backward_body(const BranchShape& s, const T* channel_mean, const T* spatial,
                                               const T* hidden_pre, const T* channel_sigmoid, const T* gate_spatial,
                                               const T* channel_sum, const T* spatial_sum, const T* fc1_weight,
                                               const T* fc2_weight, const T* spatial_weight, const T* gamma,
                                               T* grad_fc1_weight, T* grad_fc1_bias, T* grad_fc2_weight,
                                               T* grad_fc2_bias, T* grad_spatial_weight, T* grad_spatial_bias,
                                               T* grad_gamma, T* grad_channel_mean, T* grad_spatial) {
  const int64_t rows = s.rows(), hidden = s.hidden, C = s.C, HW = s.HW(), K = s.K, P = s.K / 2;
  std::fill(grad_fc1_weight, grad_fc1_weight + hidden * C, T(0));
  std::fill(grad_fc1_bias, grad_fc1_bias + hidden, T(0));
  std::fill(grad_fc2_bias, grad_fc2_bias + rows, T(0));
  std::fill(grad_spatial_weight, grad_spatial_weight + s.rank * 2 * K * K, T(0));
  std::fill(grad_spatial_bias, grad_spatial_bias + s.rank, T(0));
  std::fill(grad_gamma, grad_gamma + rows, T(0));
  std::fill(grad_channel_mean, grad_channel_mean + s.N * C, T(0));
  std::fill(grad_spatial, grad_spatial + s.N * 2 * HW, T(0));
  // Each product as one pass over its output (add_products), vectorised along the
  // output's long side, the batch's images four at a time. Every sum over the batch
  // adds its terms in order of n, from zero.
  const int64_t N = s.N;
  const int64_t taps_count = s.rank * 2 * K * K;
  // scratch: each logit's gradient [N, k*C] and the batch's column of it [k*C, N]; the
  // hidden layer after its relu [N, hidden]; the hidden units' gradient [N, hidden], its
  // columns [hidden, N] and a block's partial sum of it [N, hidden]; one image's conv
  // weight and bias gradients
  const std::unique_ptr<T[]> scratch =
      uninitialized_buffer<T>(2 * N * rows + 4 * N * hidden + taps_count + s.rank);
  T* grad_logits = scratch.get();
  T* grad_logits_transposed = grad_logits + N * rows;
  T* relu_hidden = grad_logits_transposed + rows * N;
  T* grad_hidden = relu_hidden + N * hidden;
  T* grad_hidden_transposed = grad_hidden + N * hidden;
  T* partial = grad_hidden_transposed + hidden * N;
  T* image_taps = partial + N * hidden;
  T* image_bias = image_taps + taps_count;
  std::fill(grad_hidden, grad_hidden + N * hidden, T(0));
  for (int64_t n = 0; n < N; ++n) {
    // The channel gates: da_c = gamma * sigmoid'(a_c) * channel_sum; dgamma = sigmoid(a_c) * channel_sum.
    for (int64_t i = 0; i < rows; ++i) {
      const T sig = channel_sigmoid[n * rows + i];
      const T sum = channel_sum[n * rows + i];
      grad_gamma[i] += sig * sum;
      const T g = gamma[i] * math::sigmoid_grad_from_output(sig) * sum;
      grad_logits[n * rows + i] = g;
      grad_logits_transposed[i * N + n] = g;
      grad_fc2_bias[i] += g;
    }
    for (int64_t j = 0; j < hidden; ++j) {
      const T h = hidden_pre[n * hidden + j];
      relu_hidden[n * hidden + j] = h > T(0) ? h : T(0);
    }
  }
  // dL/dhidden = fc2^T da_c: a sum over the k*C rows of fc2, taken in blocks of kSumBlock
  // rows that are summed apart and then added, so that no sum runs sequentially over
  // thousands of terms (float32 rounding grows with the run's length)
  for (int64_t i0 = 0; i0 < rows; i0 += kSumBlock) {
    std::fill(partial, partial + N * hidden, T(0));
    add_products(grad_logits + i0, rows, N, std::min(kSumBlock, rows - i0), fc2_weight + i0 * hidden, hidden,
                 hidden, partial, hidden);
    for (int64_t q = 0; q < N * hidden; ++q) {
      grad_hidden[q] += partial[q];
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t j = 0; j < hidden; ++j) {
      T& gh = grad_hidden[n * hidden + j];
      // relu' = 1 where the pre-activation is positive, as autograd's relu backward
      gh = hidden_pre[n * hidden + j] > T(0) ? gh : T(0);
      grad_hidden_transposed[j * N + n] = gh;
      grad_fc1_bias[j] += gh;
    }
  }
  add_products(grad_hidden, hidden, N, hidden, fc1_weight, C, C, grad_channel_mean, C);
  std::fill(grad_fc2_weight, grad_fc2_weight + rows * hidden, T(0));
  add_products(grad_logits_transposed, N, rows, N, relu_hidden, hidden, hidden, grad_fc2_weight, hidden);
  add_products(grad_hidden_transposed, N, hidden, N, channel_mean, C, C, grad_fc1_weight, C);
  // The spatial conv's weight and bias gradients sum N*H*W terms that largely cancel: each
  // image's sum is taken apart (image_taps, image_bias) and then added, so that no float32
  // run is longer than one image's positions.
  for (int64_t n = 0; n < N; ++n) {
    // The spatial gates: da_s = sigmoid'(a_s) * spatial_sum, through the 2 -> k conv.
    const T* maps = spatial + n * 2 * HW;
    T* grad_maps = grad_spatial + n * 2 * HW;
    std::fill(image_taps, image_taps + taps_count, T(0));
    std::fill(image_bias, image_bias + s.rank, T(0));
    for (int64_t r = 0; r < s.rank; ++r) {
      for (int64_t y = 0; y < s.H; ++y) {
        for (int64_t x = 0; x < s.W; ++x) {
          const int64_t p = (n * s.rank + r) * HW + y * s.W + x;
          const T g = math::sigmoid_grad_from_output(gate_spatial[p]) * spatial_sum[p];
          image_bias[r] += g;
          for (int64_t t = 0; t < 2; ++t) {
            const T* taps = spatial_weight + (r * 2 + t) * K * K;
            T* grad_taps = &image_taps[(r * 2 + t) * K * K];
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
    for (int64_t i = 0; i < taps_count; ++i) {
      grad_spatial_weight[i] += image_taps[i];
    }
    for (int64_t r = 0; r < s.rank; ++r) {
      grad_spatial_bias[r] += image_bias[r];
    }
  }
}

}  // namespace

#define DA2EXT_DEFINE_BRANCH_LOOPS(T)                                                                             \
  DA2EXT_CPU_CLONES void branch_forward(const BranchShape& s, const T* channel_mean, const T* spatial,            \
                                        const T* fc1_weight, const T* fc1_bias, const T* fc2_weight,              \
                                        const T* fc2_bias, const T* spatial_weight, const T* spatial_bias,        \
                                        T* hidden_pre, T* channel_logits, T* gate_spatial) {                      \
    branch_forward_body(s, channel_mean, spatial, fc1_weight, fc1_bias, fc2_weight, fc2_bias, spatial_weight,     \
                        spatial_bias, hidden_pre, channel_logits, gate_spatial);                                  \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void spatial_gates(const BranchShape& s, const T* spatial, const T* spatial_weight,           \
                                       const T* spatial_bias, T* gate_spatial) {                                  \
    spatial_gates_body(s, spatial, spatial_weight, spatial_bias, gate_spatial);                                   \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void channel_gates(const BranchShape& s, const T* channel_sigmoid, const T* gamma,            \
                                       T* gate_channel) {                                                         \
    channel_gates_body(s, channel_sigmoid, gamma, gate_channel);                                                  \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void branch_backward(                                                                         \
      const BranchShape& s, const T* channel_mean, const T* spatial, const T* hidden_pre, const T* channel_sigmoid, \
      const T* gate_spatial, const T* channel_sum, const T* spatial_sum, const T* fc1_weight, const T* fc2_weight,  \
      const T* spatial_weight, const T* gamma, T* grad_fc1_weight, T* grad_fc1_bias, T* grad_fc2_weight,           \
      T* grad_fc2_bias, T* grad_spatial_weight, T* grad_spatial_bias, T* grad_gamma, T* grad_channel_mean,         \
      T* grad_spatial) {                                                                                           \
    branch_backward_body(s, channel_mean, spatial, hidden_pre, channel_sigmoid, gate_spatial, channel_sum,        \
                         spatial_sum, fc1_weight, fc2_weight, spatial_weight, gamma, grad_fc1_weight,             \
                         grad_fc1_bias, grad_fc2_weight, grad_fc2_bias, grad_spatial_weight, grad_spatial_bias,   \
                         grad_gamma, grad_channel_mean, grad_spatial);                                            \
  }

DA2EXT_DEFINE_BRANCH_LOOPS(float)
DA2EXT_DEFINE_BRANCH_LOOPS(double)

}  // namespace cpu
}  // namespace ops
}  // namespace da2ext
