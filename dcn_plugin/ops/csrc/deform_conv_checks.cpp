// The argument checks of dcn_plugin::deform_conv (deform_conv_checks.h), shared by the CPU and CUDA kernels.
#include "deform_conv_checks.h"

#include <sstream>
#include <string>

namespace dcn_plugin {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

void check_same(const at::Tensor& input, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == input.device(), "deform_conv: ", name, " is on ", other.device(), " but input is on ",
              input.device(), "; all tensors must be on the same device");
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), "deform_conv: ", name, " has dtype ", other.scalar_type(),
              " but input has dtype ", input.scalar_type(), "; all tensors must have the same dtype");
}

void check_grid_tensor(const at::Tensor& t, const char* name, int64_t per_group, const char* per_group_text,
                       const Problem& p, int64_t* groups_out) {
  const Geometry& g = p.geometry;
  const int64_t n = g.dims;
  TORCH_CHECK(t.dim() == n + 2, "deform_conv: ", name, " must have shape (batch, groups * ", per_group_text,
              ", *grid) with ", n, " grid dims, got shape ", shape_str(t.sizes()));
  TORCH_CHECK(t.size(0) == p.batch, "deform_conv: ", name, " has batch size ", t.size(0), " but input has ", p.batch);
  const int64_t channels = t.size(1);
  TORCH_CHECK(channels > 0 && channels % per_group == 0, "deform_conv: ", name, " has ", channels,
              " channels, which is not a positive multiple of ", per_group_text, " = ", per_group);
  const int64_t groups = channels / per_group;
  TORCH_CHECK(p.image_channels() % groups == 0, "deform_conv: ", name, " has ", groups, " groups (", channels,
              " channels / ", per_group, "), which does not divide the ", p.image_channels(),
              " channels being sampled");
  for (int64_t d = 0; d < n; ++d) {
    TORCH_CHECK(t.size(2 + d) == g.grid_size[d], "deform_conv: ", name, " has spatial shape ",
                shape_str(t.sizes().slice(2)), " but the ", "grid it must cover has shape ",
                shape_str(at::IntArrayRef(g.grid_size, n)));
  }
  *groups_out = groups;
}

void check_params(at::IntArrayRef values, int64_t n, const char* name, int64_t minimum) {
  TORCH_CHECK(static_cast<int64_t>(values.size()) == n, "deform_conv: ", name, " must have ", n, " values for a ", n,
              "d convolution, got ", shape_str(values));
  for (auto v : values) {
    TORCH_CHECK(v >= minimum, "deform_conv: ", name, " must be ", minimum > 0 ? "positive" : "non-negative", ", got ",
                shape_str(values));
  }
}

}  // namespace

