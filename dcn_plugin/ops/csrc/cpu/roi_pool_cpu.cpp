// CPU kernels of the deformable RoI pooling ops (deform_roi_pool, deform_psroi_pool) and their registration.
//
// roi_pool.h describes what both ops compute. The input is read channels-last per position-sensitive
// group, (B, H, W, G * G, C), in the compute dtype, so that every sample is a few contiguous,
// vectorisable rows of C values; a RoI's output and output gradient, (C, PH, PW), are transposed to
// (bins, C) in a small buffer. Each bin's samples are built once per task (per axis: the rows and
// columns it reads, their weights and slopes) and reused by all its channels. Work is split so that
// no two threads write the same element, and every element is summed in a fixed order, so results
// do not depend on the number of threads:
// - forward: one RoI per task;
// - input gradient: one (image, group, block of channels) per task, each looping over the image's
//   RoIs in index order;
// - offset gradient: one RoI per task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <span>
#include <tuple>
#include <vector>

#include "compute_dtype.h"
#include "roi_pool.h"

namespace dcn_plugin {
namespace {

// One RoI's geometry, read once from the RoI table.
template <typename acc_t>
struct RoiGeometry {
  int64_t batch = 0, grid_h = 0, grid_w = 0;
  acc_t y0 = 0, x0 = 0, bin_h = 0, bin_w = 0;
  acc_t step_y = 0, step_x = 0;          // between samples: bin size / grid
  acc_t dy_doffset = 0, dx_doffset = 0;  // d position / d offset: scale * RoI size
  acc_t inverse_full = 0;                // 1 / max(grid_h * grid_w, 1)
};

// The samples of one (RoI, class, bin): its valid rows and columns (validity is per axis). The
// vectors keep their capacity from bin to bin; the first ny and nx entries are the samples.
template <typename acc_t>
struct Bin {
  acc_t inverse_count = 0;  // 1 / the divisor of the average; 0 when nothing is averaged
  int64_t ny = 0, nx = 0;
  std::vector<AxisSample<acc_t>> ys, xs;

  std::span<const AxisSample<acc_t>> rows() const { return {ys.data(), size_t(ny)}; }
  std::span<const AxisSample<acc_t>> cols() const { return {xs.data(), size_t(nx)}; }
};

template <typename acc_t>
struct RoiSampler {
  const RoiPoolProblem& p;
  const acc_t* table;   // (R, kRoiColumns)
  const acc_t* offset;  // (R, classes, 2, part_h, part_w), or null
  // Per bin: its position-sensitive group and offset part.
  std::vector<int64_t> group_of_bin, part_of_bin;

  RoiSampler(const RoiPoolProblem& problem, const acc_t* table_, const acc_t* offset_)
      : p(problem), table(table_), offset(offset_) {
    const RoiPoolSpec& spec = p.spec;
    for (int64_t bin_index = 0; bin_index < spec.bins(); ++bin_index) {
      group_of_bin.push_back(spec.group_of(bin_index / spec.pooled_w, bin_index % spec.pooled_w));
      part_of_bin.push_back(spec.part_of(bin_index / spec.pooled_w, bin_index % spec.pooled_w));
    }
  }

  RoiGeometry<acc_t> geometry(int64_t roi) const {
    const RoiPoolSpec& spec = p.spec;
    const acc_t* t = table + roi * kRoiColumns;
    RoiGeometry<acc_t> g;
    g.batch = static_cast<int64_t>(t[kBatch]);
    g.grid_h = static_cast<int64_t>(t[kGridH]);
    g.grid_w = static_cast<int64_t>(t[kGridW]);
    g.y0 = t[kY0];
    g.x0 = t[kX0];
    g.bin_h = t[kHeight] / acc_t(spec.pooled_h);
    g.bin_w = t[kWidth] / acc_t(spec.pooled_w);
    g.step_y = g.bin_h / acc_t(std::max<int64_t>(g.grid_h, 1));
    g.step_x = g.bin_w / acc_t(std::max<int64_t>(g.grid_w, 1));
    g.dy_doffset = acc_t(spec.offset_scale) * t[kHeight];
    g.dx_doffset = acc_t(spec.offset_scale) * t[kWidth];
    g.inverse_full = acc_t(1) / acc_t(std::max<int64_t>(g.grid_h * g.grid_w, 1));
    return g;
  }

