// CPU kernels of the deformable RoI pooling ops (deform_roi_pool, deform_psroi_pool) and their registration.
//
// roi_pool.h describes what both ops compute. The input is read channels-last per position-sensitive
// group, (B, H, W, G * G, C), in the compute dtype, so that every sample is a few contiguous,
// vectorisable rows of C values. Each bin's samples are built once (per axis: the rows and columns
// it reads, their weights and slopes) and reused by all its channels. Work is split so that no two
// threads write the same element, and every element is summed in a fixed order, so results do not
// depend on the number of threads:
// - forward: one (RoI, bin) per task;
// - input gradient: one (group, block of channels) per task, each looping over every RoI and bin;
// - offset gradient: one RoI per task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "compute_dtype.h"
#include "roi_pool.h"

namespace dcn_plugin {
namespace {

// The samples of one (RoI, class, bin): its valid rows and columns (validity is per axis).
template <typename acc_t>
struct Bin {
  int64_t batch = 0, group = 0, part = 0;
  acc_t inverse_count = 0;               // 1 / the divisor of the average; 0 when nothing is averaged
  acc_t dx_doffset = 0, dy_doffset = 0;  // d position / d offset: scale * RoI size
  std::vector<AxisSample<acc_t>> ys, xs;
};

template <typename acc_t>
struct RoiSampler {
  const RoiPoolProblem& p;
  const acc_t* table;   // (R, kRoiColumns)
  const acc_t* offset;  // (R, classes, 2, part_h, part_w), or null

  // Fills `bin` for RoI `roi`, offset class `cls` and bin (ph, pw).
  void build(int64_t roi, int64_t cls, int64_t ph, int64_t pw, Bin<acc_t>& bin) const {
    const RoiPoolSpec& spec = p.spec;
    const acc_t* t = table + roi * kRoiColumns;
    const acc_t height = t[kHeight], width = t[kWidth];
    const acc_t bin_h = height / acc_t(spec.pooled_h), bin_w = width / acc_t(spec.pooled_w);
    acc_t y0 = t[kY0] + acc_t(ph) * bin_h, x0 = t[kX0] + acc_t(pw) * bin_w;
    bin.batch = static_cast<int64_t>(t[kBatch]);
    bin.group = spec.group_of(ph, pw);
    bin.part = spec.part_of(ph, pw);
    bin.dx_doffset = acc_t(spec.offset_scale) * width;
    bin.dy_doffset = acc_t(spec.offset_scale) * height;
    if (offset != nullptr) {
      const int64_t parts = spec.part_h * spec.part_w;
      const acc_t* off = offset + (roi * spec.classes + cls) * 2 * parts + bin.part;
      x0 += off[0] * bin.dx_doffset;
      y0 += off[parts] * bin.dy_doffset;
    }
    const int64_t grid_h = static_cast<int64_t>(t[kGridH]), grid_w = static_cast<int64_t>(t[kGridW]);
    fill(bin.ys, y0, bin_h, grid_h, p.height);
    fill(bin.xs, x0, bin_w, grid_w, p.width);
    const int64_t count =
        spec.counts_valid_only() ? int64_t(bin.ys.size() * bin.xs.size()) : std::max<int64_t>(grid_h * grid_w, 1);
    bin.inverse_count = count > 0 ? acc_t(1) / acc_t(count) : acc_t(0);
  }

 private:
  // The valid samples start + (i + align) * size / n, i < n, along an axis of `extent` pixels.
  void fill(std::vector<AxisSample<acc_t>>& out, acc_t start, acc_t size, int64_t n, int64_t extent) const {
    out.clear();
    const acc_t step = size / acc_t(std::max<int64_t>(n, 1));
    const acc_t align = acc_t(p.spec.align()), margin = acc_t(p.spec.margin());
    for (int64_t i = 0; i < n; ++i) {
      const AxisSample<acc_t> sample = clamp_axis<acc_t>(start + (acc_t(i) + align) * step, extent, margin);
      if (sample.valid) out.push_back(sample);
    }
  }
};

// Calls f(row offset, weight) for the (up to) four pixels of sample (y, x) with non-zero weight;
// row offsets are in pixels of the (H, W) plane.
template <typename acc_t, typename F>
inline void for_corners(const AxisSample<acc_t>& y, const AxisSample<acc_t>& x, int64_t width, F&& f) {
  const int64_t rows[2] = {y.low, y.high}, cols[2] = {x.low, x.high};
  const acc_t wy[2] = {y.w_low, y.w_high}, wx[2] = {x.w_low, x.w_high};
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const acc_t w = wy[i] * wx[j];
      if (w != acc_t(0)) f(rows[i] * width + cols[j], w);
    }
  }
}

