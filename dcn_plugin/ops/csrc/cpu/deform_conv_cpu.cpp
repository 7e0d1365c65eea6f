// CPU sampling primitives for dcn_plugin::deform_conv, and its CPU registration.
//
// For each chunk of grid points we first fill a sampling table: for every offset group, kernel
// point and grid point, the flat indices and N-linear weights of the 2^N corners (and the weights'
// derivatives when offsets need gradients). The table depends on the offsets only, so it is
// computed once per chunk and reused by every channel of the group; the per-channel loops are then
// a gather (im2col), a scatter (col2im) or a gather with a reduction (coordinate_grad), each
// parallel over work items that never write the same element, so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "deform_conv.h"

namespace dcn_plugin {
namespace {

template <int N, typename scalar_t, typename index_t>
struct SamplingTable {
  static constexpr int kCorners = Corners<N>::kCount;
  int64_t count = 0;                 // grid points in the chunk
  int64_t kernel_points = 0;
  std::vector<index_t> index;        // [group][k][j][corner]
  std::vector<scalar_t> weight;      // [group][k][j][corner]
  std::vector<scalar_t> weight_grad; // [group][k][j][dim][corner], only when requested

  // Entry of (offset group, kernel point, grid point j of the chunk).
  int64_t entry(int64_t group, int64_t k, int64_t j) const { return (group * kernel_points + k) * count + j; }

  SamplingTable(const Geometry& g, const at::Tensor& offset, int64_t first, int64_t count_, bool with_grad)
      : count(count_), kernel_points(g.kernel_points()) {
    const int64_t groups = std::max<int64_t>(g.offset_groups, 1);
    const int64_t entries = groups * kernel_points * count;
    const int64_t points = g.grid_points();
    index.resize(entries * kCorners);
    weight.resize(entries * kCorners);
    if (with_grad) weight_grad.resize(entries * N * kCorners);
    const scalar_t* off = offset.defined() ? offset.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, entries, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t j = e % count;
        const int64_t group_k = e / count;
        const int64_t k = group_k % kernel_points;
        scalar_t pos[N];
        base_position<N, scalar_t>(first + j, k, g.grid_size, g.kernel_size, g.stride, g.padding, g.dilation, pos);
        if (off != nullptr) {
          for (int d = 0; d < N; ++d) pos[d] += off[(group_k * N + d) * points + first + j];
        }
        locate_corners<N, scalar_t, index_t>(pos, g.image_size, g.image_stride, &index[e * kCorners],
                                             &weight[e * kCorners],
                                             with_grad ? &weight_grad[e * N * kCorners] : nullptr);
      }
    });
  }
};

// Channels per offset group / mask group (the divisor that maps a channel to its group).
struct ChannelGroups {
  int64_t per_offset_group;
  int64_t per_mask_group;
  explicit ChannelGroups(const Geometry& g)
      : per_offset_group(g.channels / std::max<int64_t>(g.offset_groups, 1)),
        per_mask_group(g.mask_groups > 0 ? g.channels / g.mask_groups : 1) {}
};

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_item, 1)); }

template <int N, typename scalar_t, typename index_t>
void im2col_impl(const Geometry& g, const at::Tensor& image, const at::Tensor& offset, const at::Tensor& mask,
                 int64_t first, int64_t count, at::Tensor& columns) {
  constexpr int kCorners = Corners<N>::kCount;
  const SamplingTable<N, scalar_t, index_t> table(g, offset, first, count, false);
  const ChannelGroups groups(g);
  const int64_t K = g.kernel_points(), points = g.grid_points(), image_points = g.image_points();
  const scalar_t* img = image.data_ptr<scalar_t>();
  const scalar_t* msk = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
  scalar_t* cols = columns.data_ptr<scalar_t>();
  at::parallel_for(0, g.channels * K, grain_for(count), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row / K, k = row % K;
      const int64_t e0 = table.entry(c / groups.per_offset_group, k, 0);
      const index_t* idx = &table.index[e0 * kCorners];
      const scalar_t* w = &table.weight[e0 * kCorners];
      const scalar_t* src = img + c * image_points;
      scalar_t* dst = cols + row * count;
      for (int64_t j = 0; j < count; ++j) {
        scalar_t v = 0;
        for (int corner = 0; corner < kCorners; ++corner) {
          v += w[j * kCorners + corner] * src[idx[j * kCorners + corner]];
        }
        dst[j] = v;
      }
      if (msk != nullptr) {
        const scalar_t* m = msk + (c / groups.per_mask_group * K + k) * points + first;
        for (int64_t j = 0; j < count; ++j) dst[j] *= m[j];
      }
    }
  });
}