  // Fills `bin` for RoI `roi` (geometry `g`), offset class `cls` and bin (ph, pw).
  void build(const RoiGeometry<acc_t>& g, int64_t roi, int64_t cls, int64_t ph, int64_t pw, Bin<acc_t>& bin) const {
    const RoiPoolSpec& spec = p.spec;
    acc_t y0 = g.y0 + acc_t(ph) * g.bin_h, x0 = g.x0 + acc_t(pw) * g.bin_w;
    if (offset != nullptr) {
      const int64_t parts = spec.part_h * spec.part_w;
      const acc_t* off = offset + (roi * spec.classes + cls) * 2 * parts + part_of_bin[ph * spec.pooled_w + pw];
      x0 += off[0] * g.dx_doffset;
      y0 += off[parts] * g.dy_doffset;
    }
    bin.ny = fill(bin.ys, y0, g.step_y, g.grid_h, p.height);
    bin.nx = fill(bin.xs, x0, g.step_x, g.grid_w, p.width);
    if (!spec.counts_valid_only()) {
      bin.inverse_count = g.inverse_full;
    } else if (bin.ny == g.grid_h && bin.nx == g.grid_w) {
      bin.inverse_count = g.grid_h * g.grid_w > 0 ? g.inverse_full : acc_t(0);
    } else {
      const int64_t count = bin.ny * bin.nx;
      bin.inverse_count = count > 0 ? acc_t(1) / acc_t(count) : acc_t(0);
    }
  }

