// Schemas, argument checks and the RoI table of the deformable RoI pooling ops (roi_pool.h).
//
// The CPU kernels are in cpu/roi_pool_cpu.cpp; the CUDA kernels are Triton kernels registered from
// Python (dcn_plugin/ops/triton/roi_pool.py), which run these checks and build the same table
// through the _deform_roi_pool_table / _deform_psroi_pool_table ops.
#include "roi_pool.h"

#include <torch/library.h>

#include "compute_dtype.h"

namespace dcn_plugin {
namespace {

void check_same(const char* op, const at::Tensor& input, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == input.device(), op, ": ", name, " is on ", other.device(), " but input is on ",
              input.device(), "; all tensors must be on the same device");
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", other.scalar_type(),
              " but input has dtype ", input.scalar_type(), "; they must be the same");
}

void check_positive(const char* op, int64_t value, const char* name) {
  TORCH_CHECK(value > 0, op, ": ", name, " must be positive, got ", value);
}

// The checks both ops share: input (B, C, H, W), rois (R, 5), grad_output of the output's shape.
RoiPoolProblem describe_common(const char* op, const at::Tensor& input, const at::Tensor& rois,
                               const std::optional<at::Tensor>& offset, double spatial_scale) {
  TORCH_CHECK(input.dim() == 4, op, ": input must have shape (batch, channels, height, width), got shape ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op, ": input must be a floating-point tensor, got ",
              input.scalar_type());
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0, op, ": input must have a non-empty spatial size, got shape ",
              input.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": rois must have shape (R, 5), rows [batch_index, x1, y1, x2, y2], got shape ", rois.sizes());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), op, ": rois must be a floating-point tensor, got ",
              rois.scalar_type());
  TORCH_CHECK(rois.device() == input.device(), op, ": rois is on ", rois.device(), " but input is on ", input.device(),
              "; all tensors must be on the same device");
  if (offset) check_same(op, input, *offset, "offset");
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0, op, ": spatial_scale must be positive, got ",
              spatial_scale);
  RoiPoolProblem p;
  p.op = op;
  p.batch = input.size(0);
  p.height = input.size(2);
  p.width = input.size(3);
  p.rois = rois.size(0);
  p.has_offset = offset.has_value();
  p.spec.spatial_scale = spatial_scale;
  return p;
}

void check_offset_shape(const RoiPoolProblem& p, const at::Tensor& offset, const char* expected) {
  const RoiPoolSpec& spec = p.spec;
  TORCH_CHECK(offset.dim() == 4 && offset.size(0) == p.rois && offset.size(1) == 2 * spec.classes &&
                  offset.size(2) == spec.part_h && offset.size(3) == spec.part_w,
              p.op, ": offset must have shape ", expected, ", got shape ", offset.sizes());
}

void check_grad_output(const RoiPoolProblem& p, const at::Tensor& input, const std::optional<at::Tensor>& grad) {
  if (!grad) return;
  check_same(p.op, input, *grad, "grad_output");
  TORCH_CHECK(grad->sizes() == at::IntArrayRef(p.output_shape()), p.op, "_backward: grad_output has shape ",
              grad->sizes(), " but the output has shape ", at::IntArrayRef(p.output_shape()));
}

// C's round (halves away from zero), which R-FCN applies to RoI coordinates.
at::Tensor round_half_away(const at::Tensor& t) { return at::sign(t) * at::floor(at::abs(t) + 0.5); }

}  // namespace

RoiPoolProblem describe_deform_roi_pool(const at::Tensor& input, const at::Tensor& rois,
                                        const std::optional<at::Tensor>& offset, at::IntArrayRef output_size,
                                        double spatial_scale, int64_t sampling_ratio, double gamma,
                                        const std::optional<at::Tensor>& grad_output) {
  const char* op = "deform_roi_pool";
  RoiPoolProblem p = describe_common(op, input, rois, offset, spatial_scale);
  TORCH_CHECK(output_size.size() == 2, op, ": output_size must have 2 values (height, width), got ", output_size);
  check_positive(op, output_size[0], "output_size[0] (height)");
  check_positive(op, output_size[1], "output_size[1] (width)");
  TORCH_CHECK(sampling_ratio >= 0, op, ": sampling_ratio must be non-negative (0: adaptive), got ", sampling_ratio);
  TORCH_CHECK(std::isfinite(gamma), op, ": gamma must be finite, got ", gamma);
  RoiPoolSpec& spec = p.spec;
  spec.rule = RoiRule::kMmcv;
  spec.pooled_h = spec.part_h = output_size[0];
  spec.pooled_w = spec.part_w = output_size[1];
  spec.sampling = sampling_ratio;
  spec.offset_scale = gamma;
  p.channels = input.size(1);
  if (offset) {
    const std::string expected = "(R=" + std::to_string(p.rois) + ", 2, " + std::to_string(spec.pooled_h) + ", " +
                                 std::to_string(spec.pooled_w) + ")";
    check_offset_shape(p, *offset, expected.c_str());
  }
  check_grad_output(p, input, grad_output);
  return p;
}