template <int N, typename scalar_t, typename index_t>
void col2im_impl(const Geometry& g, const at::Tensor& columns, const at::Tensor& offset, const at::Tensor& mask,
                 int64_t first, int64_t count, at::Tensor& image) {
  constexpr int kCorners = Corners<N>::kCount;
  const SamplingTable<N, scalar_t, index_t> table(g, offset, first, count, false);
  const ChannelGroups groups(g);
  const int64_t K = g.kernel_points(), points = g.grid_points(), image_points = g.image_points();
  scalar_t* img = image.data_ptr<scalar_t>();
  const scalar_t* msk = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
  const scalar_t* cols = columns.data_ptr<scalar_t>();
  // One channel per work item: channels scatter into disjoint planes of the image.
  at::parallel_for(0, g.channels, grain_for(count * K), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      scalar_t* dst = img + c * image_points;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e0 = table.entry(c / groups.per_offset_group, k, 0);
        const index_t* idx = &table.index[e0 * kCorners];
        const scalar_t* w = &table.weight[e0 * kCorners];
        const scalar_t* src = cols + (c * K + k) * count;
        const scalar_t* m = msk != nullptr ? msk + (c / groups.per_mask_group * K + k) * points + first : nullptr;
        for (int64_t j = 0; j < count; ++j) {
          const scalar_t v = m != nullptr ? src[j] * m[j] : src[j];
          for (int corner = 0; corner < kCorners; ++corner) {
            dst[idx[j * kCorners + corner]] += w[j * kCorners + corner] * v;
          }
        }
      }
    }
  });
}

template <int N, typename scalar_t, typename index_t>
void coordinate_grad_impl(const Geometry& g, const at::Tensor& image, const at::Tensor& offset,
                          const at::Tensor& mask, const at::Tensor& columns, int64_t first, int64_t count,
                          at::Tensor& grad_offset, at::Tensor& grad_mask) {
  constexpr int kCorners = Corners<N>::kCount;
  constexpr int64_t kBlock = 64;
  const bool need_offset = grad_offset.defined();
  const SamplingTable<N, scalar_t, index_t> table(g, offset, first, count, need_offset);
  const ChannelGroups groups(g);
  const int64_t K = g.kernel_points(), points = g.grid_points(), image_points = g.image_points();
  const scalar_t* img = image.data_ptr<scalar_t>();
  const scalar_t* msk = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
  const scalar_t* cols = columns.data_ptr<scalar_t>();
  scalar_t* goff = need_offset ? grad_offset.data_ptr<scalar_t>() : nullptr;
  scalar_t* gmsk = grad_mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr;
  const int64_t blocks = (count + kBlock - 1) / kBlock;
  // A work item owns one kernel point and a block of grid points, for every group: the sums over
  // channels that land in one gradient element are all made by the same item, in a fixed order.
  at::parallel_for(0, K * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / blocks;
      const int64_t j0 = (item % blocks) * kBlock, j1 = std::min(count, j0 + kBlock);
      for (int64_t c = 0; c < g.channels; ++c) {
        const int64_t og = c / groups.per_offset_group, mg = c / groups.per_mask_group;
        const int64_t e0 = table.entry(og, k, 0);
        const index_t* idx = &table.index[e0 * kCorners];
        const scalar_t* w = &table.weight[e0 * kCorners];
        const scalar_t* dw = need_offset ? &table.weight_grad[e0 * N * kCorners] : nullptr;
        const scalar_t* src = img + c * image_points;
        const scalar_t* col = cols + (c * K + k) * count;
        const scalar_t* m = msk != nullptr ? msk + (mg * K + k) * points + first : nullptr;
        scalar_t* go = need_offset ? goff + (og * K + k) * N * points + first : nullptr;
        scalar_t* gm = gmsk != nullptr ? gmsk + (mg * K + k) * points + first : nullptr;
        for (int64_t j = j0; j < j1; ++j) {
          scalar_t value = 0, slope[N] = {};
          for (int corner = 0; corner < kCorners; ++corner) {
            const scalar_t v = src[idx[j * kCorners + corner]];
            value += w[j * kCorners + corner] * v;
            if (need_offset) {
              for (int d = 0; d < N; ++d) slope[d] += dw[(j * N + d) * kCorners + corner] * v;
            }
          }
          if (gm != nullptr) gm[j] += col[j] * value;
          if (need_offset) {
            const scalar_t scale = m != nullptr ? col[j] * m[j] : col[j];
            for (int d = 0; d < N; ++d) go[d * points + j] += scale * slope[d];
          }
        }
      }
    }
  });
}