// Tensors of one call in the compute dtype: the input channels-last, (B, H, W, G * G, C).
template <typename acc_t>
struct RoiPoolData {
  const RoiPoolProblem& p;
  RoiSampler<acc_t> sampler;
  const acc_t* input = nullptr;
  int64_t pixel_stride = 0;  // G * G * C

  // The first of the C channels of `group` at pixel `pixel` of image `batch`.
  template <typename T>
  T* at(T* base, int64_t batch, int64_t pixel, int64_t group) const {
    return base + (batch * p.height * p.width + pixel) * pixel_stride + group * p.channels;
  }
};

template <typename acc_t>
void forward_kernel(const RoiPoolData<acc_t>& data, acc_t* out /* (R, PH, PW, C) */) {
  const RoiPoolProblem& p = data.p;
  const RoiPoolSpec& spec = p.spec;
  const int64_t bins = spec.bins(), per_class = p.channels_per_class();
  at::parallel_for(0, p.rois * bins, 1, [&](int64_t begin, int64_t end) {
    Bin<acc_t> bin;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t roi = item / bins, ph = item % bins / spec.pooled_w, pw = item % spec.pooled_w;
      acc_t* out_row = out + item * p.channels;
      std::fill(out_row, out_row + p.channels, acc_t(0));
      for (int64_t cls = 0; cls < spec.classes; ++cls) {
        data.sampler.build(roi, cls, ph, pw, bin);
        acc_t* __restrict dst = out_row + cls * per_class;
        for (const auto& y : bin.ys) {
          for (const auto& x : bin.xs) {
            for_corners(y, x, p.width, [&](int64_t pixel, acc_t w) {
              const acc_t* __restrict src = data.at(data.input, bin.batch, pixel, bin.group) + cls * per_class;
              for (int64_t c = 0; c < per_class; ++c) dst[c] += w * src[c];
            });
          }
        }
        for (int64_t c = 0; c < per_class; ++c) dst[c] *= bin.inverse_count;
      }
    }
  });
}

// grad_input (B, H, W, G * G, C), zeroed; grad_output (R, PH, PW, C).
template <typename acc_t>
void input_grad_kernel(const RoiPoolData<acc_t>& data, const acc_t* grad_output, acc_t* grad_input) {
  const RoiPoolProblem& p = data.p;
  const RoiPoolSpec& spec = p.spec;
  const int64_t bins = spec.bins(), per_class = p.channels_per_class();
  // Blocks of channels: a few per thread, long enough to vectorise (each task rebuilds the samples
  // of every bin). The sums do not depend on the blocks: each element is summed in RoI, bin and
  // sample order.
  const int64_t tasks = std::max<int64_t>(1, 4 * at::get_num_threads() / spec.groups());
  const int64_t block = std::max<int64_t>(16, (p.channels + tasks - 1) / tasks + 15) / 16 * 16;
  const int64_t blocks = (p.channels + block - 1) / block;
  at::parallel_for(0, spec.groups() * blocks, 1, [&](int64_t begin, int64_t end) {
    Bin<acc_t> bin;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / blocks, c0 = item % blocks * block;
      const int64_t c1 = std::min(c0 + block, p.channels);
      for (int64_t roi = 0; roi < p.rois; ++roi) {
        for (int64_t bin_index = 0; bin_index < bins; ++bin_index) {
          const int64_t ph = bin_index / spec.pooled_w, pw = bin_index % spec.pooled_w;
          if (spec.group_of(ph, pw) != group) continue;
          const acc_t* grad = grad_output + (roi * bins + bin_index) * p.channels;
          for (int64_t cls = 0; cls < spec.classes; ++cls) {
            const int64_t from = std::max(c0, cls * per_class), to = std::min(c1, (cls + 1) * per_class);
            if (from >= to) continue;
            data.sampler.build(roi, cls, ph, pw, bin);
            for (const auto& y : bin.ys) {
              for (const auto& x : bin.xs) {
                for_corners(y, x, p.width, [&](int64_t pixel, acc_t w) {
                  acc_t* dst = data.at(grad_input, bin.batch, pixel, group);
                  const acc_t scale = w * bin.inverse_count;
                  for (int64_t c = from; c < to; ++c) dst[c] += scale * grad[c];
                });
              }
            }
          }
        }
      }
    }
  });
}