RoiPoolProblem describe_deform_psroi_pool(const at::Tensor& input, const at::Tensor& rois,
                                          const std::optional<at::Tensor>& offset, double spatial_scale,
                                          int64_t output_dim, int64_t group_size, int64_t pooled_size,
                                          int64_t part_size, int64_t sample_per_part, double trans_std,
                                          const std::optional<at::Tensor>& grad_output) {
  const char* op = "deform_psroi_pool";
  RoiPoolProblem p = describe_common(op, input, rois, offset, spatial_scale);
  check_positive(op, output_dim, "output_dim");
  check_positive(op, group_size, "group_size");
  check_positive(op, pooled_size, "pooled_size");
  check_positive(op, part_size, "part_size");
  check_positive(op, sample_per_part, "sample_per_part");
  TORCH_CHECK(std::isfinite(trans_std), op, ": trans_std must be finite, got ", trans_std);
  const int64_t groups = group_size * group_size;
  TORCH_CHECK(input.size(1) == output_dim * groups, op, ": input must have output_dim * group_size^2 = ", output_dim,
              " * ", group_size, "^2 = ", output_dim * groups, " channels, got ", input.size(1));
  RoiPoolSpec& spec = p.spec;
  spec.rule = RoiRule::kRfcn;
  spec.pooled_h = spec.pooled_w = pooled_size;
  spec.group_size = group_size;
  spec.part_h = spec.part_w = part_size;
  spec.sampling = sample_per_part;
  spec.offset_scale = trans_std;
  p.channels = output_dim;
  if (offset) {
    TORCH_CHECK(offset->dim() == 4 && offset->size(1) > 0 && offset->size(1) % 2 == 0, op,
                ": offset must have shape (R, 2 * classes, part_size, part_size), got shape ", offset->sizes());
    spec.classes = offset->size(1) / 2;
    TORCH_CHECK(output_dim % spec.classes == 0, op, ": offset has ", spec.classes, " classes (", offset->size(1),
                " channels / 2), which does not divide output_dim = ", output_dim);
    const std::string expected = "(R=" + std::to_string(p.rois) +
                                 ", 2 * classes, part_size=" + std::to_string(part_size) +
                                 ", part_size=" + std::to_string(part_size) + ")";
    check_offset_shape(p, *offset, expected.c_str());
  }
  check_grad_output(p, input, grad_output);
  return p;
}

at::Tensor roi_table(const RoiPoolProblem& p, const at::Tensor& rois_, at::ScalarType dtype, bool host_check) {
  const RoiPoolSpec& spec = p.spec;
  const at::Tensor rois = rois_.to(dtype);
  const at::Tensor index = rois.select(1, 0);
  if (p.rois > 0) {
    const at::Tensor bad = (index < 0).logical_or(index >= p.batch).logical_or(index != at::trunc(index));
    if (!host_check) {
      const std::string message = std::string(p.op) + ": column 0 of rois must hold batch indices of the input, " +
                                  "integers in [0, " + std::to_string(p.batch) + ")";
      at::_assert_async(bad.logical_not().all(), message);
    } else if (bad.any().item<bool>()) {
      const int64_t row = bad.to(at::kInt).argmax().item<int64_t>();
      TORCH_CHECK(false, p.op, ": rois[", row, ", 0] = ", rois_[row][0].item<double>(),
                  " is not a batch index of the input: column 0 of rois must hold integers in [0, ", p.batch,
                  ") for an input of batch size ", p.batch);
    }
  }
  const double scale = spec.spatial_scale;
  at::Tensor x0, y0, width, height;
  if (spec.rule == RoiRule::kMmcv) {
    // Half-pixel alignment: pixel i covers [i - 0.5, i + 0.5) in input coordinates.
    x0 = rois.select(1, 1) * scale - 0.5;
    y0 = rois.select(1, 2) * scale - 0.5;
    width = rois.select(1, 3) * scale - 0.5 - x0;
    height = rois.select(1, 4) * scale - 0.5 - y0;
  } else {
    // R-FCN: corners rounded to whole pixels of the image, the end pixel included, at least 0.1 wide.
    const at::Tensor rounded = round_half_away(rois);
    x0 = rounded.select(1, 1) * scale - 0.5;
    y0 = rounded.select(1, 2) * scale - 0.5;
    width = ((rounded.select(1, 3) + 1) * scale - 0.5 - x0).clamp_min(0.1);
    height = ((rounded.select(1, 4) + 1) * scale - 0.5 - y0).clamp_min(0.1);
  }
  auto grid = [&](const at::Tensor& size, int64_t pooled) {
    if (spec.sampling > 0) return at::full_like(size, static_cast<double>(spec.sampling));
    // mmcv: ceil(size / pooled) samples, none for an empty (or inverted, or non-finite) RoI.
    return at::nan_to_num(at::ceil(size / static_cast<double>(pooled)), 0, 0, 0).clamp_min(0);
  };
  std::vector<at::Tensor> columns(kRoiColumns);
  columns[kBatch] = index;
  columns[kY0] = y0;
  columns[kX0] = x0;
  columns[kHeight] = height;
  columns[kWidth] = width;
  columns[kGridH] = grid(height, spec.pooled_h);
  columns[kGridW] = grid(width, spec.pooled_w);
  return at::stack(columns, 1).contiguous();
}

