// Schemas, argument checks and the CPU driver of dcn_plugin::deform_conv. (The CUDA kernels are
// Triton kernels registered from Python, dcn_plugin/ops/triton/, which run the same checks first.)
//
// The driver turns the op into matrix products over columns (see deform_conv.h for the roles of
// image and grid). With W viewed as (groups, C_grid / groups, C_image / groups * K):
//   convolution:  out = W @ im2col(in)              transposed:  out = col2im(W^T @ in)
// and the backward of both comes from one sampling pass and matrix products:
//   d weight  = dense @ im2col(image)^T            (dense: grad_out, or the transposed op's input)
//   d offset, d mask = coordinate gradients of sampling image, against W^T @ dense
//   d input   = col2im(W^T @ grad_out)  for convolution,  W @ im2col(grad_out)  for transposed.
// Work is cut into chunks whose columns fit the workspace limit: several whole images side by side
// (one matrix product for all of them) where they fit, otherwise runs of one image's grid points.
#include "deform_conv.h"

#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <sstream>
#include <vector>

namespace dcn_plugin {
namespace {

std::atomic<int64_t> g_workspace_limit{int64_t(256) << 20};

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

// Everything the driver needs to know about one call, after checking its arguments.
struct Problem {
  Geometry geometry;
  int64_t batch = 0;
  int64_t groups = 1;
  int64_t image_channels = 0;  // channels of the sampled tensor
  int64_t grid_channels = 0;   // channels of the dense tensor on the grid
  std::vector<int64_t> output_shape;
  std::vector<int64_t> image_shape;  // (C_image, *image_size)
};

void check_same(const at::Tensor& input, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == input.device(), "deform_conv: ", name, " is on ", other.device(),
              " but input is on ", input.device(), "; all tensors must be on the same device");
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), "deform_conv: ", name, " has dtype ",
              other.scalar_type(), " but input has dtype ", input.scalar_type(),
              "; all tensors must have the same dtype");
}

void check_grid_tensor(const at::Tensor& t, const char* name, int64_t per_group, const char* per_group_text,
                       const Problem& p, int64_t* groups_out) {
  const Geometry& g = p.geometry;
  const int64_t n = g.dims;
  TORCH_CHECK(t.dim() == n + 2, "deform_conv: ", name, " must have shape (batch, groups * ", per_group_text,
              ", *grid) with ", n, " grid dims, got shape ", shape_str(t.sizes()));
  TORCH_CHECK(t.size(0) == p.batch, "deform_conv: ", name, " has batch size ", t.size(0), " but input has ",
              p.batch);
  const int64_t channels = t.size(1);
  TORCH_CHECK(channels > 0 && channels % per_group == 0, "deform_conv: ", name, " has ", channels,
              " channels, which is not a positive multiple of ", per_group_text, " = ", per_group);
  const int64_t groups = channels / per_group;
  TORCH_CHECK(p.image_channels % groups == 0, "deform_conv: ", name, " has ", groups, " groups (", channels,
              " channels / ", per_group, "), which does not divide the ", p.image_channels,
              " channels being sampled");
  for (int64_t d = 0; d < n; ++d) {
    TORCH_CHECK(t.size(2 + d) == g.grid_size[d], "deform_conv: ", name, " has spatial shape ",
                shape_str(t.sizes().slice(2)), " but the ", "grid it must cover has shape ",
                shape_str(at::IntArrayRef(g.grid_size, n)));
  }
  *groups_out = groups;
}

void check_params(at::IntArrayRef values, int64_t n, const char* name, int64_t minimum) {
  TORCH_CHECK(static_cast<int64_t>(values.size()) == n, "deform_conv: ", name, " must have ", n,
              " values for a ", n, "d convolution, got ", shape_str(values));
  for (auto v : values) {
    TORCH_CHECK(v >= minimum, "deform_conv: ", name, " must be ", minimum > 0 ? "positive" : "non-negative",
                ", got ", shape_str(values));
  }
}