Problem describe(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                 int64_t groups) {
  TORCH_CHECK(weight.dim() >= 3 && weight.dim() <= 2 + kMaxDims,
              "deform_conv: weight must have 3, 4 or 5 dims (out, in / groups, *kernel_size), got shape ",
              shape_str(weight.sizes()));
  const int64_t n = weight.dim() - 2;
  TORCH_CHECK(input.dim() == n + 2, "deform_conv: input must have shape (batch, channels, *", n,
              " spatial dims) for a weight of shape ", shape_str(weight.sizes()), ", got shape ",
              shape_str(input.sizes()));
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "deform_conv: input must be a floating-point tensor, got ",
              input.scalar_type());
  check_same(input, weight, "weight");
  if (offset) check_same(input, *offset, "offset");
  if (mask) check_same(input, *mask, "mask");
  if (bias) check_same(input, *bias, "bias");
  check_params(stride, n, "stride", 1);
  check_params(padding, n, "padding", 0);
  check_params(dilation, n, "dilation", 1);
  check_params(output_padding, n, "output_padding", 0);
  TORCH_CHECK(groups > 0, "deform_conv: groups must be positive, got ", groups);
  for (int64_t d = 0; d < n; ++d) {
    TORCH_CHECK(weight.size(2 + d) > 0, "deform_conv: weight has an empty kernel, shape ", shape_str(weight.sizes()));
    if (transposed) {
      TORCH_CHECK(output_padding[d] < stride[d] || output_padding[d] < dilation[d],
                  "deform_conv: output_padding must be smaller than stride or dilation, got output_padding ",
                  shape_str(output_padding), ", stride ", shape_str(stride), ", dilation ", shape_str(dilation));
    } else {
      TORCH_CHECK(output_padding[d] == 0, "deform_conv: output_padding is only for the transposed op, got ",
                  shape_str(output_padding));
    }
  }

  Problem p;
  Geometry& g = p.geometry;
  p.batch = input.size(0);
  p.groups = groups;
  const int64_t in_channels = input.size(1);
  int64_t out_channels;
  if (transposed) {
    TORCH_CHECK(weight.size(0) == in_channels,
                "deform_conv: the transposed op's weight must have shape (in_channels=", in_channels,
                ", out_channels / groups, *kernel_size), got weight shape ", shape_str(weight.sizes()));
    TORCH_CHECK(in_channels % groups == 0, "deform_conv: groups=", groups, " does not divide the ", in_channels,
                " input channels");
    out_channels = weight.size(1) * groups;
    g.channels = out_channels;
    p.grid_channels = in_channels;
  } else {
    TORCH_CHECK(weight.size(1) * groups == in_channels, "deform_conv: weight of shape ", shape_str(weight.sizes()),
                " with groups=", groups, " expects ", weight.size(1) * groups, " input channels, but input has ",
                in_channels);
    out_channels = weight.size(0);
    TORCH_CHECK(out_channels % groups == 0, "deform_conv: groups=", groups, " does not divide the ", out_channels,
                " output channels of weight");
    g.channels = in_channels;
    p.grid_channels = out_channels;
  }

  g.dims = n;
  p.output_shape = {p.batch, out_channels};
  for (int64_t d = 0; d < n; ++d) {
    const int64_t k = weight.size(2 + d);
    const int64_t in_size = input.size(2 + d);
    const int64_t span = dilation[d] * (k - 1);
    int64_t out_size;
    if (transposed) {
      out_size = (in_size - 1) * stride[d] - 2 * padding[d] + span + output_padding[d] + 1;
      g.image_size[d] = out_size;
      g.grid_size[d] = in_size;
    } else {
      out_size = (in_size + 2 * padding[d] - span - 1) / stride[d] + 1;
      TORCH_CHECK(in_size + 2 * padding[d] - span - 1 >= 0, "deform_conv: input spatial shape ",
                  shape_str(input.sizes().slice(2)), " with padding ", shape_str(padding), " is smaller than the ",
                  "dilated kernel (weight shape ", shape_str(weight.sizes()), ", dilation ", shape_str(dilation), ")");
      g.image_size[d] = in_size;
      g.grid_size[d] = out_size;
    }
    TORCH_CHECK(out_size > 0 && in_size > 0, "deform_conv: output spatial size would be non-positive (input ",
                shape_str(input.sizes().slice(2)), ", weight ", shape_str(weight.sizes()), ", stride ",
                shape_str(stride), ", padding ", shape_str(padding), ", dilation ", shape_str(dilation), ")");
    g.kernel_size[d] = k;
    g.stride[d] = stride[d];
    g.padding[d] = padding[d];
    g.dilation[d] = dilation[d];
    p.output_shape.push_back(out_size);
  }
  int64_t points = 1;
  for (int64_t d = n - 1; d >= 0; --d) {
    g.image_stride[d] = points;
    points *= g.image_size[d];
  }
  const int64_t kernel_points = g.kernel_points();
  if (offset) {
    const std::string per = std::to_string(n) + " * K";
    check_grid_tensor(*offset, "offset", n * kernel_points, per.c_str(), p, &g.offset_groups);
  }
  if (mask) check_grid_tensor(*mask, "mask", kernel_points, "K", p, &g.mask_groups);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, "deform_conv: bias must have shape (", out_channels,
                ",), got ", shape_str(bias->sizes()));
  }
  return p;
}

void check_grad_output(const Problem& p, const at::Tensor& input, const at::Tensor& grad_output) {
  check_same(input, grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(p.output_shape), "deform_conv_backward: grad_output has shape ",
              shape_str(grad_output.sizes()), " but the output has shape ", shape_str(p.output_shape));
}

}  // namespace dcn_plugin