namespace {

// For the Triton kernels: the op's checks, then its RoI table, checked with a device-side assert (no
// synchronisation on a GPU).
at::Tensor deform_roi_pool_table(const at::Tensor& input, const at::Tensor& rois,
                                 const std::optional<at::Tensor>& offset, at::IntArrayRef output_size,
                                 double spatial_scale, int64_t sampling_ratio, double gamma,
                                 const std::optional<at::Tensor>& grad_output) {
  const RoiPoolProblem p =
      describe_deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, grad_output);
  return roi_table(p, rois, compute_dtype(input.scalar_type()), /*host_check=*/false);
}

at::Tensor deform_psroi_pool_table(const at::Tensor& input, const at::Tensor& rois,
                                   const std::optional<at::Tensor>& offset, double spatial_scale, int64_t output_dim,
                                   int64_t group_size, int64_t pooled_size, int64_t part_size, int64_t sample_per_part,
                                   double trans_std, const std::optional<at::Tensor>& grad_output) {
  const RoiPoolProblem p = describe_deform_psroi_pool(input, rois, offset, spatial_scale, output_dim, group_size,
                                                      pooled_size, part_size, sample_per_part, trans_std, grad_output);
  return roi_table(p, rois, compute_dtype(input.scalar_type()), /*host_check=*/false);
}

// The names of the RoI table's columns, in column order.
std::vector<std::string> roi_table_columns() {
  std::vector<std::string> names;
  for (int64_t column = 0; column < kRoiColumns; ++column) names.push_back(roi_column_name(RoiColumn(column)));
  return names;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dcn_plugin, m) {
  m.def(
      "deform_roi_pool(Tensor input, Tensor rois, Tensor? offset, int[2] output_size, float spatial_scale, "
      "int sampling_ratio, float gamma) -> Tensor");
  m.def(
      "deform_roi_pool_backward(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, int[2] output_size, "
      "float spatial_scale, int sampling_ratio, float gamma, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "deform_psroi_pool(Tensor input, Tensor rois, Tensor? offset, float spatial_scale, int output_dim, "
      "int group_size, int pooled_size, int part_size, int sample_per_part, float trans_std) -> Tensor");
  m.def(
      "deform_psroi_pool_backward(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, "
      "float spatial_scale, int output_dim, int group_size, int pooled_size, int part_size, int sample_per_part, "
      "float trans_std, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "_deform_roi_pool_table(Tensor input, Tensor rois, Tensor? offset, int[2] output_size, float spatial_scale, "
      "int sampling_ratio, float gamma, Tensor? grad_output) -> Tensor",
      &deform_roi_pool_table);
  m.def(
      "_deform_psroi_pool_table(Tensor input, Tensor rois, Tensor? offset, float spatial_scale, int output_dim, "
      "int group_size, int pooled_size, int part_size, int sample_per_part, float trans_std, "
      "Tensor? grad_output) -> Tensor",
      &deform_psroi_pool_table);
  m.def("_roi_table_columns() -> str[]", &roi_table_columns);
}

}  // namespace dcn_plugin
