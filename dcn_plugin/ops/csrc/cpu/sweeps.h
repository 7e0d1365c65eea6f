// The CPU sampling sweeps of sweep.h, written once for every N and scalar type.
//
// They are compiled once per instruction set, as ATen compiles its kernels:
// sweeps_{default,avx2,avx512}.cpp define CPU_CAPABILITY (which also selects at::vec's
// implementation) and setup.py builds each with its -m flags; deform_conv_cpu.cpp picks one at run
// time from at::get_cpu_capability().
//
// Channels-last and vectorised over channels: for each (grid point, kernel point, offset group)
// the 2^N corners are located once, and every channel of the group is then sampled with 2^N
// contiguous vector loads. Columns are written, and gradient columns read, as contiguous rows.
//
// A sweep runs on one thread, over its chunk's rows in order; the driver gives each thread its own
// chunks, scatter target and weight-gradient sums, so results are deterministic for a thread count.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including sweeps.h"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>  // the layout transposes
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "sweep.h"

namespace dcn_plugin {
namespace CPU_CAPABILITY {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// A channel loop visits full vectors, then at most one partial vector of `int64_t` lanes (its
// other lanes load as zero, so they add nothing to the sums).
struct Full {};
template <typename T>
inline Vec<T> load(const T* src, Full) {
  return Vec<T>::loadu(src);
}
template <typename T>
inline Vec<T> load(const T* src, int64_t lanes) {
  return Vec<T>::loadu(src, lanes);
}
template <typename T>
inline void store(const Vec<T>& v, T* dst, Full) {
  v.store(dst);
}
template <typename T>
inline void store(const Vec<T>& v, T* dst, int64_t lanes) {
  v.store(dst, static_cast<int>(lanes));
}

template <typename T, typename F>
inline void for_each_vector(int64_t channels, F&& f) {
  constexpr int64_t kSize = Vec<T>::size();
  int64_t c = 0;
  for (; c + kSize <= channels; c += kSize) f(c, Full{});
  if (c < channels) f(c, channels - c);
}

template <typename T>
inline T sum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, v);
}

template <typename T>
inline Vec<T> lerp(const Vec<T>& a, const Vec<T>& b, const Vec<T>& f) {
  return at::vec::fmadd(f, b - a, a);
}

// N-linear interpolation of the corner values x at fractions f, as lerps along dim 0, then 1, ...;
// the slope along d (the derivative by position d) takes the difference instead of the lerp at d.
template <int N, typename T>
inline Vec<T> interpolate(const Vec<T>* x, const Vec<T>* f, Vec<T>* slope) {
  constexpr int kCorners = 1 << N;
  Vec<T> value[kCorners], along[N][kCorners];  // along[e]: the slope along dim e, as it is reduced
  for (int corner = 0; corner < kCorners; ++corner) {
    value[corner] = x[corner];
    for (int e = 0; e < N; ++e) along[e][corner] = x[corner];
  }
  for (int d = 0; d < N; ++d) {
    // Corners 2 * corner and 2 * corner + 1 differ along d only; they become corner `corner`.
    for (int corner = 0; corner < kCorners >> (d + 1); ++corner) {
      const int low = 2 * corner, high = 2 * corner + 1;
      value[corner] = lerp(value[low], value[high], f[d]);
      for (int e = 0; e < N; ++e) {
        along[e][corner] = e == d ? along[e][high] - along[e][low] : lerp(along[e][low], along[e][high], f[d]);
      }
    }
  }
  for (int e = 0; e < N; ++e) slope[e] = along[e][0];
  return value[0];
}

// Channels [c0, c1) of the image that share an offset group, a mask group (-1: no mask) and, for
// the column sweeps, a convolution group.
struct Segment {
  int64_t c0, c1, offset_group, mask_group, group;
};

// A chunk as the sweeps read it: its extents, its channel segments, and the addressing of every
// tensor, with the loop over samples that all sweeps share.
template <int N, typename T>
struct Grid {
  static constexpr int kCorners = 1 << N;
  const Geometry& g;
  const Chunk& chunk;
  const int64_t C, K, L, P, per_group, rows;
  const T* image;
  std::vector<T> kernel_offset;        // (K, N): k * dilation along each dim
  std::vector<Segment> segments;       // in channel order
  std::vector<int64_t> first_segment;  // offset group og owns segments [first_segment[og], first_segment[og + 1])
  std::vector<T> zeros;                // what corners outside the image read

