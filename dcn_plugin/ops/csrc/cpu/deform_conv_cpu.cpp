// CPU sampling pass for dcn_plugin::deform_conv, and its CPU registration.
//
// For each chunk of grid points we first fill a sampling table: for every offset group, kernel
// point and grid point, the flat indices and N-linear weights of the 2^N corners (and the weights'
// derivatives when offsets need gradients). The table depends on the offsets only, so it is
// computed once per chunk and reused by every channel of the group. One sweep over
// (channel, kernel point, grid point) then gathers the corners once and produces whatever the
// pass asks for: columns (im2col), the scatter of gradient columns (col2im) and the offset and
// mask gradients. Work is split so that no two threads write the same element, and sums are
// made in a fixed order, so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
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

// The CPU accumulates in the column dtype (float32 for half types).
template <int N, typename scalar_t, typename index_t>
struct SampleSweep : PassData<scalar_t> {
  static constexpr int kCorners = Corners<N>::kCount;
  const SamplingTable<N, scalar_t, index_t>& table;

  using Data = PassData<scalar_t>;
  using Data::K, Data::points, Data::image_points, Data::first, Data::column_stride, Data::per_offset_group,
      Data::per_mask_group, Data::image, Data::mask, Data::grad_columns, Data::columns, Data::grad_image,
      Data::depthwise_weight, Data::dense, Data::dense_out, Data::grad_depthwise_weight;

  SampleSweep(const SamplePass& pass, const SamplingTable<N, scalar_t, index_t>& table_)
      : Data(pass), table(table_) {}

