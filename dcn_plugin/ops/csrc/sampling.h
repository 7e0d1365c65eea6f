// N-linear sampling: where a sampling position falls in the image.
//
// A position `pos` (N coordinates, in image points) touches the 2^N corners of the cell that
// contains it. Corner number `corner` takes, along dimension d, the lower neighbour when bit d of
// `corner` is 0 and the upper one when it is 1. A corner outside the image reads zero, as in
// torchvision.
#pragma once

#include <cmath>
#include <cstdint>

#define DCN_UNROLL _Pragma("GCC unroll 8")

namespace dcn_plugin {

constexpr int kMaxDims = 3;

template <int N, typename T>
struct Corners {
  static constexpr int kCount = 1 << N;
  int64_t index[kCount];  // flat (row-major) index of the corner's image point; -1 outside the image
  T weight[kCount];       // N-linear weight of the corner; 0 outside
  T frac[N];              // where pos lies in its cell along each dim, in [0, 1); 0 when outside
};

// The corners of `pos` in an image of spatial size `size` whose points are `stride[d]` apart along d.
template <int N, typename T>
inline void locate_corners(const T* pos, const int64_t* size, const int64_t* stride, Corners<N, T>& out) {
  int64_t low[N];
  bool low_inside[N], high_inside[N];
  DCN_UNROLL
  for (int d = 0; d < N; ++d) {
    // Written so that NaN and huge positions fall in the "outside" branch before any cast.
    if (pos[d] > T(-1) && pos[d] < T(size[d])) {
      const T lo = std::floor(pos[d]);
      low[d] = static_cast<int64_t>(lo);
      out.frac[d] = pos[d] - lo;
      low_inside[d] = low[d] >= 0;
      high_inside[d] = low[d] + 1 < size[d];
    } else {
      low[d] = 0;
      out.frac[d] = T(0);
      low_inside[d] = high_inside[d] = false;
    }
  }
  DCN_UNROLL
  for (int corner = 0; corner < Corners<N, T>::kCount; ++corner) {
    bool inside = true;
    int64_t flat = 0;
    T w = T(1);
    DCN_UNROLL
    for (int d = 0; d < N; ++d) {
      const bool high = (corner >> d) & 1;
      inside = inside && (high ? high_inside[d] : low_inside[d]);
      flat += (low[d] + high) * stride[d];
      w *= high ? out.frac[d] : T(1) - out.frac[d];
    }
    out.index[corner] = inside ? flat : -1;
    out.weight[corner] = inside ? w : T(0);
  }
}

}  // namespace dcn_plugin