  Grid(const Chunk& chunk_, bool by_group)
      : g(*chunk_.geometry),
        chunk(chunk_),
        C(g.channels),
        K(g.kernel_points()),
        L(g.grid_points()),
        P(g.image_points()),
        per_group(g.channels / chunk_.groups),
        rows(chunk_.row_end - chunk_.row_begin),
        image(static_cast<const T*>(chunk_.image)),
        kernel_offset(K * N),
        zeros(C, T(0)) {
    for (int64_t k = 0; k < K; ++k) {
      int64_t rest = k;
      for (int d = N - 1; d >= 0; --d) {
        kernel_offset[k * N + d] = T((rest % g.kernel_size[d]) * g.dilation[d]);
        rest /= g.kernel_size[d];
      }
    }
    // The one split of the channels into groups in C++: a segment ends at every boundary of an offset
    // group, a mask group and (by_group) a convolution group, so it lies within one of each.
    const int64_t per_offset = C / std::max<int64_t>(g.offset_groups, 1);
    const int64_t per_mask = g.mask_groups > 0 ? C / g.mask_groups : C;
    const int64_t per_split = by_group ? per_group : C;
    for (int64_t c0 = 0; c0 < C;) {
      auto next = [c0](int64_t size) { return (c0 / size + 1) * size; };
      const int64_t c1 = std::min({next(per_offset), next(per_mask), next(per_split)});
      if (segments.empty() || segments.back().offset_group != c0 / per_offset) first_segment.push_back(segments.size());
      segments.push_back({c0, c1, c0 / per_offset, g.mask_groups > 0 ? c0 / per_mask : -1, c0 / per_group});
      c0 = c1;
    }
    first_segment.push_back(segments.size());
  }

  // Calls f(r, i, k, corners, segment, mask) for every sample of the chunk's rows, in order: row r
  // is grid point l of image i; corners are located once per kernel point and offset group.
  template <typename F>
  void for_each_sample(F&& f) const {
    const int64_t offset_groups = static_cast<int64_t>(first_segment.size()) - 1;
    for (int64_t r = chunk.row_begin; r < chunk.row_end; ++r) {
      const int64_t i = r / L, l = r % L;
      T base[N];
      base_position(l, base);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t og = 0; og < offset_groups; ++og) {
          Corners<N, T> corners;
          locate(i, l, k, og, base, corners);
          for (int64_t s = first_segment[og]; s < first_segment[og + 1]; ++s) {
            f(r, i, k, corners, segments[s], mask(i, l, k, segments[s].mask_group));
          }
        }
      }
    }
  }

  // Where each corner's channels of segment s start: the image point, or zeros outside the image.
  void source_rows(int64_t i, const Corners<N, T>& corners, const Segment& s, const T** out) const {
    for (int corner = 0; corner < kCorners; ++corner) {
      out[corner] =
          corners.index[corner] >= 0 ? image + (i * P + corners.index[corner]) * C + s.c0 : zeros.data() + s.c0;
    }
  }

  // Where each corner's channels of segment s are scattered to: the chunk's grad_image, or `trash`
  // (C values) outside the image.
  void target_rows(int64_t i, const Corners<N, T>& corners, const Segment& s, T* trash, T** out) const {
    T* target = static_cast<T*>(chunk.grad_image) + (i - chunk.grad_image_first) * P * C + s.c0;
    for (int corner = 0; corner < kCorners; ++corner) {
      out[corner] = corners.index[corner] >= 0 ? target + corners.index[corner] * C : trash + s.c0;
    }
  }

  // Offset of the columns of (row r, kernel point k, segment s) in a group-major column buffer.
  int64_t column(int64_t r, int64_t k, const Segment& s) const {
    return (s.group * rows + r - chunk.row_begin) * K * per_group + k * per_group + s.c0 - s.group * per_group;
  }

  void add_coordinate_gradients(int64_t r, int64_t k, const Segment& s, T mask_value, T grad_mask_sum,
                                const T* slope_sums) const {
    const int64_t i = r / L, l = r % L;
    const GridTensor& gm = chunk.grad_mask;
    if (gm.data != nullptr && s.mask_group >= 0) {
      static_cast<T*>(gm.data)[i * gm.image + (s.mask_group * K + k) * gm.channel + l * gm.point] += grad_mask_sum;
    }
    const GridTensor& go = chunk.grad_offset;
    if (go.data != nullptr) {
      T* out = static_cast<T*>(go.data) + i * go.image + (s.offset_group * K + k) * N * go.channel + l * go.point;
      for (int d = 0; d < N; ++d) out[d * go.channel] += mask_value * slope_sums[d];
    }
  }

 private:
  void base_position(int64_t l, T* pos) const {
    for (int d = N - 1; d >= 0; --d) {
      pos[d] = T((l % g.grid_size[d]) * g.stride[d] - g.padding[d]);
      l /= g.grid_size[d];
    }
  }

  void locate(int64_t i, int64_t l, int64_t k, int64_t og, const T* base, Corners<N, T>& corners) const {
    T pos[N];
    const GridTensor& o = chunk.offset;
    const T* offset = o.data != nullptr
                          ? static_cast<const T*>(o.data) + i * o.image + (og * K + k) * N * o.channel + l * o.point
                          : nullptr;
    for (int d = 0; d < N; ++d) {
      pos[d] = base[d] + kernel_offset[k * N + d] + (offset != nullptr ? offset[d * o.channel] : T(0));
    }
    locate_corners<N, T>(pos, g.image_size, g.image_stride, corners);
  }

  T mask(int64_t i, int64_t l, int64_t k, int64_t mg) const {
    const GridTensor& m = chunk.mask;
    return mg < 0 ? T(1) : static_cast<const T*>(m.data)[i * m.image + (mg * K + k) * m.channel + l * m.point];
  }
};