Problem describe(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                 at::IntArrayRef output_padding, int64_t groups) {
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
    TORCH_CHECK(weight.size(2 + d) > 0, "deform_conv: weight has an empty kernel, shape ",
                shape_str(weight.sizes()));
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
  p.batch = input.size(0);
  p.groups = groups;
  const int64_t in_channels = input.size(1);
  int64_t out_channels;
  if (transposed) {
    TORCH_CHECK(weight.size(0) == in_channels, "deform_conv: the transposed op's weight must have shape (in_channels=",
                in_channels, ", out_channels / groups, *kernel_size), got weight shape ", shape_str(weight.sizes()));
    TORCH_CHECK(in_channels % groups == 0, "deform_conv: groups=", groups, " does not divide the ", in_channels,
                " input channels");
    out_channels = weight.size(1) * groups;
    p.image_channels = out_channels;
    p.grid_channels = in_channels;
  } else {
    TORCH_CHECK(weight.size(1) * groups == in_channels, "deform_conv: weight of shape ", shape_str(weight.sizes()),
                " with groups=", groups, " expects ", weight.size(1) * groups, " input channels, but input has ",
                in_channels);
    out_channels = weight.size(0);
    TORCH_CHECK(out_channels % groups == 0, "deform_conv: groups=", groups, " does not divide the ",
                out_channels, " output channels of weight");
    p.image_channels = in_channels;
    p.grid_channels = out_channels;
  }

  Geometry& g = p.geometry;
  g.dims = n;
  g.channels = p.image_channels;
  p.output_shape = {p.batch, out_channels};
  p.image_shape = {p.image_channels};
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
    p.image_shape.push_back(g.image_size[d]);
  }
  int64_t s = 1;
  for (int64_t d = n - 1; d >= 0; --d) {
    g.image_stride[d] = s;
    s *= g.image_size[d];
  }
  const int64_t kernel_points = g.kernel_points();
  if (offset) {
    const std::string per = std::to_string(n) + " * K";
    check_grid_tensor(*offset, "offset", n * kernel_points, per.c_str(), p, &g.offset_groups);
  }
  if (mask) check_grid_tensor(*mask, "mask", kernel_points, "K", p, &g.mask_groups);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, "deform_conv: bias must have shape (",
                out_channels, ",), got ", shape_str(bias->sizes()));
  }
  return p;
}

// How the work is cut so that `column_buffers` column buffers and the primitives' own scratch fit
// the workspace limit: `points` grid points of one image per chunk (at least one), or, where whole
// images fit, `images` whole images per chunk, whose columns sit side by side so that one matrix
// product serves them all (small feature maps would otherwise make many tiny products).
struct Chunks {
  int64_t points;
  int64_t images;
};

Chunks plan_chunks(const Problem& p, at::ScalarType column_dtype, int64_t column_buffers) {
  const Geometry& g = p.geometry;
  const int64_t element = at::elementSize(column_dtype);
  const int64_t groups = std::max<int64_t>({g.offset_groups, g.mask_groups, 1});
  const int64_t corners = int64_t(1) << g.dims;
  // Column rows, plus a sampling table per group and kernel point (index, weight, gradients).
  const int64_t per_point = g.kernel_points() * (column_buffers * g.channels * element +
                                                 groups * corners * (8 + element * (1 + g.dims)));
  const int64_t capacity = std::max<int64_t>(1, workspace_limit() / std::max<int64_t>(per_point, 1));
  const int64_t points = g.grid_points();
  if (points > 0 && capacity >= points) return {points, std::max<int64_t>(1, std::min(p.batch, capacity / points))};
  return {std::min(capacity, std::max<int64_t>(points, 1)), 1};
}

// (n, C, L) -> (groups, C / groups, n * L): the grid-side operand of n images side by side.
at::Tensor images_side_by_side(const at::Tensor& t, int64_t groups) {
  const int64_t n = t.size(0), c = t.size(1), l = t.size(2);
  return t.view({n, groups, c / groups, l}).permute({1, 2, 0, 3}).reshape({groups, c / groups, n * l});
}

// The inverse for a product (groups, C / groups, n * L) written into `out` (n, C, L).
void copy_images_back(const at::Tensor& product, const at::Tensor& out) {
  const int64_t n = out.size(0), c = out.size(1), l = out.size(2);
  out.copy_(product.view({c, n, l}).transpose(0, 1));
}

// One channel per group on both sides: depthwise convolution.
bool is_depthwise(const Problem& p) {
  return p.groups > 1 && p.image_channels == p.groups && p.grid_channels == p.groups;
}

// Runs the pass over all grid points, `chunk` at a time (the depthwise path, which needs no columns).
void sample_in_chunks(const SamplingKernels& kernels, SamplePass& pass, int64_t chunk, int64_t points) {
  for (int64_t first = 0; first < points; first += chunk) {
    pass.first = first;
    pass.count = std::min(chunk, points - first);
    kernels.sample(pass);
  }
}

void check_grad_output(const Problem& p, const at::Tensor& input, const at::Tensor& grad_output) {
  check_same(input, grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(p.output_shape), "deform_conv_backward: grad_output has shape ",
              shape_str(grad_output.sizes()), " but the output has shape ", shape_str(p.output_shape));
}

