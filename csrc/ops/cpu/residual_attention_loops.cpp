// Bodies of the innermost CPU loops (see residual_attention_loops.h).
//
// Instruction sets and vectorisation switches: see vectorization.h.
#include "residual_attention_loops.h"
#include "vectorization.h"

#include <algorithm>
#include <limits>
#include <type_traits>

namespace da2ext {
namespace ops {
namespace cpu {

using math::Mode;

namespace {

// A length known at compile time, for the few positions of a small map (a 1x1 to 3x3
// plane, a tile of as few): the loops over it unroll and keep their per-position
// state in registers, where a loop of runtime length spent more on its set-up and
// reduction tail than on its arithmetic. The same arithmetic, in the same order.
template <int64_t L>
using Length = std::integral_constant<int64_t, L>;

// Runs the statement `...` with `length` bound to len: a Length<len> for len 1 to 9,
// the runtime value above.
#define DA2EXT_SHORT_CASE(L, ...) \
  case L: {                      \
    const Length<L> length;      \
    __VA_ARGS__;                 \
    return;                      \
  }
#define DA2EXT_BY_LENGTH(len, ...)                                                            \
  switch (len) {                                                                              \
    DA2EXT_SHORT_CASE(1, __VA_ARGS__)                                                         \
    DA2EXT_SHORT_CASE(2, __VA_ARGS__)                                                         \
    DA2EXT_SHORT_CASE(3, __VA_ARGS__)                                                         \
    DA2EXT_SHORT_CASE(4, __VA_ARGS__)                                                         \
    DA2EXT_SHORT_CASE(5, __VA_ARGS__)                                                         \
    DA2EXT_SHORT_CASE(6, __VA_ARGS__)                                                         \
    DA2EXT_SHORT_CASE(7, __VA_ARGS__)                                                         \
    DA2EXT_SHORT_CASE(8, __VA_ARGS__)                                                         \
    DA2EXT_SHORT_CASE(9, __VA_ARGS__)                                                         \
    default: {                                                                                \
      const int64_t length = len;                                                             \
      __VA_ARGS__;                                                                            \
    }                                                                                         \
  }

template <typename scalar_t, typename acc_t, typename Len>
DA2EXT_ALWAYS_INLINE void pool_tile_body(const scalar_t* tile, int64_t C, int64_t HW, Len len, acc_t* row_sums,
                                         scalar_t* mean_out, scalar_t* max_out, int32_t* argmax_out) {
  acc_t sum[kMaxTile], max[kMaxTile];
  int32_t index[kMaxTile];
  for (int64_t i = 0; i < len; ++i) {
    sum[i] = 0;
    max[i] = static_cast<acc_t>(tile[i]);
    index[i] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = tile + c * HW;
    acc_t row_sum = 0;
    DA2EXT_VECTORIZE_SUM(row_sum)
    for (int64_t i = 0; i < len; ++i) {
      const acc_t v = static_cast<acc_t>(row[i]);
      row_sum += v;
      sum[i] += v;
      const bool take = math::replaces_running_max(v, max[i]);
      max[i] = take ? v : max[i];
      index[i] = take ? static_cast<int32_t>(c) : index[i];
    }
    row_sums[c] = row_sum;
  }
  for (int64_t i = 0; i < len; ++i) {
    mean_out[i] = static_cast<scalar_t>(sum[i] / static_cast<acc_t>(C));
    max_out[i] = static_cast<scalar_t>(max[i]);
    argmax_out[i] = index[i];
  }
}

// Planes [begin, end) of the whole map (plane = n*C + c), in one call: on small maps
// (a few positions a plane) a call per plane, or a division per plane to find its
// image, cost more than the plane's arithmetic. body(n, c, plane) does one plane.
template <typename Body>
DA2EXT_ALWAYS_INLINE void for_each_plane(int64_t C, int64_t begin, int64_t end, const Body& body) {
  int64_t n = begin / C, c = begin - n * C;
  for (int64_t plane = begin; plane < end; ++plane) {
    body(n, c, plane);
    if (++c == C) {
      c = 0;
      ++n;
    }
  }
}

// The images that planes [begin, end) cross: body(n, first plane, end plane) once per image.
template <typename Body>
DA2EXT_ALWAYS_INLINE void for_each_image(int64_t C, int64_t begin, int64_t end, const Body& body) {
  for (int64_t plane = begin; plane < end;) {
    const int64_t n = plane / C, stop = std::min(end, (n + 1) * C);
    body(n, plane, stop);
    plane = stop;
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void apply_planes_body(const scalar_t* input, const acc_t* gate_channel,
                                            const acc_t* gate_spatial, int64_t C, int64_t HW, int64_t begin,
                                            int64_t end, scalar_t* output) {
  for_each_plane(C, begin, end, [&](int64_t n, int64_t, int64_t plane) {
    const scalar_t* in = input + plane * HW;
    scalar_t* out = output + plane * HW;
    const acc_t gc = gate_channel[plane];
    const acc_t* gs = gate_spatial + n * HW;
    for (int64_t i = 0; i < HW; ++i) {
      out[i] = static_cast<scalar_t>(math::apply_attention(mode, static_cast<acc_t>(in[i]), gc, gs[i]));
    }
  });
}

// Planes of L <= 9 positions: each image's spatial gates copied into locals first.
// Read through the pointer, they were loaded again for every plane (the output,
// of the same type, might alias them) and the loop stayed scalar.
template <Mode mode, typename scalar_t, typename acc_t, int64_t L>
DA2EXT_ALWAYS_INLINE void apply_planes_body(const scalar_t* input, const acc_t* gate_channel,
                                            const acc_t* gate_spatial, int64_t C, Length<L>, int64_t begin,
                                            int64_t end, scalar_t* output) {
  for_each_image(C, begin, end, [&](int64_t n, int64_t first, int64_t stop) {
    acc_t gs[L];
    for (int64_t i = 0; i < L; ++i) {
      gs[i] = gate_spatial[n * L + i];
    }
    for (int64_t plane = first; plane < stop; ++plane) {
      const scalar_t* in = input + plane * L;
      scalar_t* out = output + plane * L;
      const acc_t gc = gate_channel[plane];
      for (int64_t i = 0; i < L; ++i) {
        out[i] = static_cast<scalar_t>(math::apply_attention(mode, static_cast<acc_t>(in[i]), gc, gs[i]));
      }
    }
  });
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void reduce_tile_body(const scalar_t* grad_tile, const scalar_t* input_tile,
                                           const acc_t* gate_channel, const acc_t* gate_spatial, int64_t C,
                                           int64_t HW, int64_t len, acc_t* row_sums, acc_t* spatial_sum) {
  acc_t column[kMaxTile];
  std::fill(column, column + len, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* g = grad_tile + c * HW;
    // mode Add never reads the input (it may be null): f aliases g, unused
    const scalar_t* f = mode == Mode::Mul ? input_tile + c * HW : g;
    const acc_t gc = gate_channel[c];
    acc_t row_sum = 0;
    DA2EXT_VECTORIZE_SUM(row_sum)
    for (int64_t i = 0; i < len; ++i) {
      const acc_t t = math::attention_grad_term(mode, static_cast<acc_t>(g[i]), static_cast<acc_t>(f[i]));
      row_sum += t * gate_spatial[i];
      column[i] += t * gc;
    }
    row_sums[c] = row_sum;
  }
  std::copy(column, column + len, spatial_sum);
}

// A tile of L <= 9 positions (a small map's whole plane): the column sums in
// registers, the channels taken kWays at a time into interleaved partial sums, so
// that each position's C additions are kWays independent chains instead of one
// chain of C dependent ones (kept in a stack array, each addition waited on the
// previous one's store: at 8x256x2x2 the reduction took about twice as long); the
// partials are added in one fixed order at the end.
constexpr int kWays = 4;

// Calls add(way, c) for every channel c < C: kWays consecutive channels on ways 0 to
// kWays - 1, the remainder on way 0, so each way sees its channels in ascending order.
template <typename Add>
DA2EXT_ALWAYS_INLINE void for_each_channel_on_ways(int64_t C, const Add& add) {
  const int64_t whole = C - C % kWays;
  for (int64_t c = 0; c < whole; c += kWays) {
    for (int w = 0; w < kWays; ++w) {
      add(w, c + w);
    }
  }
  for (int64_t c = whole; c < C; ++c) {
    add(0, c);
  }
}

// One output's kWays partial sums, added in one fixed order.
template <typename acc_t>
DA2EXT_ALWAYS_INLINE acc_t sum_of_ways(acc_t way0, acc_t way1, acc_t way2, acc_t way3) {
  static_assert(kWays == 4, "sum_of_ways takes four partial sums");
  return (way0 + way1) + (way2 + way3);
}

template <Mode mode, typename scalar_t, typename acc_t, int64_t L>
DA2EXT_ALWAYS_INLINE void reduce_tile_body(const scalar_t* grad_tile, const scalar_t* input_tile,
                                           const acc_t* gate_channel, const acc_t* gate_spatial, int64_t C,
                                           int64_t HW, Length<L>, acc_t* row_sums, acc_t* spatial_sum) {
  acc_t column[kWays][L], spatial_gate[L];
  for (int64_t i = 0; i < L; ++i) {
    spatial_gate[i] = gate_spatial[i];
    for (int w = 0; w < kWays; ++w) {
      column[w][i] = 0;
    }
  }
  const auto add_channel = [&](int w, int64_t c) {
    const scalar_t* g = grad_tile + c * HW;
    // mode Add never reads the input (it may be null): f aliases g, unused
    const scalar_t* f = mode == Mode::Mul ? input_tile + c * HW : g;
    const acc_t gc = gate_channel[c];
    acc_t row_sum = 0;
    for (int64_t i = 0; i < L; ++i) {
      const acc_t t = math::attention_grad_term(mode, static_cast<acc_t>(g[i]), static_cast<acc_t>(f[i]));
      row_sum += t * spatial_gate[i];
      column[w][i] += t * gc;
    }
    row_sums[c] = row_sum;
  };
  for_each_channel_on_ways(C, add_channel);
  for (int64_t i = 0; i < L; ++i) {
    spatial_sum[i] = sum_of_ways(column[0][i], column[1][i], column[2][i], column[3][i]);
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void input_grad_planes_body(const scalar_t* grad_output, const acc_t* gate_channel,
                                                 const acc_t* grad_channel_mean, acc_t inv_hw,
                                                 const acc_t* gate_spatial, const acc_t* grad_spatial,
                                                 const int32_t* argmax, acc_t inv_c, int64_t C, int64_t HW,
                                                 int64_t begin, int64_t end, scalar_t* grad_input) {
  for_each_plane(C, begin, end, [&](int64_t n, int64_t c, int64_t plane) {
    const scalar_t* g = grad_output + plane * HW;
    scalar_t* out = grad_input + plane * HW;
    const acc_t gc = gate_channel[plane], channel_share = grad_channel_mean[plane] * inv_hw;
    const acc_t* gs = gate_spatial + n * HW;
    const acc_t* grad_mean = grad_spatial + n * 2 * HW;
    const acc_t* grad_max = grad_mean + HW;
    const int32_t* winner = argmax + n * HW;
    const int32_t channel = static_cast<int32_t>(c);
    for (int64_t i = 0; i < HW; ++i) {
      out[i] = static_cast<scalar_t>(math::input_grad(mode, static_cast<acc_t>(g[i]), gc, gs[i], channel_share,
                                                      grad_mean[i] * inv_c, winner[i] == channel, grad_max[i]));
    }
  });
}

// Planes of L <= 9 positions: each image's per-position terms in locals first (as
// apply_planes_body's small case).
template <Mode mode, typename scalar_t, typename acc_t, int64_t L>
DA2EXT_ALWAYS_INLINE void input_grad_planes_body(const scalar_t* grad_output, const acc_t* gate_channel,
                                                 const acc_t* grad_channel_mean, acc_t inv_hw,
                                                 const acc_t* gate_spatial, const acc_t* grad_spatial,
                                                 const int32_t* argmax, acc_t inv_c, int64_t C, Length<L>,
                                                 int64_t begin, int64_t end, scalar_t* grad_input) {
  for_each_image(C, begin, end, [&](int64_t n, int64_t first, int64_t stop) {
    acc_t gs[L], mean_share[L], max_share[L];
    int32_t winner[L];
    for (int64_t i = 0; i < L; ++i) {
      gs[i] = gate_spatial[n * L + i];
      mean_share[i] = grad_spatial[n * 2 * L + i] * inv_c;
      max_share[i] = grad_spatial[n * 2 * L + L + i];
      winner[i] = argmax[n * L + i];
    }
    for (int64_t plane = first; plane < stop; ++plane) {
      const scalar_t* g = grad_output + plane * L;
      scalar_t* out = grad_input + plane * L;
      const acc_t gc = gate_channel[plane], channel_share = grad_channel_mean[plane] * inv_hw;
      const int32_t channel = static_cast<int32_t>(plane - n * C);
      for (int64_t i = 0; i < L; ++i) {
        out[i] = static_cast<scalar_t>(math::input_grad(mode, static_cast<acc_t>(g[i]), gc, gs[i], channel_share,
                                                        mean_share[i], winner[i] == channel, max_share[i]));
      }
    }
  });
}

// channels_last bodies. Per pixel the C channels are one contiguous run, and
// one vectorised pass over it adds to the row sums (one per channel), sums the
// pixel and finds its largest value and whether it holds a NaN (a max is exact in
// any order). The argmax is then the NCHW loop's: the first NaN if there is one,
// else the first channel equal to the max (+0 and -0 are equal; the value kept is
// that channel's own, so the sign of a zero max matches too), found by a scan
// that stops there, a block of channels at a time.
constexpr int64_t kScanBlock = 16;

template <typename scalar_t, typename acc_t, typename Match>
DA2EXT_ALWAYS_INLINE int64_t first_channel(const scalar_t* p, int64_t C, const Match& match) {
  int64_t c0 = 0;
  for (; c0 + kScanBlock <= C; c0 += kScanBlock) {
    int hit = 0;
    for (int64_t j = 0; j < kScanBlock; ++j) {
      hit |= static_cast<int>(match(static_cast<acc_t>(p[c0 + j])));
    }
    if (hit) {
      break;
    }
  }
  while (c0 < C - 1 && !match(static_cast<acc_t>(p[c0]))) {
    ++c0;
  }
  return c0;
}

template <typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void pool_pixels_body(const scalar_t* pixels, int64_t C, int64_t len, acc_t* row_sums,
                                           scalar_t* mean_out, scalar_t* max_out, int32_t* argmax_out) {
  std::fill(row_sums, row_sums + C, acc_t(0));
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t* p = pixels + i * C;
    acc_t sum = 0;
    acc_t top = -std::numeric_limits<acc_t>::infinity();
    int has_nan = 0;
    DA2EXT_VECTORIZE_SUM_MAX_OR(sum, top, has_nan)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(p[c]);
      row_sums[c] += v;
      sum += v;
      top = v > top ? v : top;
      has_nan |= static_cast<int>(math::is_nan(v));
    }
    const int64_t index = has_nan ? first_channel<scalar_t, acc_t>(p, C, [](acc_t v) { return math::is_nan(v); })
                                  : first_channel<scalar_t, acc_t>(p, C, [top](acc_t v) { return v == top; });
    mean_out[i] = static_cast<scalar_t>(sum / static_cast<acc_t>(C));
    max_out[i] = p[index];
    argmax_out[i] = static_cast<int32_t>(index);
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void apply_pixels_body(const scalar_t* pixels, const acc_t* gate_channel,
                                            const acc_t* gate_spatial, int64_t C, int64_t len, scalar_t* output) {
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t* in = pixels + i * C;
    scalar_t* out = output + i * C;
    const acc_t gs = gate_spatial[i];
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<scalar_t>(math::apply_attention(mode, static_cast<acc_t>(in[c]), gate_channel[c], gs));
    }
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void reduce_pixels_body(const scalar_t* grad_pixels, const scalar_t* input_pixels,
                                             const acc_t* gate_channel, const acc_t* gate_spatial, int64_t C,
                                             int64_t len, acc_t* row_sums, acc_t* spatial_sum) {
  std::fill(row_sums, row_sums + C, acc_t(0));
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t* g = grad_pixels + i * C;
    // mode Add never reads the input (it may be null): f aliases g, unused
    const scalar_t* f = mode == Mode::Mul ? input_pixels + i * C : g;
    const acc_t gs = gate_spatial[i];
    acc_t column = 0;
    DA2EXT_VECTORIZE_SUM(column)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t t = math::attention_grad_term(mode, static_cast<acc_t>(g[c]), static_cast<acc_t>(f[c]));
      row_sums[c] += t * gs;
      column += t * gate_channel[c];
    }
    spatial_sum[i] = column;
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void input_grad_pixels_body(const scalar_t* grad_pixels, const acc_t* gate_channel,
                                                 const acc_t* channel_share, const acc_t* gate_spatial,
                                                 const acc_t* grad_mean, const acc_t* grad_max,
                                                 const int32_t* argmax, acc_t inv_c, int64_t C, int64_t len,
                                                 scalar_t* grad_input) {
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t* g = grad_pixels + i * C;
    scalar_t* out = grad_input + i * C;
    const acc_t gs = gate_spatial[i], mean_share = grad_mean[i] * inv_c, max_share = grad_max[i];
    const int32_t winner = argmax[i];
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<scalar_t>(math::input_grad(mode, static_cast<acc_t>(g[c]), gate_channel[c], gs,
                                                      channel_share[c], mean_share, winner == c, max_share));
    }
  }
}

// Rank k > 1 bodies. The gates of one channel (plane loops) or one pixel
// (channels_last) are gathered into a small local array first, so that the
// per-element rank sum (math::rank_attention) reads one strided operand only.

// The k rows of L values at `rows` (an image's k spatial gates) into locals.
template <typename acc_t, int64_t L>
DA2EXT_ALWAYS_INLINE void load_rank_rows(const acc_t* rows, int k, acc_t (*out)[L]) {
  for (int j = 0; j < k; ++j) {
    for (int64_t i = 0; i < L; ++i) {
      out[j][i] = rows[j * L + i];
    }
  }
}

// attention[i] = sum over j < k of channel[j * C] * spatial[j][i] for a plane's L positions,
// the terms added in order of j, as math::rank_attention adds them.
template <typename acc_t, int64_t L>
DA2EXT_ALWAYS_INLINE void plane_rank_attention(const acc_t* channel, int64_t C, const acc_t (*spatial)[L], int k,
                                               acc_t* attention) {
  for (int64_t i = 0; i < L; ++i) {
    attention[i] = channel[0] * spatial[0][i];
  }
  for (int j = 1; j < k; ++j) {
    const acc_t gc = channel[j * C];
    for (int64_t i = 0; i < L; ++i) {
      attention[i] += gc * spatial[j][i];
    }
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void apply_planes_rank_body(const scalar_t* input, const acc_t* gate_channel,
                                                 const acc_t* gate_spatial, int k, int64_t C, int64_t HW, int64_t begin,
                                                 int64_t end, scalar_t* output) {
  for_each_plane(C, begin, end, [&](int64_t n, int64_t c, int64_t plane) {
    acc_t channel[math::kMaxRank];
    for (int j = 0; j < k; ++j) {
      channel[j] = gate_channel[n * k * C + j * C + c];
    }
    const acc_t* spatial = gate_spatial + n * k * HW;
    const scalar_t* in = input + plane * HW;
    scalar_t* out = output + plane * HW;
    for (int64_t i = 0; i < HW; ++i) {
      const acc_t attention = math::rank_attention(channel, int64_t(1), spatial + i, HW, k);
      out[i] = static_cast<scalar_t>(math::combine_attention(mode, static_cast<acc_t>(in[i]), attention));
    }
  });
}

// Planes of L <= 9 positions at rank k: each image's k spatial gates read into locals once
// (as apply_planes_body's small case), the rank sum in the same order as rank_attention's.
template <Mode mode, typename scalar_t, typename acc_t, int64_t L>
DA2EXT_ALWAYS_INLINE void apply_planes_rank_body(const scalar_t* input, const acc_t* gate_channel,
                                                 const acc_t* gate_spatial, int k, int64_t C, Length<L>,
                                                 int64_t begin, int64_t end, scalar_t* output) {
  for_each_image(C, begin, end, [&](int64_t n, int64_t first, int64_t stop) {
    acc_t spatial[math::kMaxRank][L];
    load_rank_rows(gate_spatial + n * k * L, k, spatial);
    for (int64_t plane = first; plane < stop; ++plane) {
      const int64_t c = plane - n * C;
      acc_t attention[L];
      plane_rank_attention(gate_channel + n * k * C + c, C, spatial, k, attention);
      const scalar_t* in = input + plane * L;
      scalar_t* out = output + plane * L;
      for (int64_t i = 0; i < L; ++i) {
        out[i] = static_cast<scalar_t>(math::combine_attention(mode, static_cast<acc_t>(in[i]), attention[i]));
      }
    }
  });
}

// One pass over the tile's rows: each channel's row segment is read once into
// term[] (t per position), then each rank term j adds its row sum and its
// column contributions from that cache-resident copy.
template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void reduce_tile_rank_body(const scalar_t* grad_tile, const scalar_t* input_tile,
                                                const acc_t* gate_channel, const acc_t* gate_spatial, int k,
                                                int64_t C, int64_t HW, int64_t len, acc_t* scratch, acc_t* row_sums,
                                                acc_t* spatial_sum) {
  acc_t* column = scratch;  // k rows of len
  acc_t* term = scratch + k * len;
  std::fill(column, column + k * len, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* g = grad_tile + c * HW;
    // mode Add never reads the input (it may be null): f aliases g, unused
    const scalar_t* f = mode == Mode::Mul ? input_tile + c * HW : g;
    for (int64_t i = 0; i < len; ++i) {
      term[i] = math::attention_grad_term(mode, static_cast<acc_t>(g[i]), static_cast<acc_t>(f[i]));
    }
    for (int j = 0; j < k; ++j) {
      const acc_t gc = gate_channel[j * C + c];
      const acc_t* gs = gate_spatial + j * HW;
      acc_t* col = column + j * len;
      acc_t row_sum = 0;
      DA2EXT_VECTORIZE_SUM(row_sum)
      for (int64_t i = 0; i < len; ++i) {
        row_sum += term[i] * gs[i];
        col[i] += term[i] * gc;
      }
      row_sums[j * C + c] = row_sum;
    }
  }
  for (int j = 0; j < k; ++j) {
    std::copy(column + j * len, column + (j + 1) * len, spatial_sum + j * HW);
  }
}

// A tile of L <= 9 positions at rank k: the rank-1 small tile's interleaved column
// sums (reduce_tile_body), kWays chains over the channels for each of the k terms,
// on the stack (k is known at run time only); the k spatial gates read once.
template <Mode mode, typename scalar_t, typename acc_t, int64_t L>
DA2EXT_ALWAYS_INLINE void reduce_tile_rank_body(const scalar_t* grad_tile, const scalar_t* input_tile,
                                                const acc_t* gate_channel, const acc_t* gate_spatial, int k,
                                                int64_t C, int64_t HW, Length<L>, acc_t* /*scratch*/,
                                                acc_t* row_sums, acc_t* spatial_sum) {
  acc_t column[kWays][math::kMaxRank][L], spatial_gate[math::kMaxRank][L];
  for (int j = 0; j < k; ++j) {
    for (int64_t i = 0; i < L; ++i) {
      spatial_gate[j][i] = gate_spatial[j * HW + i];
      for (int w = 0; w < kWays; ++w) {
        column[w][j][i] = 0;
      }
    }
  }
  const auto add_channel = [&](int w, int64_t c) {
    const scalar_t* g = grad_tile + c * HW;
    // mode Add never reads the input (it may be null): f aliases g, unused
    const scalar_t* f = mode == Mode::Mul ? input_tile + c * HW : g;
    acc_t term[L];
    for (int64_t i = 0; i < L; ++i) {
      term[i] = math::attention_grad_term(mode, static_cast<acc_t>(g[i]), static_cast<acc_t>(f[i]));
    }
    for (int j = 0; j < k; ++j) {
      const acc_t gc = gate_channel[j * C + c];
      acc_t row_sum = 0;
      for (int64_t i = 0; i < L; ++i) {
        row_sum += term[i] * spatial_gate[j][i];
        column[w][j][i] += term[i] * gc;
      }
      row_sums[j * C + c] = row_sum;
    }
  };
  for_each_channel_on_ways(C, add_channel);
  for (int j = 0; j < k; ++j) {
    for (int64_t i = 0; i < L; ++i) {
      spatial_sum[j * HW + i] = sum_of_ways(column[0][j][i], column[1][j][i], column[2][j][i], column[3][j][i]);
    }
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void input_grad_planes_rank_body(const scalar_t* grad_output, const acc_t* gate_channel,
                                                      const acc_t* grad_channel_mean, acc_t inv_hw,
                                                      const acc_t* gate_spatial, const acc_t* grad_spatial,
                                                      const int32_t* argmax, acc_t inv_c, int k, int64_t C, int64_t HW,
                                                      int64_t begin, int64_t end, scalar_t* grad_input) {
  for_each_plane(C, begin, end, [&](int64_t n, int64_t c, int64_t plane) {
    acc_t channel[math::kMaxRank];
    for (int j = 0; j < k; ++j) {
      channel[j] = gate_channel[n * k * C + j * C + c];
    }
    const acc_t channel_share = grad_channel_mean[plane] * inv_hw;
    const acc_t* spatial = gate_spatial + n * k * HW;
    const acc_t* grad_mean = grad_spatial + n * 2 * HW;
    const acc_t* grad_max = grad_mean + HW;
    const int32_t* winner = argmax + n * HW;
    const int32_t channel_index = static_cast<int32_t>(c);
    const scalar_t* g = grad_output + plane * HW;
    scalar_t* out = grad_input + plane * HW;
    for (int64_t i = 0; i < HW; ++i) {
      // mode Add's direct scale is 1: the gates are not read
      const acc_t attention =
          mode == Mode::Mul ? math::rank_attention(channel, int64_t(1), spatial + i, HW, k) : acc_t(0);
      out[i] = static_cast<scalar_t>(math::input_grad_of_attention(mode, static_cast<acc_t>(g[i]), attention,
                                                                   channel_share, grad_mean[i] * inv_c,
                                                                   winner[i] == channel_index, grad_max[i]));
    }
  });
}

// Planes of L <= 9 positions at rank k: each image's per-position terms (and in mode Mul
// its k spatial gates) read into locals once, as input_grad_planes_body's small case.
template <Mode mode, typename scalar_t, typename acc_t, int64_t L>
DA2EXT_ALWAYS_INLINE void input_grad_planes_rank_body(const scalar_t* grad_output, const acc_t* gate_channel,
                                                      const acc_t* grad_channel_mean, acc_t inv_hw,
                                                      const acc_t* gate_spatial, const acc_t* grad_spatial,
                                                      const int32_t* argmax, acc_t inv_c, int k, int64_t C,
                                                      Length<L>, int64_t begin, int64_t end, scalar_t* grad_input) {
  for_each_image(C, begin, end, [&](int64_t n, int64_t first, int64_t stop) {
    acc_t spatial[math::kMaxRank][L], mean_share[L], max_share[L];
    int32_t winner[L];
    for (int64_t i = 0; i < L; ++i) {
      mean_share[i] = grad_spatial[n * 2 * L + i] * inv_c;
      max_share[i] = grad_spatial[n * 2 * L + L + i];
      winner[i] = argmax[n * L + i];
    }
    if (mode == Mode::Mul) {  // mode Add's direct scale is 1: the gates are not read
      load_rank_rows(gate_spatial + n * k * L, k, spatial);
    }
    for (int64_t plane = first; plane < stop; ++plane) {
      const int64_t c = plane - n * C;
      acc_t attention[L];
      if (mode == Mode::Mul) {
        plane_rank_attention(gate_channel + n * k * C + c, C, spatial, k, attention);
      } else {
        std::fill(attention, attention + L, acc_t(0));
      }
      const acc_t channel_share = grad_channel_mean[plane] * inv_hw;
      const int32_t channel_index = static_cast<int32_t>(c);
      const scalar_t* g = grad_output + plane * L;
      scalar_t* out = grad_input + plane * L;
      for (int64_t i = 0; i < L; ++i) {
        out[i] = static_cast<scalar_t>(math::input_grad_of_attention(mode, static_cast<acc_t>(g[i]), attention[i],
                                                                     channel_share, mean_share[i],
                                                                     winner[i] == channel_index, max_share[i]));
      }
    }
  });
}

// The k spatial gates of pixel i (gate_spatial is k planes of HW), for the rank-k pixel bodies.
template <typename acc_t>
DA2EXT_ALWAYS_INLINE void pixel_spatial_gates(const acc_t* gate_spatial, int64_t HW, int64_t i, int k, acc_t* out) {
  for (int j = 0; j < k; ++j) {
    out[j] = gate_spatial[j * HW + i];
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void apply_pixels_rank_body(const scalar_t* pixels, const acc_t* gate_channel,
                                                 const acc_t* gate_spatial, int k, int64_t C, int64_t HW, int64_t len,
                                                 scalar_t* output) {
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t* in = pixels + i * C;
    scalar_t* out = output + i * C;
    acc_t spatial[math::kMaxRank];
    pixel_spatial_gates(gate_spatial, HW, i, k, spatial);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t attention = math::rank_attention(gate_channel + c, C, spatial, int64_t(1), k);
      out[c] = static_cast<scalar_t>(math::combine_attention(mode, static_cast<acc_t>(in[c]), attention));
    }
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void reduce_pixels_rank_body(const scalar_t* grad_pixels, const scalar_t* input_pixels,
                                                  const acc_t* gate_channel, const acc_t* gate_spatial, int k,
                                                  int64_t C, int64_t HW, int64_t len, acc_t* row_sums,
                                                  acc_t* spatial_sum) {
  std::fill(row_sums, row_sums + k * C, acc_t(0));
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t* g = grad_pixels + i * C;
    // mode Add never reads the input (it may be null): f aliases g, unused
    const scalar_t* f = mode == Mode::Mul ? input_pixels + i * C : g;
    acc_t spatial[math::kMaxRank], column[math::kMaxRank];
    pixel_spatial_gates(gate_spatial, HW, i, k, spatial);
    std::fill(column, column + k, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      const acc_t t = math::attention_grad_term(mode, static_cast<acc_t>(g[c]), static_cast<acc_t>(f[c]));
      for (int j = 0; j < k; ++j) {
        row_sums[j * C + c] += t * spatial[j];
        column[j] += t * gate_channel[j * C + c];
      }
    }
    for (int j = 0; j < k; ++j) {
      spatial_sum[j * HW + i] = column[j];
    }
  }
}

template <Mode mode, typename scalar_t, typename acc_t>
DA2EXT_ALWAYS_INLINE void input_grad_pixels_rank_body(const scalar_t* grad_pixels, const acc_t* gate_channel,
                                                      const acc_t* channel_share, const acc_t* gate_spatial,
                                                      const acc_t* grad_mean, const acc_t* grad_max,
                                                      const int32_t* argmax, acc_t inv_c, int k, int64_t C,
                                                      int64_t HW, int64_t len, scalar_t* grad_input) {
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t* g = grad_pixels + i * C;
    scalar_t* out = grad_input + i * C;
    acc_t spatial[math::kMaxRank];
    pixel_spatial_gates(gate_spatial, HW, i, k, spatial);
    const acc_t mean_share = grad_mean[i] * inv_c, max_share = grad_max[i];
    const int32_t winner = argmax[i];
    for (int64_t c = 0; c < C; ++c) {
      const acc_t attention =
          mode == Mode::Mul ? math::rank_attention(gate_channel + c, C, spatial, int64_t(1), k) : acc_t(0);
      out[c] = static_cast<scalar_t>(math::input_grad_of_attention(mode, static_cast<acc_t>(g[c]), attention,
                                                                   channel_share[c], mean_share, winner == c,
                                                                   max_share));
    }
  }
}

}  // namespace

// Calls body<Mode::Mul> or body<Mode::Add> with the arguments that follow.
#define DA2EXT_BY_MODE(body, ...)           \
  if (mode == Mode::Mul) {                  \
    body<Mode::Mul>(__VA_ARGS__);           \
  } else {                                  \
    body<Mode::Add>(__VA_ARGS__);           \
  }

#define DA2EXT_DEFINE_CPU_RANK_LOOPS(scalar_t, acc_t)                                                              \
  DA2EXT_CPU_CLONES void apply_planes_rank(Mode mode, const scalar_t* input, const acc_t* gate_channel,            \
                                           const acc_t* gate_spatial, int k, int64_t C, int64_t HW, int64_t begin, \
                                           int64_t end, scalar_t* output) {                                        \
    DA2EXT_BY_LENGTH(HW, DA2EXT_BY_MODE(apply_planes_rank_body, input, gate_channel, gate_spatial, k, C, length,  \
                                        begin, end, output))                                                      \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void reduce_tile_rank(Mode mode, const scalar_t* grad_tile, const scalar_t* input_tile,       \
                                          const acc_t* gate_channel, const acc_t* gate_spatial, int k, int64_t C, \
                                          int64_t HW, int64_t len, acc_t* scratch, acc_t* row_sums,               \
                                          acc_t* spatial_sum) {                                                   \
    DA2EXT_BY_LENGTH(len, DA2EXT_BY_MODE(reduce_tile_rank_body, grad_tile, input_tile, gate_channel, gate_spatial, \
                                         k, C, HW, length, scratch, row_sums, spatial_sum))                       \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void input_grad_planes_rank(Mode mode, const scalar_t* grad_output, const acc_t* gate_channel, \
                                                const acc_t* grad_channel_mean, acc_t inv_hw,                     \
                                                const acc_t* gate_spatial, const acc_t* grad_spatial,             \
                                                const int32_t* argmax, acc_t inv_c, int k, int64_t C, int64_t HW, \
                                                int64_t begin, int64_t end, scalar_t* grad_input) {               \
    DA2EXT_BY_LENGTH(HW, DA2EXT_BY_MODE(input_grad_planes_rank_body, grad_output, gate_channel, grad_channel_mean, \
                                        inv_hw, gate_spatial, grad_spatial, argmax, inv_c, k, C, length, begin,   \
                                        end, grad_input))                                                         \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void apply_pixels_rank(Mode mode, const scalar_t* pixels, const acc_t* gate_channel,          \
                                           const acc_t* gate_spatial, int k, int64_t C, int64_t HW, int64_t len,  \
                                           scalar_t* output) {                                                    \
    DA2EXT_BY_MODE(apply_pixels_rank_body, pixels, gate_channel, gate_spatial, k, C, HW, len, output)             \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void reduce_pixels_rank(Mode mode, const scalar_t* grad_pixels, const scalar_t* input_pixels, \
                                            const acc_t* gate_channel, const acc_t* gate_spatial, int k,          \
                                            int64_t C, int64_t HW, int64_t len, acc_t* row_sums,                  \
                                            acc_t* spatial_sum) {                                                 \
    DA2EXT_BY_MODE(reduce_pixels_rank_body, grad_pixels, input_pixels, gate_channel, gate_spatial, k, C, HW, len, \
                   row_sums, spatial_sum)                                                                         \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void input_grad_pixels_rank(Mode mode, const scalar_t* grad_pixels, const acc_t* gate_channel, \
                                                const acc_t* channel_share, const acc_t* gate_spatial,            \
                                                const acc_t* grad_mean, const acc_t* grad_max,                    \
                                                const int32_t* argmax, acc_t inv_c, int k, int64_t C, int64_t HW, \
                                                int64_t len, scalar_t* grad_input) {                              \
    DA2EXT_BY_MODE(input_grad_pixels_rank_body, grad_pixels, gate_channel, channel_share, gate_spatial,           \
                   grad_mean, grad_max, argmax, inv_c, k, C, HW, len, grad_input)                                 \
  }

DA2EXT_DEFINE_CPU_RANK_LOOPS(float, float)
DA2EXT_DEFINE_CPU_RANK_LOOPS(double, double)
DA2EXT_DEFINE_CPU_RANK_LOOPS(c10::Half, float)

#define DA2EXT_DEFINE_CPU_LOOPS(scalar_t, acc_t)                                                                   \
  DA2EXT_CPU_CLONES void pool_tile(const scalar_t* tile, int64_t C, int64_t HW, int64_t len, acc_t* row_sums,     \
                                   scalar_t* mean_out, scalar_t* max_out, int32_t* argmax_out) {                  \
    DA2EXT_BY_LENGTH(len, pool_tile_body(tile, C, HW, length, row_sums, mean_out, max_out, argmax_out))          \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void apply_planes(Mode mode, const scalar_t* input, const acc_t* gate_channel,                \
                                      const acc_t* gate_spatial, int64_t C, int64_t HW, int64_t begin,            \
                                      int64_t end, scalar_t* output) {                                            \
    DA2EXT_BY_LENGTH(HW, DA2EXT_BY_MODE(apply_planes_body, input, gate_channel, gate_spatial, C, length, begin,   \
                                        end, output))                                                             \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void reduce_tile(Mode mode, const scalar_t* grad_tile, const scalar_t* input_tile,            \
                                     const acc_t* gate_channel, const acc_t* gate_spatial, int64_t C, int64_t HW, \
                                     int64_t len, acc_t* row_sums, acc_t* spatial_sum) {                          \
    DA2EXT_BY_LENGTH(len, DA2EXT_BY_MODE(reduce_tile_body, grad_tile, input_tile, gate_channel, gate_spatial, C,  \
                                         HW, length, row_sums, spatial_sum))                                      \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void input_grad_planes(Mode mode, const scalar_t* grad_output, const acc_t* gate_channel,     \
                                           const acc_t* grad_channel_mean, acc_t inv_hw,                          \
                                           const acc_t* gate_spatial, const acc_t* grad_spatial,                  \
                                           const int32_t* argmax, acc_t inv_c, int64_t C, int64_t HW,             \
                                           int64_t begin, int64_t end, scalar_t* grad_input) {                    \
    DA2EXT_BY_LENGTH(HW, DA2EXT_BY_MODE(input_grad_planes_body, grad_output, gate_channel, grad_channel_mean,     \
                                        inv_hw, gate_spatial, grad_spatial, argmax, inv_c, C, length, begin, end, \
                                        grad_input))                                                              \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void pool_pixels(const scalar_t* pixels, int64_t C, int64_t len, acc_t* row_sums,             \
                                     scalar_t* mean_out, scalar_t* max_out, int32_t* argmax_out) {                \
    pool_pixels_body(pixels, C, len, row_sums, mean_out, max_out, argmax_out);                                   \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void apply_pixels(Mode mode, const scalar_t* pixels, const acc_t* gate_channel,               \
                                      const acc_t* gate_spatial, int64_t C, int64_t len, scalar_t* output) {      \
    if (mode == Mode::Mul) {                                                                                      \
      apply_pixels_body<Mode::Mul>(pixels, gate_channel, gate_spatial, C, len, output);                           \
    } else {                                                                                                      \
      apply_pixels_body<Mode::Add>(pixels, gate_channel, gate_spatial, C, len, output);                           \
    }                                                                                                             \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void reduce_pixels(Mode mode, const scalar_t* grad_pixels, const scalar_t* input_pixels,      \
                                       const acc_t* gate_channel, const acc_t* gate_spatial, int64_t C,           \
                                       int64_t len, acc_t* row_sums, acc_t* spatial_sum) {                        \
    if (mode == Mode::Mul) {                                                                                      \
      reduce_pixels_body<Mode::Mul>(grad_pixels, input_pixels, gate_channel, gate_spatial, C, len, row_sums,      \
                                    spatial_sum);                                                                 \
    } else {                                                                                                      \
      reduce_pixels_body<Mode::Add>(grad_pixels, input_pixels, gate_channel, gate_spatial, C, len, row_sums,      \
                                    spatial_sum);                                                                 \
    }                                                                                                             \
  }                                                                                                               \
  DA2EXT_CPU_CLONES void input_grad_pixels(Mode mode, const scalar_t* grad_pixels, const acc_t* gate_channel,     \
                                           const acc_t* channel_share, const acc_t* gate_spatial,                 \
                                           const acc_t* grad_mean, const acc_t* grad_max, const int32_t* argmax,  \
                                           acc_t inv_c, int64_t C, int64_t len, scalar_t* grad_input) {           \
    if (mode == Mode::Mul) {                                                                                      \
      input_grad_pixels_body<Mode::Mul>(grad_pixels, gate_channel, channel_share, gate_spatial, grad_mean,        \
                                        grad_max, argmax, inv_c, C, len, grad_input);                             \
    } else {                                                                                                      \
      input_grad_pixels_body<Mode::Add>(grad_pixels, gate_channel, channel_share, gate_spatial, grad_mean,        \
                                        grad_max, argmax, inv_c, C, len, grad_input);                             \
    }                                                                                                             \
  }

DA2EXT_DEFINE_CPU_LOOPS(float, float)
DA2EXT_DEFINE_CPU_LOOPS(double, double)
DA2EXT_DEFINE_CPU_LOOPS(c10::Half, float)

}  // namespace cpu
}  // namespace ops
}  // namespace da2ext