template <int N, typename T>
void im2col(const Grid<N, T>& grid) {
  constexpr int kCorners = Grid<N, T>::kCorners;
  T* columns = static_cast<T*>(grid.chunk.columns);
  grid.for_each_sample([&](int64_t r, int64_t i, int64_t k, const Corners<N, T>& corners, const Segment& s, T m) {
    const T* src[kCorners];
    grid.source_rows(i, corners, s, src);
    T w[kCorners];
    for (int corner = 0; corner < kCorners; ++corner) w[corner] = corners.weight[corner] * m;
    T* out = columns + grid.column(r, k, s);
    for_each_vector<T>(s.c1 - s.c0, [&](int64_t j, auto lanes) {
      Vec<T> v = Vec<T>(w[0]) * load(src[0] + j, lanes);
      for (int corner = 1; corner < kCorners; ++corner) {
        v = at::vec::fmadd(Vec<T>(w[corner]), load(src[corner] + j, lanes), v);
      }
      store(v, out + j, lanes);
    });
  });
}

// Scatters every sample's channel vector onto its 2^N corner rows, times the mask-folded corner
// weights; `source(r, k, s)` gives the sample's vector as a function of (j, lanes).
template <int N, typename T, typename Source>
void scatter(const Grid<N, T>& grid, Source&& source) {
  constexpr int kCorners = Grid<N, T>::kCorners;
  std::vector<T> trash(grid.C);
  grid.for_each_sample([&](int64_t r, int64_t i, int64_t k, const Corners<N, T>& corners, const Segment& s, T m) {
    T* dst[kCorners];
    grid.target_rows(i, corners, s, trash.data(), dst);
    T w[kCorners];
    for (int corner = 0; corner < kCorners; ++corner) w[corner] = corners.weight[corner] * m;
    const auto vector = source(r, k, s);
    for_each_vector<T>(s.c1 - s.c0, [&](int64_t j, auto lanes) {
      const Vec<T> gv = vector(j, lanes);
      for (int corner = 0; corner < kCorners; ++corner) {
        store(at::vec::fmadd(Vec<T>(w[corner]), gv, load(dst[corner] + j, lanes)), dst[corner] + j, lanes);
      }
    });
  });
}

template <int N, typename T>
void col2im(const Grid<N, T>& grid) {
  const T* grad_columns = static_cast<const T*>(grid.chunk.grad_columns);
  scatter(grid, [&](int64_t r, int64_t k, const Segment& s) {
    const T* grad = grad_columns + grid.column(r, k, s);
    return [grad](int64_t j, auto lanes) { return load(grad + j, lanes); };
  });
}

// One sample's channel vectors, N-linearly interpolated from their corners: each(j, lanes, value)
// does the sweep's own work with a vector and returns the gradient vector it is dotted with; with
// kCoordinates, those dot products (against the value and the slopes) are the sample's mask and
// offset gradients.
template <bool kCoordinates, int N, typename T, typename Each>
C10_ALWAYS_INLINE void interpolate_sample(const Grid<N, T>& grid, int64_t r, int64_t k, const Corners<N, T>& corners,
                                          const Segment& s, T m, const T* const* src, Each&& each) {
  constexpr int kCorners = Grid<N, T>::kCorners;
  Vec<T> frac[N];
  for (int d = 0; d < N; ++d) frac[d] = Vec<T>(corners.frac[d]);
  Vec<T> grad_mask(T(0)), grad_position[N];
  for (int d = 0; d < N; ++d) grad_position[d] = Vec<T>(T(0));
  for_each_vector<T>(s.c1 - s.c0, [&](int64_t j, auto lanes) {
    Vec<T> x[kCorners], slope[N];
    for (int corner = 0; corner < kCorners; ++corner) x[corner] = load(src[corner] + j, lanes);
    const Vec<T> value = interpolate<N, T>(x, frac, slope);
    const Vec<T> gv = each(j, lanes, value);
    if constexpr (kCoordinates) {
      grad_mask = at::vec::fmadd(gv, value, grad_mask);
      for (int d = 0; d < N; ++d) grad_position[d] = at::vec::fmadd(gv, slope[d], grad_position[d]);
    }
  });
  if constexpr (kCoordinates) {
    T slope_sums[N];
    for (int d = 0; d < N; ++d) slope_sums[d] = sum(grad_position[d]);
    grid.add_coordinate_gradients(r, k, s, m, sum(grad_mask), slope_sums);
  }
}