 private:
  // The valid samples start + (i + align) * step, i < n, along an axis of `extent` pixels; returns
  // how many.
  int64_t fill(std::vector<AxisSample<acc_t>>& out, acc_t start, acc_t step, int64_t n, int64_t extent) const {
    if (int64_t(out.size()) < n) out.resize(n);
    const acc_t align = acc_t(p.spec.align()), margin = acc_t(p.spec.margin());
    int64_t valid = 0;
    for (int64_t i = 0; i < n; ++i) {
      out[valid] = clamp_axis<acc_t>(start + (acc_t(i) + align) * step, extent, margin);
      valid += out[valid].valid;  // an invalid sample is overwritten by the next
    }
    return valid;
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

// One pixel a bin reads, in pixels of the (H, W) plane, and its weight.
template <typename acc_t>
struct Tap {
  int64_t pixel;
  acc_t weight;
};

// dst[c] += sum over taps of weight * src[pixel * stride + c], c < channels, each channel summed in
// tap order. The sums run in registers, kLanes channels at a time (independent sums the compiler
// vectorises), rather than as a load and store of dst per tap.
template <typename acc_t>
void sum_taps(const std::vector<Tap<acc_t>>& taps, const acc_t* __restrict src, int64_t stride, int64_t channels,
              acc_t* __restrict dst) {
  constexpr int64_t kLanes = 8;
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    acc_t sums[kLanes];
    for (int64_t lane = 0; lane < kLanes; ++lane) sums[lane] = dst[c + lane];
    for (const Tap<acc_t>& tap : taps) {
      const acc_t* __restrict row = src + tap.pixel * stride + c;
      for (int64_t lane = 0; lane < kLanes; ++lane) sums[lane] += tap.weight * row[lane];
    }
    for (int64_t lane = 0; lane < kLanes; ++lane) dst[c + lane] = sums[lane];
  }
  for (; c < channels; ++c) {
    acc_t sum = dst[c];
    for (const Tap<acc_t>& tap : taps) sum += tap.weight * src[tap.pixel * stride + c];
    dst[c] = sum;
  }
}

// rows[i][c - c0] = grad[c][bin_list[i]] for one RoI's (C, bins) gradient, channels [c0, c1). Reads
// in memory order (the gradient comes from memory; rows stays in cache).
template <typename acc_t>
void gather_bins(const acc_t* grad, int64_t bins, const std::vector<int64_t>& bin_list, int64_t c0, int64_t c1,
                 acc_t* rows) {
  const int64_t width = c1 - c0, count = int64_t(bin_list.size());
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t i = 0; i < count; ++i) rows[i * width + c - c0] = grad[c * bins + bin_list[i]];
  }
}

// out (R, C, PH, PW). Each task pools whole RoIs into a (bins, C) buffer, so that every sample reads
// contiguous channels, and writes it transposed.
template <typename acc_t>
void forward_kernel(const RoiPoolData<acc_t>& data, acc_t* out) {
  const RoiPoolProblem& p = data.p;
  const RoiPoolSpec& spec = p.spec;
  const int64_t bins = spec.bins(), per_class = p.channels_per_class();
  at::parallel_for(0, p.rois, 1, [&](int64_t begin, int64_t end) {
    Bin<acc_t> bin;
    std::vector<Tap<acc_t>> taps;
    std::vector<acc_t> rows(bins * p.channels);
    for (int64_t roi = begin; roi < end; ++roi) {
      const RoiGeometry<acc_t> g = data.sampler.geometry(roi);
      std::fill(rows.begin(), rows.end(), acc_t(0));
      for (int64_t bin_index = 0; bin_index < bins; ++bin_index) {
        const int64_t group = data.sampler.group_of_bin[bin_index];
        const int64_t ph = bin_index / spec.pooled_w, pw = bin_index % spec.pooled_w;
        for (int64_t cls = 0; cls < spec.classes; ++cls) {
          data.sampler.build(g, roi, cls, ph, pw, bin);
          taps.clear();
          for (const auto& y : bin.rows()) {
            for (const auto& x : bin.cols()) {
              for_corners(y, x, p.width, [&](int64_t pixel, acc_t w) { taps.push_back({pixel, w}); });
            }
          }
          const acc_t* __restrict src = data.at(data.input, g.batch, 0, group) + cls * per_class;
          acc_t* __restrict dst = rows.data() + bin_index * p.channels + cls * per_class;
          sum_taps(taps, src, data.pixel_stride, per_class, dst);
          for (int64_t c = 0; c < per_class; ++c) dst[c] *= bin.inverse_count;
        }
      }
      acc_t* out_roi = out + roi * p.channels * bins;
      for (int64_t c = 0; c < p.channels; ++c) {
        for (int64_t bin_index = 0; bin_index < bins; ++bin_index) {
          out_roi[c * bins + bin_index] = rows[bin_index * p.channels + c];
        }
      }
    }
  });
}

// The RoIs of each image, in index order: rois_of[starts[b] .. starts[b + 1]).
struct RoisByImage {
  std::vector<int64_t> rois_of, starts;
};

template <typename acc_t>
RoisByImage rois_by_image(const RoiPoolData<acc_t>& data) {
  const RoiPoolProblem& p = data.p;
  RoisByImage by_image{std::vector<int64_t>(p.rois), std::vector<int64_t>(p.batch + 1, 0)};
  std::vector<int64_t> batch_of(p.rois);
  for (int64_t roi = 0; roi < p.rois; ++roi) {
    batch_of[roi] = data.sampler.geometry(roi).batch;
    ++by_image.starts[batch_of[roi] + 1];
  }
  for (int64_t b = 0; b < p.batch; ++b) by_image.starts[b + 1] += by_image.starts[b];
  std::vector<int64_t> next(by_image.starts.begin(), by_image.starts.end() - 1);
  for (int64_t roi = 0; roi < p.rois; ++roi) by_image.rois_of[next[batch_of[roi]]++] = roi;
  return by_image;
}

// The offset gradient of one built bin of RoI `roi`, class `cls`, added to grad_offset
// (R, classes, 2, part_h, part_w); `grad` holds the bin's output gradient for the class's channels.
template <typename acc_t>
void add_offset_grad(const RoiPoolData<acc_t>& data, const RoiGeometry<acc_t>& g, int64_t roi, int64_t cls,
                     int64_t bin_index, const Bin<acc_t>& bin, const acc_t* __restrict grad, acc_t* grad_offset) {
  const RoiPoolProblem& p = data.p;
  const RoiPoolSpec& spec = p.spec;
  if (bin.inverse_count == acc_t(0)) return;
  const int64_t per_class = p.channels_per_class(), parts = spec.part_h * spec.part_w;
  const int64_t group = data.sampler.group_of_bin[bin_index];
  acc_t sum_x = 0, sum_y = 0;
  for (const auto& y : bin.rows()) {
    for (const auto& x : bin.cols()) {
      if (y.slope == acc_t(0) && x.slope == acc_t(0)) continue;
      auto row = [&](int64_t yy, int64_t xx) {
        return data.at(data.input, g.batch, yy * p.width + xx, group) + cls * per_class;
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
  acc_t* go = grad_offset + (roi * spec.classes + cls) * 2 * parts + data.sampler.part_of_bin[bin_index];
  go[0] += sum_x * bin.inverse_count * g.dx_doffset;
  go[parts] += sum_y * bin.inverse_count * g.dy_doffset;
}

// How the input gradient is split: one task per (image, group, block of channels), with blocks
// only when there are few images and groups.
struct GradTasks {
  int64_t groups = 1, block = 1, blocks = 1;

  explicit GradTasks(const RoiPoolProblem& p) : groups(p.spec.groups()) {
    const int64_t wanted = std::max<int64_t>(1, 4 * at::get_num_threads() / (p.batch * groups));
    block = std::max<int64_t>(16, (p.channels + wanted - 1) / wanted + 15) / 16 * 16;
    blocks = (p.channels + block - 1) / block;
  }
  int64_t count(const RoiPoolProblem& p) const { return p.batch * groups * blocks; }
};

// Whether the input-gradient tasks can also compute the offset gradient without two tasks writing
// one element: every task holds all channels, and every part's bins read one group.
template <typename acc_t>
bool offset_grad_fits(const RoiPoolData<acc_t>& data, const GradTasks& tasks) {
  const RoiPoolSpec& spec = data.p.spec;
  if (tasks.blocks != 1) return false;
  std::vector<int64_t> group_of_part(spec.part_h * spec.part_w, -1);
  for (int64_t bin_index = 0; bin_index < spec.bins(); ++bin_index) {
    int64_t& group = group_of_part[data.sampler.part_of_bin[bin_index]];
    if (group != -1 && group != data.sampler.group_of_bin[bin_index]) return false;
    group = data.sampler.group_of_bin[bin_index];
  }
  return true;
}

// grad_input (B, H, W, G * G, C), zeroed; grad_output (R, C, PH, PW). No two tasks write the same
// element, and each element is summed in RoI, bin and sample order. With grad_offset (zeroed; only
// where offset_grad_fits), the same pass adds the offset gradient, in the order offset_grad_kernel
// does.
template <typename acc_t>
void input_grad_kernel(const RoiPoolData<acc_t>& data, const GradTasks& tasks, const acc_t* grad_output,
                       acc_t* grad_input, acc_t* grad_offset) {
  const RoiPoolProblem& p = data.p;
  const RoiPoolSpec& spec = p.spec;
  const int64_t bins = spec.bins(), per_class = p.channels_per_class();
  const RoisByImage by_image = rois_by_image(data);
  std::vector<std::vector<int64_t>> bins_of_group(spec.groups());
  for (int64_t bin_index = 0; bin_index < bins; ++bin_index) {
    bins_of_group[data.sampler.group_of_bin[bin_index]].push_back(bin_index);
  }
  const int64_t block = tasks.block, blocks = tasks.blocks;
  at::parallel_for(0, tasks.count(p), 1, [&](int64_t begin, int64_t end) {
    Bin<acc_t> bin;
    std::vector<acc_t> rows;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / (spec.groups() * blocks), group = item / blocks % spec.groups();
      const int64_t c0 = item % blocks * block, c1 = std::min(c0 + block, p.channels);
      const std::vector<int64_t>& bin_list = bins_of_group[group];
      rows.resize(bin_list.size() * (c1 - c0));
      for (int64_t i = by_image.starts[image]; i < by_image.starts[image + 1]; ++i) {
        const int64_t roi = by_image.rois_of[i];
        const RoiGeometry<acc_t> g = data.sampler.geometry(roi);
        gather_bins(grad_output + roi * p.channels * bins, bins, bin_list, c0, c1, rows.data());
        for (size_t b = 0; b < bin_list.size(); ++b) {
          const int64_t ph = bin_list[b] / spec.pooled_w, pw = bin_list[b] % spec.pooled_w;
          for (int64_t cls = 0; cls < spec.classes; ++cls) {
            const int64_t from = std::max(c0, cls * per_class), to = std::min(c1, (cls + 1) * per_class);
            if (from >= to) continue;
            const acc_t* __restrict grad = rows.data() + b * (c1 - c0) + (from - c0);  // channels [from, to)
            data.sampler.build(g, roi, cls, ph, pw, bin);
            for (const auto& y : bin.rows()) {
              for (const auto& x : bin.cols()) {
                for_corners(y, x, p.width, [&](int64_t pixel, acc_t w) {
                  acc_t* __restrict dst = data.at(grad_input, image, pixel, group) + from;
                  const acc_t scale = w * bin.inverse_count;
                  for (int64_t c = 0; c < to - from; ++c) dst[c] += scale * grad[c];
                });
              }
            }
            if (grad_offset != nullptr) add_offset_grad(data, g, roi, cls, bin_list[b], bin, grad, grad_offset);
          }
        }
      }
    }
  });
}

// grad_offset (R, classes, 2, part_h, part_w), zeroed; grad_output (R, C, PH, PW). One RoI per task.
template <typename acc_t>
void offset_grad_kernel(const RoiPoolData<acc_t>& data, const acc_t* grad_output, acc_t* grad_offset) {
  const RoiPoolProblem& p = data.p;
  const RoiPoolSpec& spec = p.spec;
  const int64_t bins = spec.bins(), per_class = p.channels_per_class();
  std::vector<int64_t> all_bins(bins);
  for (int64_t bin_index = 0; bin_index < bins; ++bin_index) all_bins[bin_index] = bin_index;
  at::parallel_for(0, p.rois, 1, [&](int64_t begin, int64_t end) {
    Bin<acc_t> bin;
    std::vector<acc_t> rows(bins * p.channels);
    for (int64_t roi = begin; roi < end; ++roi) {
      const RoiGeometry<acc_t> g = data.sampler.geometry(roi);
      gather_bins(grad_output + roi * p.channels * bins, bins, all_bins, 0, p.channels, rows.data());
      for (int64_t bin_index = 0; bin_index < bins; ++bin_index) {
        const int64_t ph = bin_index / spec.pooled_w, pw = bin_index % spec.pooled_w;
        for (int64_t cls = 0; cls < spec.classes; ++cls) {
          data.sampler.build(g, roi, cls, ph, pw, bin);
          const acc_t* grad = rows.data() + bin_index * p.channels + cls * per_class;
          add_offset_grad(data, g, roi, cls, bin_index, bin, grad, grad_offset);
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
      p, RoiSampler<acc_t>(p, table.data_ptr<acc_t>(), offset.defined() ? offset.data_ptr<acc_t>() : nullptr)};
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
  at::Tensor out = at::empty(p.output_shape(), input.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "deform_roi_pool_cpu", [&] {
    forward_kernel<scalar_t>(make_data<scalar_t>(p, table, off, input_cl), out.data_ptr<scalar_t>());
  });
  return out.to(input.scalar_type());
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
  const at::Tensor grad_out = grad_output.to(dtype).contiguous();  // (R, C, PH, PW)
  const at::Tensor input_cl = need_offset ? channels_last(p, input, dtype) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dtype, "deform_roi_pool_backward_cpu", [&] {
    const RoiPoolData<scalar_t> data = make_data<scalar_t>(p, table, off, input_cl);
    const GradTasks tasks(p);
    const bool fused = need_input && need_offset && offset_grad_fits(data, tasks);
    at::Tensor grad_off = need_offset ? at::zeros(offset->sizes(), options) : at::Tensor();
    if (need_input) {
      at::Tensor grad = at::zeros({p.batch, p.height, p.width, p.spec.groups(), p.channels}, options);
      input_grad_kernel<scalar_t>(data, tasks, grad_out.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                  fused ? grad_off.data_ptr<scalar_t>() : nullptr);
      // (B, H, W, G * G, C) -> (B, C * G * G, H, W)
      grad_input = grad.permute({0, 4, 3, 1, 2}).reshape(input.sizes()).to(input.scalar_type()).contiguous();
    }
    if (need_offset) {
      if (!fused) offset_grad_kernel<scalar_t>(data, grad_out.data_ptr<scalar_t>(), grad_off.data_ptr<scalar_t>());
      grad_offset = grad_off.to(offset->scalar_type());
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