  // Sweeps channel c for kernel point k over grid points [j0, j1), with the channel's image plane
  // in cache (a channel-inner order would reuse table entries but thrash the planes). Coordinate
  // gradients, when wanted, are accumulated into `grad_offset` (rows (og - og0) * K * N + k * N + d)
  // and `grad_mask` (rows (mg - mg0) * K + k), each row `stride` long, with j as column.
  // The common cases (forward im2col, depthwise forward, col2im) get loops of their own.
  void run(int64_t c, int64_t k, int64_t j0, int64_t j1, scalar_t* grad_offset, int64_t og0, scalar_t* grad_mask,
           int64_t mg0, int64_t stride) const {
    const int64_t og = c / per_offset_group, mg = c / per_mask_group;
    const int64_t e0 = table.entry(og, k, 0);
    const index_t* __restrict idx = &table.index[e0 * kCorners];
    const scalar_t* __restrict w = &table.weight[e0 * kCorners];
    const int64_t row = c * K + k;
    const scalar_t* __restrict src = image != nullptr ? image + c * image_points : nullptr;
    const scalar_t* __restrict m = mask != nullptr ? mask + (mg * K + k) * points + first : nullptr;
    const scalar_t* __restrict gcol = grad_columns != nullptr ? grad_columns + row * column_stride : nullptr;
    scalar_t* __restrict col = columns != nullptr ? columns + row * column_stride : nullptr;
    scalar_t* __restrict gimg = grad_image != nullptr ? grad_image + c * image_points : nullptr;
    const scalar_t* __restrict dd = dense != nullptr ? dense + c * points + first : nullptr;
    scalar_t* __restrict dout = dense_out != nullptr ? dense_out + c * points + first : nullptr;
    const scalar_t weight_ck = depthwise_weight != nullptr ? depthwise_weight[row] : scalar_t(0);
    const bool coordinates = grad_offset != nullptr || grad_mask != nullptr;

    // Forced inline: GCC otherwise keeps these as calls in some of the loops below (1.35x slower).
    auto sample = [&](int64_t j) __attribute__((always_inline)) {
      scalar_t value = 0;
      for (int corner = 0; corner < kCorners; ++corner) value += w[j * kCorners + corner] * src[idx[j * kCorners + corner]];
      return value;
    };
    auto scatter = [&](int64_t j, scalar_t v) __attribute__((always_inline)) {
      for (int corner = 0; corner < kCorners; ++corner) gimg[idx[j * kCorners + corner]] += w[j * kCorners + corner] * v;
    };
    if (!coordinates && grad_depthwise_weight == nullptr) {
      if (col != nullptr && gimg == nullptr && dout == nullptr) {  // im2col
        if (m != nullptr) {
          for (int64_t j = j0; j < j1; ++j) col[j] = m[j] * sample(j);
        } else {
          for (int64_t j = j0; j < j1; ++j) col[j] = sample(j);
        }
        return;
      }
      if (dout != nullptr && col == nullptr && gimg == nullptr) {  // depthwise forward
        for (int64_t j = j0; j < j1; ++j) dout[j] += (m != nullptr ? weight_ck * m[j] : weight_ck) * sample(j);
        return;
      }
      if (gimg != nullptr && col == nullptr && dout == nullptr) {  // col2im
        for (int64_t j = j0; j < j1; ++j) {
          const scalar_t g = gcol != nullptr ? gcol[j] : weight_ck * dd[j];
          scatter(j, m != nullptr ? g * m[j] : g);
        }
        return;
      }
    }

    // Everything else: one sweep computing what the backward asks for.
    const scalar_t* __restrict dw = grad_offset != nullptr ? &table.weight_grad[e0 * N * kCorners] : nullptr;
    scalar_t* __restrict go = grad_offset != nullptr ? grad_offset + ((og - og0) * K + k) * N * stride : nullptr;
    scalar_t* __restrict gm = grad_mask != nullptr ? grad_mask + ((mg - mg0) * K + k) * stride : nullptr;
    const bool need_value = col != nullptr || gm != nullptr || dout != nullptr || grad_depthwise_weight != nullptr;
    const bool need_grad = gimg != nullptr || coordinates;
    scalar_t weight_grad = 0;
    for (int64_t j = j0; j < j1; ++j) {
      const scalar_t scale = m != nullptr ? m[j] : scalar_t(1);
      // The sampled value and its slope along each dim, from one gather of the corners.
      scalar_t value = 0, slope[N] = {};
      if (go != nullptr) {
        for (int corner = 0; corner < kCorners; ++corner) {
          const scalar_t v = src[idx[j * kCorners + corner]];
          value += w[j * kCorners + corner] * v;
          for (int d = 0; d < N; ++d) slope[d] += dw[(j * N + d) * kCorners + corner] * v;
        }
      } else if (need_value) {
        value = sample(j);
      }
      const scalar_t sampled = scale * value;
      if (col != nullptr) col[j] = sampled;
      if (dout != nullptr) dout[j] += weight_ck * sampled;
      if (grad_depthwise_weight != nullptr) weight_grad += dd[j] * sampled;
      if (!need_grad) continue;
      const scalar_t g = gcol != nullptr ? gcol[j] : weight_ck * dd[j];
      if (gm != nullptr) gm[j] += g * value;
      const scalar_t v = g * scale;
      if (gimg != nullptr) scatter(j, v);
      if (go != nullptr) {
        for (int d = 0; d < N; ++d) go[d * stride + j] += v * slope[d];
      }
    }
    if (grad_depthwise_weight != nullptr) grad_depthwise_weight[row] += weight_grad;
  }
};

