// N-linear sampling of the CPU kernels.
//
// A sampling position `pos` (N coordinates, in input pixels) touches the 2^N corners of the
// cell that contains it. Corner `c` takes, along dimension d, the lower neighbour when bit d of
// c is 0 and the upper one when it is 1. A corner outside the image reads zero, as in
// torchvision: it gets weight 0 (and index 0, so that reads stay in bounds without a branch).
#pragma once

#include <cmath>
#include <cstdint>

#define DCN_UNROLL _Pragma("GCC unroll 8")

namespace dcn_plugin {

constexpr int kMaxDims = 3;

template <int N>
struct Corners {
  static constexpr int kCount = 1 << N;
};

// Weights and flat indices of the corners of `pos` in an image of size `size` (row-major,
// `stride[d]` elements apart along d). When `weight_grad` is given, it receives
// d weight[c] / d pos[d] at weight_grad[d * 2^N + c] (0 for corners outside the image).
template <int N, typename acc_t, typename index_t>
inline void locate_corners(const acc_t* pos, const int64_t* size, const int64_t* stride,
                                    index_t* index, acc_t* weight, acc_t* weight_grad) {
  acc_t frac[N];
  int64_t low[N];
  bool low_inside[N], high_inside[N];
DCN_UNROLL
  for (int d = 0; d < N; ++d) {
    // Written so that NaN and huge positions fall in the "outside" branch before any cast.
    if (pos[d] > acc_t(-1) && pos[d] < acc_t(size[d])) {
      const acc_t lo = floor(pos[d]);
      low[d] = static_cast<int64_t>(lo);
      frac[d] = pos[d] - lo;
      low_inside[d] = low[d] >= 0;
      high_inside[d] = low[d] + 1 < size[d];
    } else {
      low[d] = 0;
      frac[d] = acc_t(0);
      low_inside[d] = high_inside[d] = false;
    }
  }
DCN_UNROLL
  for (int c = 0; c < Corners<N>::kCount; ++c) {
    bool inside = true;
    int64_t flat = 0;
    acc_t w = acc_t(1);
DCN_UNROLL
    for (int d = 0; d < N; ++d) {
      const bool high = (c >> d) & 1;
      inside = inside && (high ? high_inside[d] : low_inside[d]);
      flat += (low[d] + high) * stride[d];
      w *= high ? frac[d] : acc_t(1) - frac[d];
    }
    index[c] = inside ? static_cast<index_t>(flat) : index_t(0);
    weight[c] = inside ? w : acc_t(0);
    if (weight_grad != nullptr) {
DCN_UNROLL
      for (int g = 0; g < N; ++g) {
        acc_t dw = acc_t(inside);
DCN_UNROLL
        for (int d = 0; d < N; ++d) {
          const bool high = (c >> d) & 1;
          if (d == g) {
            dw = high ? dw : -dw;
          } else {
            dw *= high ? frac[d] : acc_t(1) - frac[d];
          }
        }
        weight_grad[g * Corners<N>::kCount + c] = dw;
      }
    }
  }
}

// Position sampled by kernel point `kernel_index` for column-grid point `grid_index`:
// p * stride - padding + k * dilation (+ offset, added by the caller). `index_t` is the type the
// indices are split in (32-bit division is cheaper).
template <int N, typename acc_t, typename index_t>
inline void base_position(index_t grid_index, index_t kernel_index, const int64_t* grid_size,
                                   const int64_t* kernel_size, const int64_t* stride,
                                   const int64_t* padding, const int64_t* dilation, acc_t* pos) {
DCN_UNROLL
  for (int d = N - 1; d >= 0; --d) {
    const index_t size = static_cast<index_t>(grid_size[d]), kernel = static_cast<index_t>(kernel_size[d]);
    const int64_t p = grid_index % size;
    const int64_t k = kernel_index % kernel;
    grid_index /= size;
    kernel_index /= kernel;
    pos[d] = acc_t(p * stride[d] - padding[d] + k * dilation[d]);
  }
}

}  // namespace dcn_plugin