// Offset and mask gradients against grad_columns; with kColumns also the columns, with kCol2im
// also the scatter of grad_columns, from the same loads.
template <int N, typename T, bool kColumns, bool kCol2im>
void gradients(const Grid<N, T>& grid) {
  constexpr int kCorners = Grid<N, T>::kCorners;
  const T* grad_columns = static_cast<const T*>(grid.chunk.grad_columns);
  T* columns = static_cast<T*>(grid.chunk.columns);
  std::vector<T> trash(kCol2im ? grid.C : 0);
  grid.for_each_sample([&](int64_t r, int64_t i, int64_t k, const Corners<N, T>& corners, const Segment& s, T m) {
    const T* src[kCorners];
    grid.source_rows(i, corners, s, src);
    T* dst[kCorners];
    T w[kCorners];
    if constexpr (kCol2im) {
      grid.target_rows(i, corners, s, trash.data(), dst);
      for (int corner = 0; corner < kCorners; ++corner) w[corner] = corners.weight[corner] * m;
    }
    const int64_t col = grid.column(r, k, s);
    interpolate_sample<true>(grid, r, k, corners, s, m, src, [&](int64_t j, auto lanes, const Vec<T>& value) {
      const Vec<T> gv = load(grad_columns + col + j, lanes);
      if constexpr (kColumns) store(value * Vec<T>(m), columns + col + j, lanes);
      if constexpr (kCol2im) {
        for (int corner = 0; corner < kCorners; ++corner) {
          store(at::vec::fmadd(Vec<T>(w[corner]), gv, load(dst[corner] + j, lanes)), dst[corner] + j, lanes);
        }
      }
      return gv;
    });
  });
}

template <int N, typename T>
void depthwise(const Grid<N, T>& grid) {
  constexpr int kCorners = Grid<N, T>::kCorners;
  const T* weight = static_cast<const T*>(grid.chunk.depthwise_weight);
  T* out = static_cast<T*>(grid.chunk.dense_out);
  grid.for_each_sample([&](int64_t r, int64_t i, int64_t k, const Corners<N, T>& corners, const Segment& s, T m) {
    const T* src[kCorners];
    grid.source_rows(i, corners, s, src);
    T w[kCorners];
    for (int corner = 0; corner < kCorners; ++corner) w[corner] = corners.weight[corner] * m;
    const T* wk = weight + k * grid.C + s.c0;
    T* o = out + r * grid.C + s.c0;
    for_each_vector<T>(s.c1 - s.c0, [&](int64_t j, auto lanes) {
      Vec<T> v = Vec<T>(w[0]) * load(src[0] + j, lanes);
      for (int corner = 1; corner < kCorners; ++corner) {
        v = at::vec::fmadd(Vec<T>(w[corner]), load(src[corner] + j, lanes), v);
      }
      store(at::vec::fmadd(load(wk + j, lanes), v, load(o + j, lanes)), o + j, lanes);
    });
  });
}

template <int N, typename T>
void depthwise_col2im(const Grid<N, T>& grid) {
  const T* weight = static_cast<const T*>(grid.chunk.depthwise_weight);
  const T* dense = static_cast<const T*>(grid.chunk.dense);
  scatter(grid, [&](int64_t r, int64_t k, const Segment& s) {
    const T* wk = weight + k * grid.C + s.c0;
    const T* dr = dense + r * grid.C + s.c0;
    return [wk, dr](int64_t j, auto lanes) { return load(wk + j, lanes) * load(dr + j, lanes); };
  });
}