at::Tensor per_image(const std::optional<at::Tensor>& t, int64_t b, at::ScalarType dtype, int64_t points) {
  if (!t) return at::Tensor();
  return (*t)[b].to(dtype).contiguous().view({-1, points});
}

}  // namespace

int64_t workspace_limit() { return g_workspace_limit.load(); }

at::Tensor deform_conv_forward(const SamplingKernels& kernels, const at::Tensor& input_, const at::Tensor& weight,
                               const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                               at::IntArrayRef output_padding, int64_t groups) {
  const Problem p = describe(input_, weight, offset, mask, bias, stride, padding, dilation, transposed,
                             output_padding, groups);
  const Geometry& g = p.geometry;
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty(p.output_shape, input.options());
  const auto column_dtype = kernels.column_dtype(input.scalar_type());
  const auto column_options = input.options().dtype(column_dtype);
  const bool same_dtype = column_dtype == input.scalar_type();
  const int64_t points = g.grid_points();
  const int64_t image_rows = p.image_channels * g.kernel_points();
  const int64_t rows_per_group = image_rows / groups;
  const int64_t grid_per_group = p.grid_channels / groups;
  const at::Tensor w = weight.to(column_dtype).contiguous().view({groups, grid_per_group, rows_per_group});
  const bool depthwise = is_depthwise(p);
  const Chunks chunks = plan_chunks(p, column_dtype, depthwise ? 0 : 1);
  const int64_t chunk = chunks.points;
  at::Tensor buffer =
      depthwise ? at::Tensor() : at::empty({image_rows * chunks.images * std::min(chunk, points)}, column_options);
  // Output of one image that the pass accumulates into: `out[b]`, or a buffer of the column dtype
  // copied back at the end.
  auto accumulator = [&](int64_t b) { return same_dtype ? out[b] : at::empty(out[b].sizes(), column_options); };

  if (depthwise) {
    for (int64_t b = 0; b < p.batch; ++b) {
      SamplePass pass{g};
      pass.offset = per_image(offset, b, column_dtype, points);
      pass.mask = per_image(mask, b, column_dtype, points);
      pass.depthwise_weight = w.view({groups, -1});
      at::Tensor dense_out = accumulator(b).zero_();
      if (!transposed) {
        pass.image = input[b].to(column_dtype);
        pass.dense_out = dense_out.view({groups, points});
      } else {
        pass.dense = input[b].to(column_dtype).view({groups, points});
        pass.grad_image = dense_out.view(p.image_shape);
      }
      sample_in_chunks(kernels, pass, chunk, points);
      if (!same_dtype) out[b].copy_(dense_out);
    }
  }
  for (int64_t b0 = 0; b0 < p.batch && !depthwise; b0 += chunks.images) {
    const int64_t n = std::min(chunks.images, p.batch - b0);
    std::vector<SamplePass> passes;
    passes.reserve(n);
    std::vector<at::Tensor> scattered(n);  // the transposed op's per-image output (col2im target)
    for (int64_t i = 0; i < n; ++i) {
      SamplePass& pass = passes.emplace_back(g);
      pass.offset = per_image(offset, b0 + i, column_dtype, points);
      pass.mask = per_image(mask, b0 + i, column_dtype, points);
      if (!transposed) {
        pass.image = input[b0 + i].to(column_dtype);
      } else {
        scattered[i] = accumulator(b0 + i).zero_();
        pass.grad_image = scattered[i];
      }
    }
    const at::Tensor out_n = transposed ? at::Tensor() : out.narrow(0, b0, n).view({n, p.grid_channels, points});
    const at::Tensor input_n = transposed ? input.narrow(0, b0, n).to(column_dtype).view({n, p.grid_channels, points})
                                          : at::Tensor();
    for (int64_t first = 0; first < points; first += chunk) {
      const int64_t count = std::min(chunk, points - first);
      const int64_t width = n * count;
      const at::Tensor columns = buffer.narrow(0, 0, image_rows * width).view({image_rows, width});
      at::Tensor grouped = columns.view({groups, rows_per_group, width});
      if (transposed) {
        // out = col2im(W^T @ input)
        at::bmm_out(grouped, w.transpose(1, 2), images_side_by_side(input_n.narrow(2, first, count), groups));
      }
      for (int64_t i = 0; i < n; ++i) {
        SamplePass& pass = passes[i];
        pass.first = first;
        pass.count = count;
        pass.column_stride = width;
        (transposed ? pass.grad_columns : pass.columns) = columns.narrow(1, i * count, count);
        kernels.sample(pass);
      }
      if (!transposed) {
        // out = W @ im2col(input)
        if (n == 1 && same_dtype && count == points) {
          at::Tensor target = out_n[0].view({groups, grid_per_group, points});
          at::bmm_out(target, w, grouped);
        } else {
          copy_images_back(at::bmm(w, grouped), out_n.narrow(2, first, count));
        }
      }
    }
    for (int64_t i = 0; i < n && transposed && !same_dtype; ++i) out[b0 + i].copy_(scattered[i]);
  }
  if (bias) {
    std::vector<int64_t> bias_shape(out.dim(), 1);
    bias_shape[1] = -1;
    out.add_(bias->view(bias_shape));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const SamplingKernels& kernels, const at::Tensor& grad_output_, const at::Tensor& input_,
    const at::Tensor& weight, const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
    at::IntArrayRef output_padding, int64_t groups, std::array<bool, 4> output_mask) {
  const Problem p = describe(input_, weight, offset, mask, std::nullopt, stride, padding, dilation, transposed,
                             output_padding, groups);
  const Geometry& g = p.geometry;
  check_grad_output(p, input_, grad_output_);
  const at::Tensor input = input_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const bool need_input = output_mask[0];
  const bool need_weight = output_mask[1];
  const bool need_offset = output_mask[2] && offset.has_value();
  const bool need_mask = output_mask[3] && mask.has_value();
  // d input of convolution is a scatter onto the image; of the transposed op, W @ im2col(grad_out).
  const bool scatter_input = need_input && !transposed;
  const bool need_columns = need_weight || (need_input && transposed);
  const bool need_grad_columns = need_offset || need_mask || scatter_input;

  const auto dtype = input.scalar_type();
  const auto column_dtype = kernels.column_dtype(dtype);
  const auto column_options = input.options().dtype(column_dtype);
  // Sums are made in the column dtype, straight into the gradients where that is their dtype.
  const bool accumulate_in_input = column_dtype == dtype;
  const int64_t points = g.grid_points();
  const int64_t image_rows = p.image_channels * g.kernel_points();
  const int64_t rows_per_group = image_rows / groups;
  const int64_t grid_per_group = p.grid_channels / groups;
  const at::Tensor w = weight.to(column_dtype).contiguous().view({groups, grid_per_group, rows_per_group});
  const at::Tensor& image_source = transposed ? grad_output : input;
  const at::Tensor& dense_source = transposed ? input : grad_output;

  // Gradients that are not asked for come back as empty tensors (distinct ones: outputs never alias).
  at::Tensor grad_input = need_input ? at::empty_like(input) : input.new_empty({0});
  at::Tensor grad_weight =
      need_weight ? at::zeros({groups, grid_per_group, rows_per_group}, column_options) : input.new_empty({0});
  at::Tensor grad_offset = need_offset ? at::zeros(offset->sizes(), column_options) : input.new_empty({0});
  at::Tensor grad_mask = need_mask ? at::zeros(mask->sizes(), column_options) : input.new_empty({0});
  if (!(need_input || need_weight || need_offset || need_mask)) return {grad_input, grad_weight, grad_offset, grad_mask};

  // Depthwise: the pass contracts columns with the weight itself (see SamplePass).
  const bool depthwise = is_depthwise(p);
  const bool materialise_columns = need_columns && !depthwise;
  const bool materialise_grad_columns = need_grad_columns && !depthwise;
  const Chunks chunks =
      plan_chunks(p, column_dtype, int64_t(materialise_columns) + int64_t(materialise_grad_columns));
  const int64_t chunk = chunks.points;
  const int64_t buffer_size = image_rows * chunks.images * std::min(chunk, points);
  at::Tensor column_buffer = materialise_columns ? at::empty({buffer_size}, column_options) : at::Tensor();
  at::Tensor grad_column_buffer =
      materialise_grad_columns ? at::empty({buffer_size}, column_options) : at::Tensor();
  // d input of the transposed op lives on the grid: W @ im2col(grad_out), a matrix product in the
  // column dtype (or, depthwise, a sum the pass accumulates).
  at::Tensor grad_dense;
  if (need_input && transposed) {
    grad_dense = accumulate_in_input ? grad_input : at::empty(grad_input.sizes(), column_options);
  }

  for (int64_t b0 = 0; b0 < p.batch; b0 += depthwise ? 1 : chunks.images) {
    const int64_t n = depthwise ? 1 : std::min(chunks.images, p.batch - b0);
    std::vector<SamplePass> passes;
    passes.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = b0 + i;
      SamplePass& pass = passes.emplace_back(g);
      pass.offset = per_image(offset, b, column_dtype, points);
      pass.mask = per_image(mask, b, column_dtype, points);
      if (need_columns || need_offset || need_mask) pass.image = image_source[b].to(column_dtype);
      if (need_offset) pass.grad_offset = grad_offset[b].view({-1, points});
      if (need_mask) pass.grad_mask = grad_mask[b].view({-1, points});
      if (scatter_input) {
        pass.grad_image = accumulate_in_input ? grad_input[b].zero_() : at::zeros(p.image_shape, column_options);
      }
    }
    const at::Tensor dense = dense_source.narrow(0, b0, n).to(column_dtype).view({n, p.grid_channels, points});
    if (depthwise) {
      SamplePass& pass = passes[0];
      pass.depthwise_weight = w.view({groups, -1});
      if (need_grad_columns || need_weight) pass.dense = dense[0].view({groups, points});
      if (need_weight) pass.grad_depthwise_weight = grad_weight.view({groups, -1});
      if (need_input && transposed) pass.dense_out = grad_dense[b0].view({groups, points}).zero_();
      sample_in_chunks(kernels, pass, chunk, points);
    }
    for (int64_t first = 0; first < points && !depthwise; first += chunk) {
      const int64_t count = std::min(chunk, points - first);
      const int64_t width = n * count;
      const at::Tensor dense_chunk = images_side_by_side(dense.narrow(2, first, count), groups);
      at::Tensor columns, grad_columns;
      if (need_grad_columns) {
        grad_columns = grad_column_buffer.narrow(0, 0, image_rows * width).view({image_rows, width});
        at::Tensor grouped = grad_columns.view({groups, rows_per_group, width});
        at::bmm_out(grouped, w.transpose(1, 2), dense_chunk);
      }
      if (need_columns) columns = column_buffer.narrow(0, 0, image_rows * width).view({image_rows, width});
      for (int64_t i = 0; i < n; ++i) {
        SamplePass& pass = passes[i];
        pass.first = first;
        pass.count = count;
        pass.column_stride = width;
        if (need_grad_columns) pass.grad_columns = grad_columns.narrow(1, i * count, count);
        if (need_columns) pass.columns = columns.narrow(1, i * count, count);
        kernels.sample(pass);
      }
      if (need_columns) {
        const at::Tensor grouped = columns.view({groups, rows_per_group, width});
        if (need_weight) grad_weight.baddbmm_(dense_chunk, grouped.transpose(1, 2));
        if (need_input && transposed) {
          copy_images_back(at::bmm(w, grouped),
                           grad_dense.narrow(0, b0, n).view({n, p.grid_channels, points}).narrow(2, first, count));
        }
      }
    }
    for (int64_t i = 0; i < n && scatter_input && !accumulate_in_input; ++i) {
      grad_input[b0 + i].copy_(passes[i].grad_image);
    }
  }
  if (need_input && transposed && !grad_dense.is_same(grad_input)) grad_input.copy_(grad_dense);
  if (need_weight) grad_weight = grad_weight.view(weight.sizes()).to(dtype);
  if (need_offset) grad_offset = grad_offset.to(dtype);
  if (need_mask) grad_mask = grad_mask.to(dtype);
  return {grad_input, grad_weight, grad_offset, grad_mask};
}