// grad_offset (R, classes, 2, part_h, part_w), zeroed; grad_output (R, PH, PW, C).
template <typename acc_t>
void offset_grad_kernel(const RoiPoolData<acc_t>& data, const acc_t* grad_output, acc_t* grad_offset) {
  const RoiPoolProblem& p = data.p;
  const RoiPoolSpec& spec = p.spec;
  const int64_t bins = spec.bins(), per_class = p.channels_per_class(), parts = spec.part_h * spec.part_w;
  at::parallel_for(0, p.rois, 1, [&](int64_t begin, int64_t end) {
    Bin<acc_t> bin;
    for (int64_t roi = begin; roi < end; ++roi) {
      for (int64_t bin_index = 0; bin_index < bins; ++bin_index) {
        for (int64_t cls = 0; cls < spec.classes; ++cls) {
          data.sampler.build(roi, cls, bin_index / spec.pooled_w, bin_index % spec.pooled_w, bin);
          if (bin.inverse_count == acc_t(0)) continue;
          const acc_t* __restrict grad = grad_output + (roi * bins + bin_index) * p.channels + cls * per_class;
          acc_t sum_x = 0, sum_y = 0;
          for (const auto& y : bin.ys) {
            for (const auto& x : bin.xs) {
              if (y.slope == acc_t(0) && x.slope == acc_t(0)) continue;
              auto row = [&](int64_t yy, int64_t xx) {
                return data.at(data.input, bin.batch, yy * p.width + xx, bin.group) + cls * per_class;
              };
              const acc_t* __restrict ll = row(y.low, x.low);
              const acc_t* __restrict lh = row(y.low, x.high);
              const acc_t* __restrict hl = row(y.high, x.low);
              const acc_t* __restrict hh = row(y.high, x.high);
              // d value / d x and d value / d y of the sample, against grad, over the class's channels.
              acc_t gx = 0, gy = 0;
              for (int64_t c = 0; c < per_class; ++c) {
                gx += grad[c] * (y.w_low * (lh[c] - ll[c]) + y.w_high * (hh[c] - hl[c]));
                gy += grad[c] * (x.w_low * (hl[c] - ll[c]) + x.w_high * (hh[c] - lh[c]));
              }
              sum_x += x.slope * gx;
              sum_y += y.slope * gy;
            }
          }
          acc_t* go = grad_offset + (roi * spec.classes + cls) * 2 * parts + bin.part;
          go[0] += sum_x * bin.inverse_count * bin.dx_doffset;
          go[parts] += sum_y * bin.inverse_count * bin.dy_doffset;
        }
      }
    }
  });
}

// The input as (B, H, W, G * G, C) in `dtype`: input channel c * G * G + g goes to [..., g, c].
at::Tensor channels_last(const RoiPoolProblem& p, const at::Tensor& input, at::ScalarType dtype) {
  return input.view({p.batch, p.channels, p.spec.groups(), p.height, p.width})
      .permute({0, 3, 4, 2, 1})
      .to(dtype)
      .contiguous();
}

template <typename acc_t>
RoiPoolData<acc_t> make_data(const RoiPoolProblem& p, const at::Tensor& table, const at::Tensor& offset,
                             const at::Tensor& input_cl) {
  RoiPoolData<acc_t> data{
      p, RoiSampler<acc_t>{p, table.data_ptr<acc_t>(), offset.defined() ? offset.data_ptr<acc_t>() : nullptr}};
  data.input = input_cl.defined() ? input_cl.data_ptr<acc_t>() : nullptr;
  data.pixel_stride = p.spec.groups() * p.channels;
  return data;
}

at::Tensor offset_in(const std::optional<at::Tensor>& offset, at::ScalarType dtype) {
  return offset ? offset->to(dtype).contiguous() : at::Tensor();
}

