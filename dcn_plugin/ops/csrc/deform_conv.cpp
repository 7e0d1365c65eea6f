// Schemas, argument checks and the CPU driver of dcn_plugin::deform_conv. (The CUDA kernels are
// Triton kernels registered from Python, dcn_plugin/ops/triton/, which run the same checks first.)
//
// The driver turns the op into matrix products and sampling sweeps (sweep.h), all channels-last:
// the sampled image is (B, *image_size, C_image), the tensors on the grid are (B * L, C) matrices
// of grid rows, and a chunk of grid rows has columns (rows, K * C_image) per group. With the weight
// W viewed as (groups, C_grid / groups, K * C_image / groups):
//   convolution:  out = im2col(in) @ W^T           transposed:  out = col2im(in @ W)
// and the backward of both comes from sweeps and matrix products:
//   d W      = dense^T @ im2col(image)            (dense: grad_out, or the transposed op's input)
//   d offset, d mask = coordinate gradients of sampling image, against dense @ W
//   d input  = col2im(grad_out @ W)  for convolution,  im2col(grad_out) @ W^T  for transposed.
// Depthwise convolution (one channel per group) leaves a matrix product nothing to amortise the
// columns over, so its sweeps contract with the weight themselves. Work is cut into chunks of grid
// rows whose columns fit the workspace limit. Inputs may come in any layout; outputs take the
// layout torch's convolution would give.
#include "deform_conv.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
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

void check_grad_output(const Problem& p, const at::Tensor& input, const at::Tensor& grad_output) {
  check_same(input, grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(p.output_shape), "deform_conv_backward: grad_output has shape ",
              shape_str(grad_output.sizes()), " but the output has shape ", shape_str(p.output_shape));
}

// One channel per group on both sides: depthwise convolution.
bool is_depthwise(const Problem& p) {
  return p.groups > 1 && p.image_channels == p.groups && p.grid_channels == p.groups;
}

// ------------------------------------------------------------------------------------------------
// Layouts

// Half types are sampled, multiplied and summed in float32 on the CPU.
at::ScalarType column_dtype(at::ScalarType dtype) { return at::isReducedFloatingType(dtype) ? at::kFloat : dtype; }

// `t` in memory format `format` and dtype `dtype`: itself when it already is.
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat format, at::ScalarType dtype) {
  if (t.is_contiguous(format) && t.scalar_type() == dtype) return t;
  return at::empty(t.sizes(), t.options().dtype(dtype).memory_format(format)).copy_(t);
}

// `t`, contiguous (B, M, N), as (B, N, M) contiguous.
at::Tensor transposed(const SamplingKernels& kernels, const at::Tensor& t) {
  at::Tensor out = at::empty({t.size(0), t.size(2), t.size(1)}, t.options());
  if (out.numel() > 0) {
    kernels.transpose(t.scalar_type(), t.const_data_ptr(), out.data_ptr(), t.size(0), t.size(1), t.size(2));
  }
  return out;
}

// (B, C, *S) in any layout -> (B, *S, C), contiguous: a view of a channels-last tensor.
at::Tensor to_channels_last(const SamplingKernels& kernels, const at::Tensor& t, at::ScalarType dtype) {
  const at::Tensor moved = t.movedim(1, -1);
  if (moved.is_contiguous() && t.scalar_type() == dtype) return moved;
  if (t.is_contiguous() && t.scalar_type() == dtype) {
    const int64_t points = c10::multiply_integers(t.sizes().slice(2));
    return transposed(kernels, t.view({t.size(0), t.size(1), points})).view(moved.sizes());
  }
  return in_format(moved, at::MemoryFormat::Contiguous, dtype);
}

// (B, *S, C) contiguous -> (B, C, *S) in `format`: a view where that is channels-last.
at::Tensor from_channels_last(const SamplingKernels& kernels, const at::Tensor& t, at::MemoryFormat format,
                              at::ScalarType dtype) {
  const at::Tensor moved = t.movedim(-1, 1);
  if (format == at::MemoryFormat::Contiguous && t.scalar_type() == dtype && !moved.is_contiguous()) {
    const int64_t points = c10::multiply_integers(t.sizes().slice(1, t.dim() - 2));
    return transposed(kernels, t.view({t.size(0), points, t.size(-1)})).view(moved.sizes());
  }
  return in_format(moved, format, dtype);
}

// torch's convolution gives a channels-last output when its input or its weight is channels-last.
at::MemoryFormat output_format(const at::Tensor& input, const at::Tensor& weight) {
  const at::MemoryFormat format = input.suggest_memory_format();
  return format != at::MemoryFormat::Contiguous ? format : weight.suggest_memory_format();
}

