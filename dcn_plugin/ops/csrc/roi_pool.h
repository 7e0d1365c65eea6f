// Deformable RoI pooling: one description that serves both ops, and the sampling rule they share.
//
// dcn_plugin::deform_roi_pool (mmcv's DeformRoIPool) and dcn_plugin::deform_psroi_pool (R-FCN's
// deformable position-sensitive RoI pooling) are the same computation with different rules:
// output (R, C_out, PH, PW); bin (ph, pw) of RoI r averages, for every output channel, the input
// sampled on a grid of points inside the bin, shifted by a learned offset scaled by the RoI's size.
//
// - Position-sensitive groups: the input has C_out * G * G channels, channel c_out * G * G + g,
//   and bin (ph, pw) reads group g = gh * G + gw with gh = ph * G / PH (integer division, clamped
//   to G - 1). G = 1 for mmcv's op.
// - Offsets (R, classes, 2, part_h, part_w), (x, y) in that order: output channel c belongs to
//   class c / (C_out / classes), bin (ph, pw) to part (ph * part_h / PH, pw * part_w / PW). mmcv's
//   op has one class and one part per bin; R-FCN's op is class-agnostic or per class, and
//   parts may be coarser than bins.
// - Per RoI (the RoI table, computed once by roi_table): batch index, the corner (y0, x0) and the
//   size (h, w) of the RoI in input pixels, and the samples per bin along each axis (grid_h, grid_w).
// - Bin (ph, pw) samples y = y0 + ph * h / PH + offset_y * scale * h + (i + align) * (h / PH) / grid_h
//   for i < grid_h (and likewise x), with align = 0.5 (mmcv: bin centres) or 0 (R-FCN: from the
//   bin's start), scale = gamma (mmcv) or trans_std (R-FCN).
// - Sampling is RoIAlign's clamped bilinear interpolation (see clamp_axis): a sample within
//   `margin` pixels of the image (1 for mmcv, 0.5 for R-FCN) is moved into the image and
//   interpolated; one farther out is invalid.
// - The bin's value is the sum of the valid samples divided by grid_h * grid_w (mmcv: invalid
//   samples count as zeros; at least 1) or by the number of valid samples (R-FCN; 0 when none).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace dcn_plugin {

enum class RoiRule { kMmcv, kRfcn };

// Columns of the RoI table, one row per RoI, in the compute dtype: the one definition of its layout.
// The Triton kernel reads the columns by name (dcn_plugin::_roi_table_columns).
enum RoiColumn : int64_t { kBatch, kY0, kX0, kHeight, kWidth, kGridH, kGridW, kRoiColumns };

constexpr const char* roi_column_name(RoiColumn column) {
  switch (column) {
    case kBatch: return "batch";
    case kY0: return "y0";
    case kX0: return "x0";
    case kHeight: return "height";
    case kWidth: return "width";
    case kGridH: return "grid_h";
    case kGridW: return "grid_w";
    case kRoiColumns: break;
  }
  return "";
}

struct RoiPoolSpec {
  RoiRule rule = RoiRule::kMmcv;
  int64_t pooled_h = 1, pooled_w = 1;
  int64_t group_size = 1;  // G: position-sensitive groups per side
  int64_t part_h = 1, part_w = 1;
  int64_t classes = 1;  // offset classes (1 without offsets)
  double spatial_scale = 1;
  int64_t sampling = 0;     // samples per bin and axis; 0: adaptive, ceil(bin size) (mmcv)
  double offset_scale = 0;  // gamma (mmcv) or trans_std (R-FCN)

  int64_t bins() const { return pooled_h * pooled_w; }
  int64_t groups() const { return group_size * group_size; }
  double align() const { return rule == RoiRule::kMmcv ? 0.5 : 0.0; }
  double margin() const { return rule == RoiRule::kMmcv ? 1.0 : 0.5; }
  bool counts_valid_only() const { return rule == RoiRule::kRfcn; }
  int64_t group_of(int64_t ph, int64_t pw) const {
    const int64_t gh = std::min(ph * group_size / pooled_h, group_size - 1);
    const int64_t gw = std::min(pw * group_size / pooled_w, group_size - 1);
    return gh * group_size + gw;
  }
  int64_t part_of(int64_t ph, int64_t pw) const { return (ph * part_h / pooled_h) * part_w + pw * part_w / pooled_w; }
};

// One checked call: the spec and the extents of its tensors.
struct RoiPoolProblem {
  RoiPoolSpec spec;
  const char* op = "";
  int64_t batch = 0, channels = 0, height = 0, width = 0;  // channels: C_out, per group
  int64_t rois = 0;
  bool has_offset = false;

  int64_t channels_per_class() const { return channels / spec.classes; }
  std::vector<int64_t> output_shape() const { return {rois, channels, spec.pooled_h, spec.pooled_w}; }
};

// The two ops' argument checks; grad_output is checked when given.
RoiPoolProblem describe_deform_roi_pool(const at::Tensor& input, const at::Tensor& rois,
                                        const std::optional<at::Tensor>& offset, at::IntArrayRef output_size,
                                        double spatial_scale, int64_t sampling_ratio, double gamma,
                                        const std::optional<at::Tensor>& grad_output);
RoiPoolProblem describe_deform_psroi_pool(const at::Tensor& input, const at::Tensor& rois,
                                          const std::optional<at::Tensor>& offset, double spatial_scale,
                                          int64_t output_dim, int64_t group_size, int64_t pooled_size,
                                          int64_t part_size, int64_t sample_per_part, double trans_std,
                                          const std::optional<at::Tensor>& grad_output);

// The (R, kRoiColumns) RoI table in the compute dtype, with ATen ops (any device). Checks that
// every batch index is an integer in [0, batch): with `host_check` by reading the RoIs on the host,
// which names the bad row (the CPU kernels); otherwise with a device-side assert
// (at::_assert_async), which on a GPU never waits for the device, so that the Triton driver needs
// no synchronisation and can be captured in a CUDA graph (on CPU tensors it raises at once).
at::Tensor roi_table(const RoiPoolProblem& p, const at::Tensor& rois, at::ScalarType dtype, bool host_check = true);

// One axis of a sample: RoIAlign's clamped bilinear interpolation. A position within `margin` of
// [0, size - 1] is valid; it is clamped into that range and reads `low` and `high` with weights
// 1 - frac and frac. `slope` is d frac / d position: 1 inside, 0 where the position was clamped.
template <typename acc_t>
struct AxisSample {
  bool valid = false;
  int64_t low = 0, high = 0;
  acc_t w_low = 0, w_high = 0, slope = 0;
};

template <typename acc_t>
inline AxisSample<acc_t> clamp_axis(acc_t pos, int64_t size, acc_t margin) {
  AxisSample<acc_t> sample;
  const acc_t last = acc_t(size - 1);
  sample.valid = pos >= -margin && pos <= last + margin;  // false for NaN
  if (!sample.valid) return sample;
  if (pos > 0 && pos < last) {
    sample.low = static_cast<int64_t>(std::floor(pos));
    sample.high = sample.low + 1;
    sample.w_high = pos - acc_t(sample.low);
    sample.slope = 1;
  } else {
    sample.low = sample.high = pos <= 0 ? 0 : size - 1;
  }
  sample.w_low = 1 - sample.w_high;
  return sample;
}

}  // namespace dcn_plugin