at::Tensor roi_pool_forward(const RoiPoolProblem& p, const at::Tensor& input, const at::Tensor& rois,
                            const std::optional<at::Tensor>& offset) {
  const auto dtype = compute_dtype(input.scalar_type());
  const at::Tensor table = roi_table(p, rois, dtype);
  const at::Tensor off = offset_in(offset, dtype);
  const at::Tensor input_cl = channels_last(p, input, dtype);
  at::Tensor out = at::empty({p.rois, p.spec.pooled_h, p.spec.pooled_w, p.channels}, input.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "deform_roi_pool_cpu", [&] {
    forward_kernel<scalar_t>(make_data<scalar_t>(p, table, off, input_cl), out.data_ptr<scalar_t>());
  });
  return out.permute({0, 3, 1, 2}).contiguous().to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> roi_pool_backward(const RoiPoolProblem& p, const at::Tensor& grad_output,
                                                     const at::Tensor& input, const at::Tensor& rois,
                                                     const std::optional<at::Tensor>& offset,
                                                     std::array<bool, 2> output_mask) {
  const bool need_input = output_mask[0], need_offset = output_mask[1] && offset.has_value();
  // Gradients that are not asked for come back as empty tensors (distinct ones: outputs never alias).
  at::Tensor grad_input = input.new_empty({0}), grad_offset = input.new_empty({0});
  if (!need_input && !need_offset) return {grad_input, grad_offset};
  const auto dtype = compute_dtype(input.scalar_type());
  const auto options = input.options().dtype(dtype);
  const at::Tensor table = roi_table(p, rois, dtype);
  const at::Tensor off = offset_in(offset, dtype);
  const at::Tensor grad_cl = grad_output.permute({0, 2, 3, 1}).to(dtype).contiguous();  // (R, PH, PW, C)
  const at::Tensor input_cl = need_offset ? channels_last(p, input, dtype) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "deform_roi_pool_backward_cpu", [&] {
    const RoiPoolData<scalar_t> data = make_data<scalar_t>(p, table, off, input_cl);
    if (need_input) {
      const int64_t groups = p.spec.groups();
      at::Tensor grad = at::zeros({p.batch, p.height, p.width, groups, p.channels}, options);
      input_grad_kernel<scalar_t>(data, grad_cl.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>());
      // (B, H, W, G * G, C) -> (B, C * G * G, H, W)
      grad_input = grad.permute({0, 4, 3, 1, 2}).reshape(input.sizes()).to(input.scalar_type()).contiguous();
    }
    if (need_offset) {
      at::Tensor grad = at::zeros(offset->sizes(), options);
      offset_grad_kernel<scalar_t>(data, grad_cl.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>());
      grad_offset = grad.to(offset->scalar_type());
    }
  });
  return {grad_input, grad_offset};
}

at::Tensor deform_roi_pool_cpu(const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
                               at::IntArrayRef output_size, double spatial_scale, int64_t sampling_ratio,
                               double gamma) {
  const RoiPoolProblem p =
      describe_deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, std::nullopt);
  return roi_pool_forward(p, input, rois, offset);
}

std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                                const at::Tensor& rois,
                                                                const std::optional<at::Tensor>& offset,
                                                                at::IntArrayRef output_size, double spatial_scale,
                                                                int64_t sampling_ratio, double gamma,
                                                                std::array<bool, 2> output_mask) {
  const RoiPoolProblem p =
      describe_deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, grad_output);
  return roi_pool_backward(p, grad_output, input, rois, offset, output_mask);
}

at::Tensor deform_psroi_pool_cpu(const at::Tensor& input, const at::Tensor& rois,
                                 const std::optional<at::Tensor>& offset, double spatial_scale, int64_t output_dim,
                                 int64_t group_size, int64_t pooled_size, int64_t part_size, int64_t sample_per_part,
                                 double trans_std) {
  const RoiPoolProblem p = describe_deform_psroi_pool(input, rois, offset, spatial_scale, output_dim, group_size,
                                                      pooled_size, part_size, sample_per_part, trans_std, std::nullopt);
  return roi_pool_forward(p, input, rois, offset);
}

std::tuple<at::Tensor, at::Tensor> deform_psroi_pool_backward_cpu(const at::Tensor& grad_output,
                                                                  const at::Tensor& input, const at::Tensor& rois,
                                                                  const std::optional<at::Tensor>& offset,
                                                                  double spatial_scale, int64_t output_dim,
                                                                  int64_t group_size, int64_t pooled_size,
                                                                  int64_t part_size, int64_t sample_per_part,
                                                                  double trans_std, std::array<bool, 2> output_mask) {
  const RoiPoolProblem p = describe_deform_psroi_pool(input, rois, offset, spatial_scale, output_dim, group_size,
                                                      pooled_size, part_size, sample_per_part, trans_std, grad_output);
  return roi_pool_backward(p, grad_output, input, rois, offset, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_plugin, CPU, m) {
  m.impl("deform_roi_pool", &deform_roi_pool_cpu);
  m.impl("deform_roi_pool_backward", &deform_roi_pool_backward_cpu);
  m.impl("deform_psroi_pool", &deform_psroi_pool_cpu);
  m.impl("deform_psroi_pool_backward", &deform_psroi_pool_backward_cpu);
}

}  // namespace dcn_plugin