namespace {

// The argument checks of both ops, for kernels that live outside C++ (the Triton kernels check
// their arguments with this before anything else). grad_output is checked when given.
void check_arguments(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                     const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                     at::IntArrayRef output_padding, int64_t groups, const std::optional<at::Tensor>& grad_output) {
  const Problem p =
      describe(input, weight, offset, mask, bias, stride, padding, dilation, transposed, output_padding, groups);
  if (grad_output) check_grad_output(p, input, *grad_output);
}

int64_t set_workspace_limit(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "set_workspace_limit: bytes must be positive, got ", bytes);
  return g_workspace_limit.exchange(bytes);
}

}  // namespace

TORCH_LIBRARY(dcn_plugin, m) {
  m.def(
      "deform_conv(Tensor input, Tensor weight, Tensor? offset, Tensor? mask, Tensor? bias, int[] stride, "
      "int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups) -> Tensor");
  m.def(
      "deform_conv_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor? offset, Tensor? mask, "
      "int[] stride, int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_check_arguments(Tensor input, Tensor weight, Tensor? offset, Tensor? mask, Tensor? bias, int[] stride, "
      "int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups, Tensor? grad_output) -> ()",
      &check_arguments);
  m.def("_set_workspace_limit(int bytes) -> int", &set_workspace_limit);
  m.def("_workspace_limit() -> int", &workspace_limit);
}

}  // namespace dcn_plugin

// Importing dcn_plugin._C loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