// Calls f<N, scalar_t, index_t>() for the geometry's dims, the dtype and an index type wide
// enough for the image (32-bit where every corner index fits).
template <template <int, typename, typename> class Impl, typename... Args>
void dispatch(const Geometry& g, at::ScalarType dtype, Args&&... args) {
  const bool wide = g.image_points() > std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES(dtype, "dcn_plugin_cpu", [&] {
    auto run = [&](auto dims) {
      constexpr int N = decltype(dims)::value;
      if (wide) {
        Impl<N, scalar_t, int64_t>::run(g, std::forward<Args>(args)...);
      } else {
        Impl<N, scalar_t, int32_t>::run(g, std::forward<Args>(args)...);
      }
    };
    switch (g.dims) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      default: TORCH_CHECK(false, "deform_conv: unsupported number of spatial dims ", g.dims);
    }
  });
}

template <int N, typename S, typename I>
struct Im2col {
  template <typename... A>
  static void run(A&&... a) { im2col_impl<N, S, I>(std::forward<A>(a)...); }
};
template <int N, typename S, typename I>
struct Col2im {
  template <typename... A>
  static void run(A&&... a) { col2im_impl<N, S, I>(std::forward<A>(a)...); }
};
template <int N, typename S, typename I>
struct CoordinateGrad {
  template <typename... A>
  static void run(A&&... a) { coordinate_grad_impl<N, S, I>(std::forward<A>(a)...); }
};

const SamplingKernels& cpu_kernels() {
  static const SamplingKernels kernels{
      // Half types are sampled and multiplied in float32 on the CPU.
      [](at::ScalarType dtype) { return at::isReducedFloatingType(dtype) ? at::kFloat : dtype; },
      [](const Geometry& g, const at::Tensor& image, const at::Tensor& offset, const at::Tensor& mask,
         int64_t first, int64_t count, at::Tensor& columns) {
        dispatch<Im2col>(g, image.scalar_type(), image, offset, mask, first, count, columns);
      },
      [](const Geometry& g, const at::Tensor& columns, const at::Tensor& offset, const at::Tensor& mask,
         int64_t first, int64_t count, at::Tensor& image) {
        dispatch<Col2im>(g, image.scalar_type(), columns, offset, mask, first, count, image);
      },
      [](const Geometry& g, const at::Tensor& image, const at::Tensor& offset, const at::Tensor& mask,
         const at::Tensor& columns, int64_t first, int64_t count, at::Tensor& grad_offset, at::Tensor& grad_mask) {
        dispatch<CoordinateGrad>(g, image.scalar_type(), image, offset, mask, columns, first, count, grad_offset,
                                 grad_mask);
      },
  };
  return kernels;
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                       at::IntArrayRef output_padding, int64_t groups) {
  return deform_conv_forward(cpu_kernels(), input, weight, offset, mask, bias, stride, padding, dilation,
                             transposed, output_padding, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
    int64_t groups, std::array<bool, 4> output_mask) {
  return deform_conv_backward(cpu_kernels(), grad_output, input, weight, offset, mask, stride, padding, dilation,
                              transposed, output_padding, groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_plugin, CPU, m) {
  m.impl("deform_conv", &forward_cpu);
  m.impl("deform_conv_backward", &backward_cpu);
}

}  // namespace dcn_plugin