template <int N, typename scalar_t, typename index_t>
void sample_impl(SamplePass& pass) {
  const Geometry& g = pass.geometry;
  if (g.channels == 0) return;  // nothing is sampled (and no channel-to-group division is defined)
  const bool coordinates = pass.grad_offset.defined() || pass.grad_mask.defined();
  const SamplingTable<N, scalar_t, index_t> table(g, pass.offset, pass.first, pass.count,
                                                  pass.grad_offset.defined());
  const int64_t K = g.kernel_points(), count = pass.count, points = g.grid_points();
  const SampleSweep<N, scalar_t, index_t> sweep(pass, table);
  const int64_t C = g.channels;
  if (!coordinates && !pass.grad_image.defined() && !pass.depthwise_weight.defined()) {
    // im2col only: every (channel, kernel point, run of grid points) is independent.
    constexpr int64_t kRun = 256;
    const int64_t runs = (count + kRun - 1) / kRun;
    at::parallel_for(0, C * K * runs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t j0 = (item % runs) * kRun, k = item / runs % K;
        sweep.run(item / runs / K, k, j0, std::min(count, j0 + kRun), nullptr, 0, nullptr, 0, 0);
      }
    });
    return;
  }
  if (!coordinates) {
    // col2im, depthwise contractions: each channel writes only its own planes and weights.
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t k = 0; k < K; ++k) sweep.run(c, k, 0, count, nullptr, 0, nullptr, 0, 0);
      }
    });
    return;
  }
  // Coordinate gradients sum over the channels of a group. Channels are split into one contiguous
  // part per thread; each part sums into its own buffer, and the buffers are added in part order,
  // so the result does not depend on scheduling.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(C, at::get_num_threads()));
  const int64_t offset_rows = K * N, mask_rows = K;
  struct Part {
    int64_t c0, c1, og0, og1, mg0, mg1;
    std::vector<scalar_t> grad_offset, grad_mask;
  };
  std::vector<Part> part(parts);
  for (int64_t i = 0; i < parts; ++i) {
    Part& q = part[i];
    q.c0 = C * i / parts;
    q.c1 = C * (i + 1) / parts;
    q.og0 = q.c0 / sweep.per_offset_group;
    q.og1 = (q.c1 - 1) / sweep.per_offset_group + 1;
    q.mg0 = q.c0 / sweep.per_mask_group;
    q.mg1 = (q.c1 - 1) / sweep.per_mask_group + 1;
  }
  const bool need_offset = pass.grad_offset.defined(), need_mask = pass.grad_mask.defined();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Part& q = part[i];
      if (need_offset) q.grad_offset.assign((q.og1 - q.og0) * offset_rows * count, scalar_t(0));
      if (need_mask) q.grad_mask.assign((q.mg1 - q.mg0) * mask_rows * count, scalar_t(0));
      for (int64_t c = q.c0; c < q.c1; ++c) {
        for (int64_t k = 0; k < K; ++k) {
          sweep.run(c, k, 0, count, need_offset ? q.grad_offset.data() : nullptr, q.og0,
                    need_mask ? q.grad_mask.data() : nullptr, q.mg0, count);
        }
      }
    }
  });
  auto reduce = [&](const at::Tensor& out, int64_t rows_per_group, auto group_range, auto buffer) {
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t total_rows = out.size(0);
    at::parallel_for(0, total_rows, 16, [&](int64_t begin, int64_t end) {
      for (const Part& q : part) {
        const auto [g0, g1] = group_range(q);
        const int64_t r0 = std::max(begin, g0 * rows_per_group), r1 = std::min(end, g1 * rows_per_group);
        const std::vector<scalar_t>& src = buffer(q);
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* d = dst + r * points + pass.first;
          const scalar_t* s = src.data() + (r - g0 * rows_per_group) * count;
          for (int64_t j = 0; j < count; ++j) d[j] += s[j];
        }
      }
    });
  };
  if (need_offset) {
    reduce(pass.grad_offset, offset_rows, [](const Part& q) { return std::pair(q.og0, q.og1); },
           [](const Part& q) -> const std::vector<scalar_t>& { return q.grad_offset; });
  }
  if (need_mask) {
    reduce(pass.grad_mask, mask_rows, [](const Part& q) { return std::pair(q.mg0, q.mg1); },
           [](const Part& q) -> const std::vector<scalar_t>& { return q.grad_mask; });
  }
}

// Runs sample_impl for the pass's dims and dtype, with an index type wide enough for the image
// (32-bit where every corner index fits).
void sample_cpu(SamplePass& pass) {
  const bool wide = pass.geometry.image_points() > std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES(pass.dtype(), "dcn_plugin_cpu", [&] {
    dispatch_geometry(pass.geometry.dims, wide,
                      [&]<int N, typename index_t>() { sample_impl<N, scalar_t, index_t>(pass); });
  });
}

const SamplingKernels& cpu_kernels() {
  static const SamplingKernels kernels{
      // Half types are sampled and multiplied in float32 on the CPU.
      [](at::ScalarType dtype) { return at::isReducedFloatingType(dtype) ? at::kFloat : dtype; },
      [](SamplePass& pass) { sample_cpu(pass); },
  };
  return kernels;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_plugin, CPU, m) {
  using Ops = DeviceOps<cpu_kernels>;
  m.impl("deform_conv", &Ops::forward);
  m.impl("deform_conv_backward", &Ops::backward);
}

}  // namespace dcn_plugin