// A zero gradient for `t` in the column dtype, laid out as `t` suggests (so its grid dims merge).
at::Tensor zero_gradient(const at::Tensor& t, at::ScalarType dtype) {
  return at::empty(t.sizes(), t.options().dtype(dtype).memory_format(t.suggest_memory_format())).zero_();
}

GridTensor grid_tensor(const at::Tensor& t) {
  if (!t.defined()) return {};
  const at::Tensor flat = t.flatten(2);  // (B, Q, L): a view of the tensors given here
  TORCH_INTERNAL_ASSERT(flat.data_ptr() == t.data_ptr());
  return {flat.data_ptr(), flat.stride(0), flat.stride(1), flat.stride(2)};
}

// ------------------------------------------------------------------------------------------------
// Matrix products

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

std::optional<c10::TypedOperatorHandle<LinearFn>> onednn_linear() {
  const auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
  return handle->typed<LinearFn>();
}

// a @ b^T for a (M, K) and b (N, K). In float32 this is oneDNN's inner product where torch has it
// (the primitive behind torch.compile's CPU linear): on the shapes of issue 12 it matches torch's
// own convolution, where MKL's sgemm is 5-50% slower. MKL (at::mm) everywhere else.
at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& b) {
  static const auto onednn = onednn_linear();
  if (onednn && a.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 &&
      at::globalContext().userEnabledMkldnn()) {
    return onednn->call(a.contiguous(), b, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  return at::mm(a, b.t());
}

// (rows, groups * N) whose group g is columns[g] @ w[g]^T, for columns (groups, rows, K), w (groups, N, K).
at::Tensor columns_times(const at::Tensor& columns, const at::Tensor& w) {
  const int64_t groups = w.size(0);
  if (groups == 1) return matmul_nt(columns[0], w[0]);
  std::vector<at::Tensor> parts;
  for (int64_t g = 0; g < groups; ++g) parts.push_back(matmul_nt(columns[g], w[g]));
  return at::cat(parts, 1);
}

// (groups, rows, K) whose group g is dense_g @ w_t[g]^T, for dense (rows, groups * N), w_t (groups, K, N).
at::Tensor dense_times(const at::Tensor& dense, const at::Tensor& w_t) {
  const int64_t groups = w_t.size(0), n = w_t.size(2);
  if (groups == 1) return matmul_nt(dense, w_t[0]).unsqueeze(0);
  std::vector<at::Tensor> parts;
  for (int64_t g = 0; g < groups; ++g) parts.push_back(matmul_nt(dense.narrow(1, g * n, n), w_t[g]));
  return at::stack(parts);
}

// grad_w[g] += dense_g^T @ columns[g].
void add_weight_gradient(const SamplingKernels& kernels, const at::Tensor& grad_w, const at::Tensor& dense,
                         const at::Tensor& columns) {
  const int64_t groups = grad_w.size(0), n = grad_w.size(1);
  if (groups == 1) {
    grad_w[0].add_(matmul_nt(transposed(kernels, dense.unsqueeze(0))[0], columns[0].t()));
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    grad_w[g].add_(matmul_nt(dense.narrow(1, g * n, n).t().contiguous(), columns[g].t()));
  }
}

// ------------------------------------------------------------------------------------------------
// The steps

// What the steps of one call share: the problem, the column dtype, the offset and mask.
struct Call {
  const Problem& p;
  const Geometry& g;
  const at::ScalarType dtype;      // of columns, products and sums
  const at::TensorOptions options;
  const int64_t K, L, rows;        // rows: the B * L grid points of the batch
  const at::Tensor offset, mask;   // in the column dtype

  Call(const Problem& p_, const at::Tensor& input, const std::optional<at::Tensor>& offset_,
       const std::optional<at::Tensor>& mask_)
      : p(p_),
        g(p_.geometry),
        dtype(column_dtype(input.scalar_type())),
        options(input.options().dtype(dtype)),
        K(g.kernel_points()),
        L(g.grid_points()),
        rows(p_.batch * g.grid_points()),
        offset(offset_ ? offset_->to(dtype) : at::Tensor()),
        mask(mask_ ? mask_->to(dtype) : at::Tensor()) {}

  Chunk chunk(int64_t row_begin, int64_t row_end) const {
    Chunk c;
    c.geometry = &g;
    c.dtype = dtype;
    c.row_begin = row_begin;
    c.row_end = row_end;
    c.groups = p.groups;
    c.offset = grid_tensor(offset);
    c.mask = grid_tensor(mask);
    return c;
  }

  // Grid rows per chunk: enough for an efficient product, few chunks (each costs a round of
  // products and, where a chunk splits an image, per-thread scatter buffers), few enough that the
  // chunk's `buffers` column buffers stay in the last-level cache between the sweep and the
  // product, and within the workspace limit. 16 MiB was measured at 2 threads (32 MiB L3), in one
  // process against 4 MiB, forward+backward / F.conv: 8x64x32² 2.0x vs 3.7x, 16x128x8² 1.6x vs
  // 2.2x, 2x256x25² 1.4x vs 1.5x, 2x128x50² 1.6x vs 2.0x; the DCNv2 quick-start training step
  // 1.33x vs 1.49x the plain one.
  int64_t chunk_rows(int64_t buffers) const {
    constexpr int64_t kCacheBytes = int64_t(16) << 20, kMinRows = 256;
    const int64_t per_row = buffers * K * p.image_channels * int64_t(at::elementSize(dtype));
    const int64_t all = std::max<int64_t>(rows, 1);
    if (per_row == 0) return all;
    const int64_t rows_wanted = std::max(kMinRows, kCacheBytes / per_row);
    return std::clamp<int64_t>(std::min(rows_wanted, workspace_limit() / per_row), 1, all);
  }

  at::Tensor columns(int64_t count) const {
    return at::empty({p.groups, count, K * p.image_channels / p.groups}, options);
  }

  // The weight as the columns see it: (groups, C_grid / groups, K * C_image / groups), each row laid
  // out (K, C_image / groups) like a row of columns.
  at::Tensor column_weight(const at::Tensor& weight) const {
    return weight.to(dtype).movedim(1, -1).contiguous().view(
        {p.groups, p.grid_channels / p.groups, K * p.image_channels / p.groups});
  }

  at::Tensor depthwise_weight(const at::Tensor& weight) const {  // (K, C)
    return weight.to(dtype).reshape({p.groups, K}).t().contiguous();
  }

  // Channels-last shapes of the image and of the grid-side tensors: (B, *size, C).
  std::vector<int64_t> image_shape() const { return shape(g.image_size, p.image_channels); }
  std::vector<int64_t> grid_shape() const { return shape(g.grid_size, p.grid_channels); }

 private:
  std::vector<int64_t> shape(const int64_t* size, int64_t channels) const {
    std::vector<int64_t> s{p.batch};
    s.insert(s.end(), size, size + g.dims);
    s.push_back(channels);
    return s;
  }
};

at::Tensor im2col(const SamplingKernels& kernels, const Call& c, const at::Tensor& image, int64_t r0, int64_t r1) {
  at::Tensor columns = c.columns(r1 - r0);
  Chunk chunk = c.chunk(r0, r1);
  chunk.image = image.data_ptr();
  chunk.columns = columns.data_ptr();
  kernels.sweep(chunk, Sweep::im2col());
  return columns;
}

// out = im2col(image) @ W^T, chunk by chunk: (B * L, C_grid).
at::Tensor convolve(const SamplingKernels& kernels, const Call& c, const at::Tensor& image, const at::Tensor& w) {
  const int64_t step = c.chunk_rows(1);
  if (step >= c.rows) return columns_times(im2col(kernels, c, image, 0, c.rows), w);
  at::Tensor out = at::empty({c.rows, c.p.grid_channels}, c.options);
  for (int64_t r0 = 0; r0 < c.rows; r0 += step) {
    const int64_t r1 = std::min(c.rows, r0 + step);
    out.narrow(0, r0, r1 - r0).copy_(columns_times(im2col(kernels, c, image, r0, r1), w));
  }
  return out;
}

// out = col2im(dense @ W), chunk by chunk: (B, *image_size, C_image).
at::Tensor convolve_transposed(const SamplingKernels& kernels, const Call& c, const at::Tensor& dense,
                               const at::Tensor& w) {
  at::Tensor out = at::zeros(c.image_shape(), c.options);
  const at::Tensor w_t = w.transpose(1, 2).contiguous();
  const int64_t step = c.chunk_rows(1);
  for (int64_t r0 = 0; r0 < c.rows; r0 += step) {
    const int64_t r1 = std::min(c.rows, r0 + step);
    const at::Tensor grad_columns = dense_times(dense.narrow(0, r0, r1 - r0), w_t);
    Chunk chunk = c.chunk(r0, r1);
    chunk.grad_columns = grad_columns.data_ptr();
    chunk.grad_image = out.data_ptr();
    kernels.sweep(chunk, Sweep::col2im());
  }
  return out;
}

// out = sum over k of weight[k] * sample(image): (B * L, C).
at::Tensor depthwise_forward(const SamplingKernels& kernels, const Call& c, const at::Tensor& image,
                             const at::Tensor& weight) {
  at::Tensor out = at::zeros({c.rows, c.p.grid_channels}, c.options);
  Chunk chunk = c.chunk(0, c.rows);
  chunk.image = image.data_ptr();
  chunk.depthwise_weight = weight.data_ptr();
  chunk.dense_out = out.data_ptr();
  kernels.sweep(chunk, Sweep::depthwise());
  return out;
}

// out = col2im(weight[k] * dense): (B, *image_size, C).
at::Tensor depthwise_transposed(const SamplingKernels& kernels, const Call& c, const at::Tensor& dense,
                                const at::Tensor& weight) {
  at::Tensor out = at::zeros(c.image_shape(), c.options);
  Chunk chunk = c.chunk(0, c.rows);
  chunk.dense = dense.data_ptr();
  chunk.depthwise_weight = weight.data_ptr();
  chunk.grad_image = out.data_ptr();
  kernels.sweep(chunk, Sweep::depthwise_col2im());
  return out;
}

// The column weight's gradient back in weight's shape: (C_grid, *kernel, C_image / groups) viewed
// as (C_grid, C_image / groups, *kernel).
at::Tensor weight_from_columns(const at::Tensor& w, const at::Tensor& weight) {
  std::vector<int64_t> shape{weight.size(0)};
  for (int64_t d = 2; d < weight.dim(); ++d) shape.push_back(weight.size(d));
  shape.push_back(weight.size(1));
  return w.view(shape).movedim(-1, 1);
}

struct Wanted {
  bool input, weight, offset, mask;
  bool coordinates() const { return offset || mask; }
};

// The gradients as the steps make them, in the column dtype: input channels-last (image-shaped for
// convolution, grid-shaped for the transposed op), weight as the steps' weight, offset and mask as
// zero_gradient lays them out.
struct Gradients {
  at::Tensor input, weight, offset, mask;

  void attach(Chunk& chunk) const {
    chunk.grad_offset = grid_tensor(offset);
    chunk.grad_mask = grid_tensor(mask);
  }
};

// d W = dense^T @ im2col(image); d offset, d mask against dense @ W; d input = col2im(dense @ W)
// for convolution and im2col(image) @ W^T for the transposed op. One sweep per chunk gathers the
// samples once for all of them.
void column_backward(const SamplingKernels& kernels, const Call& c, bool transposed, const Wanted& want,
                     const at::Tensor& image, const at::Tensor& dense, const at::Tensor& w, Gradients& grads) {
  const bool col2im = want.input && !transposed;
  const bool columns = want.weight || (want.input && transposed);
  const bool grad_columns = col2im || want.coordinates();
  if (col2im) grads.input = at::zeros(c.image_shape(), c.options);
  if (want.input && transposed) grads.input = at::empty({c.rows, c.p.grid_channels}, c.options);
  if (want.weight) grads.weight = at::zeros_like(w);
  const at::Tensor w_t = w.transpose(1, 2).contiguous();
  const int64_t step = c.chunk_rows(int64_t(columns) + int64_t(grad_columns));
  for (int64_t r0 = 0; r0 < c.rows; r0 += step) {
    const int64_t r1 = std::min(c.rows, r0 + step), n = r1 - r0;
    const at::Tensor dense_rows = dense.narrow(0, r0, n);
    const at::Tensor gcols = grad_columns ? dense_times(dense_rows, w_t) : at::Tensor();
    const at::Tensor cols = columns ? c.columns(n) : at::Tensor();
    Chunk chunk = c.chunk(r0, r1);
    grads.attach(chunk);
    if (image.defined()) chunk.image = image.data_ptr();
    if (col2im) chunk.grad_image = grads.input.data_ptr();
    if (gcols.defined()) chunk.grad_columns = gcols.data_ptr();
    if (cols.defined()) chunk.columns = cols.data_ptr();
    if (want.coordinates()) {
      kernels.sweep(chunk, Sweep::gradients(columns, col2im));
    } else {
      if (columns) kernels.sweep(chunk, Sweep::im2col());
      if (col2im) kernels.sweep(chunk, Sweep::col2im());
    }
    if (want.weight) add_weight_gradient(kernels, grads.weight, dense_rows, cols);
    if (want.input && transposed) grads.input.narrow(0, r0, n).copy_(columns_times(cols, w));
  }
}

// d weight (and d offset, d mask) in one sweep; d input by the depthwise forward of the other role.
void depthwise_backward(const SamplingKernels& kernels, const Call& c, bool transposed, const Wanted& want,
                        const at::Tensor& image, const at::Tensor& dense, const at::Tensor& weight,
                        Gradients& grads) {
  if (want.weight || want.coordinates()) {
    grads.weight = at::zeros_like(weight);  // a scratch sum when only coordinates are wanted
    Chunk chunk = c.chunk(0, c.rows);
    grads.attach(chunk);
    chunk.image = image.data_ptr();
    chunk.dense = dense.data_ptr();
    chunk.depthwise_weight = weight.data_ptr();
    chunk.grad_depthwise_weight = grads.weight.data_ptr();
    kernels.sweep(chunk, Sweep::depthwise_gradients(want.coordinates()));
  }
  if (want.input) {
    grads.input = transposed ? depthwise_forward(kernels, c, image, weight)
                             : depthwise_transposed(kernels, c, dense, weight);
  }
}

}  // namespace

int64_t workspace_limit() { return g_workspace_limit.load(); }

at::Tensor deform_conv_forward(const SamplingKernels& kernels, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                               at::IntArrayRef output_padding, int64_t groups) {
  const Problem p = describe(input, weight, offset, mask, bias, stride, padding, dilation, transposed,
                             output_padding, groups);
  const Call c(p, input, offset, mask);
  const at::Tensor x = to_channels_last(kernels, input, c.dtype);
  at::Tensor out;
  if (is_depthwise(p)) {
    const at::Tensor w = c.depthwise_weight(weight);
    out = transposed ? depthwise_transposed(kernels, c, x, w) : depthwise_forward(kernels, c, x, w);
  } else {
    const at::Tensor w = c.column_weight(weight);
    out = transposed ? convolve_transposed(kernels, c, x.view({c.rows, p.grid_channels}), w) : convolve(kernels, c, x, w);
  }
  out = from_channels_last(kernels, out.view(transposed ? c.image_shape() : c.grid_shape()),
                           output_format(input, weight), input.scalar_type());
  if (bias) {
    std::vector<int64_t> bias_shape(out.dim(), 1);
    bias_shape[1] = -1;
    out.add_(bias->view(bias_shape));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const SamplingKernels& kernels, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
    at::IntArrayRef output_padding, int64_t groups, std::array<bool, 4> output_mask) {
  const Problem p = describe(input, weight, offset, mask, std::nullopt, stride, padding, dilation, transposed,
                             output_padding, groups);
  check_grad_output(p, input, grad_output);
  const Wanted want{output_mask[0], output_mask[1], output_mask[2] && offset.has_value(),
                    output_mask[3] && mask.has_value()};
  // Gradients that are not asked for come back as empty tensors (distinct ones: outputs never alias).
  std::array<at::Tensor, 4> result;
  for (at::Tensor& r : result) r = input.new_empty({0});
  if (!(want.input || want.weight || want.coordinates())) return std::make_tuple(result[0], result[1], result[2], result[3]);

  const Call c(p, input, offset, mask);
  Gradients grads;
  if (want.offset) grads.offset = zero_gradient(*offset, c.dtype);
  if (want.mask) grads.mask = zero_gradient(*mask, c.dtype);
  // The sampled tensor and the dense one on the grid, channels-last.
  const bool sampled = want.weight || want.coordinates() || (want.input && transposed);
  const at::Tensor image =
      sampled ? to_channels_last(kernels, transposed ? grad_output : input, c.dtype) : at::Tensor();
  const at::Tensor dense =
      to_channels_last(kernels, transposed ? input : grad_output, c.dtype).view({c.rows, p.grid_channels});
  if (is_depthwise(p)) {
    depthwise_backward(kernels, c, transposed, want, image, dense, c.depthwise_weight(weight), grads);
  } else {
    column_backward(kernels, c, transposed, want, image, dense, c.column_weight(weight), grads);
  }

  const at::ScalarType dtype = input.scalar_type();
  if (want.input) {
    const at::Tensor cl = grads.input.view(transposed ? c.grid_shape() : c.image_shape());
    result[0] = from_channels_last(kernels, cl, input.suggest_memory_format(), dtype);
  }
  if (want.weight) {
    const at::Tensor w = is_depthwise(p) ? grads.weight.t().reshape(weight.sizes()) : weight_from_columns(grads.weight, weight);
    result[1] = in_format(w, weight.suggest_memory_format(), dtype);
  }
  if (want.offset) result[2] = grads.offset.to(dtype);
  if (want.mask) result[3] = grads.mask.to(dtype);
  return std::make_tuple(result[0], result[1], result[2], result[3]);
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