// The depthwise weight gradient, and with kCoordinates the offset and mask gradients against
// weight[k] * dense.
template <int N, typename T, bool kCoordinates>
void depthwise_gradients(const Grid<N, T>& grid) {
  constexpr int kCorners = Grid<N, T>::kCorners;
  const T* weight = static_cast<const T*>(grid.chunk.depthwise_weight);
  const T* dense = static_cast<const T*>(grid.chunk.dense);
  T* grad_weight = static_cast<T*>(grid.chunk.grad_depthwise_weight);
  grid.for_each_sample([&](int64_t r, int64_t i, int64_t k, const Corners<N, T>& corners, const Segment& s, T m) {
    const T* src[kCorners];
    grid.source_rows(i, corners, s, src);
    const T* wk = weight + k * grid.C + s.c0;
    const T* dr = dense + r * grid.C + s.c0;
    T* gw = grad_weight + k * grid.C + s.c0;
    interpolate_sample<kCoordinates>(grid, r, k, corners, s, m, src, [&](int64_t j, auto lanes, const Vec<T>& value) {
      const Vec<T> dv = load(dr + j, lanes);
      store(at::vec::fmadd(dv, value * Vec<T>(m), load(gw + j, lanes)), gw + j, lanes);
      if constexpr (kCoordinates) return load(wk + j, lanes) * dv;
      return dv;  // unused
    });
  });
}

template <int N, typename T>
void run(const Chunk& chunk, Sweep sweep) {
  const bool column_sweep =
      sweep.kind == Sweep::kIm2col || sweep.kind == Sweep::kCol2im || sweep.kind == Sweep::kGradients;
  const Grid<N, T> grid(chunk, column_sweep);
  switch (sweep.kind) {
    case Sweep::kIm2col: return im2col(grid);
    case Sweep::kCol2im: return col2im(grid);
    case Sweep::kGradients:
      if (sweep.with_columns && sweep.with_col2im) return gradients<N, T, true, true>(grid);
      if (sweep.with_columns) return gradients<N, T, true, false>(grid);
      if (sweep.with_col2im) return gradients<N, T, false, true>(grid);
      return gradients<N, T, false, false>(grid);
    case Sweep::kDepthwise: return depthwise(grid);
    case Sweep::kDepthwiseCol2im: return depthwise_col2im(grid);
    case Sweep::kDepthwiseGradients:
      return sweep.with_coordinates ? depthwise_gradients<N, T, true>(grid) : depthwise_gradients<N, T, false>(grid);
  }
}

void sweep(const Chunk& chunk, Sweep sweep) {
  if (chunk.row_end <= chunk.row_begin || chunk.geometry->channels == 0) return;
  AT_DISPATCH_FLOATING_TYPES(chunk.dtype, "dcn_plugin_sweep", [&] {
    switch (chunk.geometry->dims) {
      case 1: return run<1, scalar_t>(chunk, sweep);
      case 2: return run<2, scalar_t>(chunk, sweep);
      case 3: return run<3, scalar_t>(chunk, sweep);
      default: TORCH_CHECK(false, "deform_conv: unsupported number of spatial dims ", chunk.geometry->dims);
    }
  });
}

// One block of at most kBlock x kBlock, with at::vec's transposes (in registers for AVX2 and
// AVX-512 float32, element by element otherwise).
template <typename T>
inline void transpose_block(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int rows, int cols) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (rows == 8 && cols == 8) return at::vec::transpose_mxn<float, 8, 8>(src, ld_src, dst, ld_dst);
  }
#endif
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, rows, cols);
}

// The layout changes of the driver (NCHW <-> channels-last, dense^T), in cache-sized blocks: a
// strided ATen copy of these is 3-25x slower than a contiguous one (power-of-two strides alias).
template <typename T>
void transpose_matrices(const T* src, T* dst, int64_t batch, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = Vec<float>::size();
  const int64_t row_blocks = (rows + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kBlock * cols));
  at::parallel_for(0, batch * row_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / row_blocks, row = task % row_blocks * kBlock;
      const int block_rows = static_cast<int>(std::min(kBlock, rows - row));
      for (int64_t col = 0; col < cols; col += kBlock) {
        const int block_cols = static_cast<int>(std::min(kBlock, cols - col));
        transpose_block(src + (b * rows + row) * cols + col, cols, dst + (b * cols + col) * rows + row, rows,
                        block_rows, block_cols);
      }
    }
  });
}

void transpose(c10::ScalarType dtype, const void* src, void* dst, int64_t batch, int64_t rows, int64_t cols) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "dcn_plugin_transpose", [&] {
    transpose_matrices(static_cast<const scalar_t*>(src), static_cast<scalar_t*>(dst), batch, rows, cols);
  });
}

const SamplingKernels& kernels() {
  static const SamplingKernels table{C10_STRINGIZE(CPU_CAPABILITY), &sweep, &transpose};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace dcn_plugin
