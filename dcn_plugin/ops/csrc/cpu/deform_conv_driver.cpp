// The CPU driver of dcn_plugin::deform_conv (deform_conv_driver.h): layouts, thread parts and the steps.
//
// The driver turns the op into matrix products and sampling sweeps (sweep.h), all channels-last:
// the sampled image is (B, *image_size, C_image), the tensors on the grid are (B * L, C) matrices
// of grid rows, and a panel of grid rows has columns (rows, K * C_image) per group. With the weight
// W viewed as (groups, C_grid / groups, K * C_image / groups):
//   convolution:  out = im2col(in) @ W^T           transposed:  out = col2im(in @ W)
// and the backward of both comes from sweeps and matrix products:
//   d W      = dense^T @ im2col(image)            (dense: grad_out, or the transposed op's input)
//   d offset, d mask = coordinate gradients of sampling image, against dense @ W
//   d input  = col2im(grad_out @ W)  for convolution,  im2col(grad_out) @ W^T  for transposed.
// Depthwise convolution (one channel per group) leaves a matrix product nothing to amortise the
// columns over, so its sweeps contract with the weight themselves. Each thread takes a part of the
// grid rows and works through it in panels: a sweep fills the panel's columns, and the thread's
// own (single-threaded) products consume them while they are still in its core's cache. Inputs
// may come in any layout; outputs take the layout torch's convolution would give.
#include "cpu/deform_conv_driver.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "compute_dtype.h"
#include "cpu/products.h"
#include "deform_conv.h"
#include "deform_conv_checks.h"

namespace dcn_plugin {
namespace {

// One channel per group on both sides: depthwise convolution.
bool is_depthwise(const Problem& p) {
  return p.groups > 1 && p.image_channels() == p.groups && p.grid_channels == p.groups;
}

// ------------------------------------------------------------------------------------------------
// Layouts

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

// `t` as a tensor of its own (the same memory, no copy) when it is a view of an internal buffer:
// autograd forbids in-place changes of a custom op's outputs that are views, such as a
// ReLU(inplace=True) after the layer.
at::Tensor owning(const at::Tensor& t) {
  if (!t.is_view()) return t;
  return at::empty({0}, t.options()).set_(t.storage(), t.storage_offset(), t.sizes(), t.strides());
}

// torch's convolution gives a channels-last output when its input or its weight is channels-last.
at::MemoryFormat output_format(const at::Tensor& input, const at::Tensor& weight) {
  const at::MemoryFormat format = input.suggest_memory_format();
  return format != at::MemoryFormat::Contiguous ? format : weight.suggest_memory_format();
}

// A zero gradient for `t` in the compute dtype, laid out as `t` suggests (so its grid dims merge).
at::Tensor zero_gradient(const at::Tensor& t, at::ScalarType dtype) {
  return at::empty(t.sizes(), t.options().dtype(dtype).memory_format(t.suggest_memory_format())).zero_();
}

GridTensor grid_tensor(const at::Tensor& t) {
  if (!t.defined()) return {};
  const at::Tensor flat = t.flatten(2);  // (B, C, L): a view of the tensors given here
  TORCH_INTERNAL_ASSERT(flat.data_ptr() == t.data_ptr());
  return {flat.data_ptr(), flat.stride(0), flat.stride(1), flat.stride(2)};
}

// The sum of `terms`, added in their order.
at::Tensor sum_in_order(const std::vector<at::Tensor>& terms) {
  at::Tensor sum = terms.front();
  for (size_t t = 1; t < terms.size(); ++t) sum.add_(terms[t]);
  return sum;
}

// ------------------------------------------------------------------------------------------------
// The steps

// What the steps of one call share: the problem, the compute dtype, the offset and mask.
struct Call {
  const Problem& p;
  const Geometry& g;
  const at::ScalarType dtype;  // of columns, products and sums
  const at::TensorOptions options;
  const int64_t K, L, rows;       // rows: the B * L grid points of the batch
  const at::Tensor offset, mask;  // in the compute dtype

  Call(const Problem& p_, const at::Tensor& input, const std::optional<at::Tensor>& offset_,
       const std::optional<at::Tensor>& mask_)
      : p(p_),
        g(p_.geometry),
        dtype(compute_dtype(input.scalar_type())),
        options(input.options().dtype(dtype)),
        K(g.kernel_points()),
        L(g.grid_points()),
        rows(p_.batch * g.grid_points()),
        offset(offset_ ? offset_->to(dtype) : at::Tensor()),
        mask(mask_ ? mask_->to(dtype) : at::Tensor()) {}

  Chunk chunk(int64_t row_begin, int64_t row_end) const {
    Chunk out;
    out.geometry = &g;
    out.dtype = dtype;
    out.row_begin = row_begin;
    out.row_end = row_end;
    out.groups = p.groups;
    out.offset = grid_tensor(offset);
    out.mask = grid_tensor(mask);
    return out;
  }

  // Grid rows per panel: a thread's `buffers` column buffers for one panel fit in about a core's
  // L2 cache, so the columns a sweep writes are still there for the products that read them; at
  // least 128 rows, as the products read the whole weight once per panel (at 16x256x4² the
  // backward took 1.99x conv with 64 rows, 1.76x with 128); within the workspace limit. 1 MiB
  // against 0.5, 2 and 4 MiB at 2 threads (tools/benchmark.py): no size was better on every case.
  int64_t panel_rows(int64_t buffers) const {
    constexpr int64_t kPanelBytes = int64_t(1) << 20, kMinRows = 128;
    const int64_t per_row = std::max<int64_t>(1, buffers * K * p.image_channels() * int64_t(at::elementSize(dtype)));
    const int64_t wanted = std::max(kMinRows, kPanelBytes / per_row);
    return std::clamp<int64_t>(std::min(wanted, workspace_limit() / per_row), 1, std::max<int64_t>(rows, 1));
  }

  // A thread's column buffer for panels of `panel` rows, and its first `count` rows as columns
  // (groups, count, K * C_image / groups).
  at::Tensor column_buffer(int64_t panel) const { return at::empty({panel * K * p.image_channels()}, options); }
  at::Tensor columns(const at::Tensor& buffer, int64_t count) const {
    return buffer.narrow(0, 0, count * K * p.image_channels())
        .view({p.groups, count, K * p.image_channels() / p.groups});
  }

  // The weight as the columns see it: (groups, C_grid / groups, K * C_image / groups), each row laid
  // out (K, C_image / groups) like a row of columns.
  at::Tensor column_weight(const at::Tensor& weight) const {
    return weight.to(dtype).movedim(1, -1).contiguous().view(
        {p.groups, p.grid_channels / p.groups, K * p.image_channels() / p.groups});
  }

  at::Tensor depthwise_weight(const at::Tensor& weight) const {  // (K, C)
    return weight.to(dtype).reshape({p.groups, K}).t().contiguous();
  }

  // Channels-last shapes of the image and of the grid-side tensors: (B, *size, C).
  std::vector<int64_t> image_shape() const { return shape(g.image_size, p.image_channels()); }
  std::vector<int64_t> grid_shape() const { return shape(g.grid_size, p.grid_channels); }

 private:
  std::vector<int64_t> shape(const int64_t* size, int64_t channels) const {
    std::vector<int64_t> s{p.batch};
    s.insert(s.end(), size, size + g.dims);
    s.push_back(channels);
    return s;
  }
};

// A run of grid rows that one thread sweeps and multiplies, panel by panel, and where its scatter
// onto the image writes: `scatter` holds images first_image, first_image + 1, ...
struct Part {
  int64_t row_begin = 0, row_end = 0;
  at::Tensor scatter;
  int64_t first_image = 0;

  void attach(Chunk& chunk) const {
    if (!scatter.defined()) return;
    chunk.grad_image = scatter.data_ptr();
    chunk.grad_image_first = first_image;
  }

  // f(r0, r1) for the panels of at most `panel` rows, in order.
  template <typename F>
  void for_each_panel(int64_t panel, F&& f) const {
    for (int64_t r0 = row_begin; r0 < row_end; r0 += panel) f(r0, std::min(row_end, r0 + panel));
  }
};

// The batch's grid rows split among the threads, one part each. Parts write disjoint rows; sums
// are kept per part and added in part order, so results are deterministic for a thread count.
// With a scatter target (B, *image_size, C), parts own whole images where there are at least as
// many images as parts; otherwise each part but the first scatters into a private zeroed copy of
// the images it touches, added to the target in part order by finish(). At most `max_count` parts.
class Parts {
 public:
  explicit Parts(const Call& call, const at::Tensor& scatter = at::Tensor(),
                 int64_t max_count = std::numeric_limits<int64_t>::max())
      : target_(scatter) {
    constexpr int64_t kMinSamples = 4096;  // channel samples per part, worth a thread
    const int64_t batch = call.p.batch, L = call.L;
    const int64_t work = call.rows * call.K * call.p.image_channels();
    int64_t count = std::clamp<int64_t>(work / kMinSamples, 1, std::max(1, at::get_num_threads()));
    count = std::clamp<int64_t>(std::min(count, call.rows), 1, std::max<int64_t>(max_count, 1));
    if (scatter.defined() && batch >= count) {
      for (int64_t index = 0; index < count; ++index) {
        parts_.push_back({batch * index / count * L, batch * (index + 1) / count * L, scatter, 0});
      }
      return;
    }
    if (scatter.defined()) {  // private copies: within the workspace limit
      const int64_t image_bytes = scatter.numel() / std::max<int64_t>(batch, 1) * scatter.element_size();
      const int64_t images_per_part = call.rows / count / std::max<int64_t>(L, 1) + 2;
      count =
          std::clamp<int64_t>(workspace_limit() / std::max<int64_t>(1, image_bytes * images_per_part) + 1, 1, count);
    }
    for (int64_t index = 0; index < count; ++index) {
      Part part{call.rows * index / count, call.rows * (index + 1) / count};
      if (scatter.defined()) {
        const int64_t first = part.row_begin / L, last = (part.row_end - 1) / L;
        part.scatter = index == 0 ? scatter : at::zeros({last - first + 1, scatter.numel() / batch}, scatter.options());
        part.first_image = index == 0 ? 0 : first;
      }
      parts_.push_back(part);
    }
  }

  int64_t size() const { return static_cast<int64_t>(parts_.size()); }

  // f(index, part) for every part, each on a thread.
  template <typename F>
  void run(F&& f) const {
    at::parallel_for(0, size(), 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch state: keep the products off autograd.
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t index = begin; index < end; ++index) f(index, parts_[index]);
    });
  }

  // Adds the private copies to the scatter target, in part order.
  void finish() const {
    for (const Part& part : parts_) {
      if (part.scatter.defined() && !part.scatter.is_same(target_)) {
        target_.view({target_.size(0), -1}).narrow(0, part.first_image, part.scatter.size(0)).add_(part.scatter);
      }
    }
  }

 private:
  std::vector<Part> parts_;
  at::Tensor target_;
};

// out = im2col(image) @ W^T, panel by panel: (B * L, C_grid).
at::Tensor convolve(const SamplingKernels& kernels, const Call& call, const at::Tensor& image, const at::Tensor& w) {
  at::Tensor out = at::empty({call.rows, call.p.grid_channels}, call.options);
  const int64_t panel = call.panel_rows(1);
  Parts(call).run([&](int64_t, const Part& part) {
    const at::Tensor buffer = call.column_buffer(panel);
    part.for_each_panel(panel, [&](int64_t r0, int64_t r1) {
      const at::Tensor columns = call.columns(buffer, r1 - r0);
      Chunk chunk = call.chunk(r0, r1);
      chunk.image = image.data_ptr();
      chunk.columns = columns.data_ptr();
      kernels.sweep(chunk, Sweep::im2col());
      columns_times(columns, w, out.narrow(0, r0, r1 - r0));
    });
  });
  return out;
}

// out = col2im(dense @ W), panel by panel: (B, *image_size, C_image).
at::Tensor convolve_transposed(const SamplingKernels& kernels, const Call& call, const at::Tensor& dense,
                               const at::Tensor& w) {
  at::Tensor out = at::zeros(call.image_shape(), call.options);
  const int64_t panel = call.panel_rows(1);
  const Parts parts(call, out);
  parts.run([&](int64_t, const Part& part) {
    const at::Tensor buffer = call.column_buffer(panel);
    part.for_each_panel(panel, [&](int64_t r0, int64_t r1) {
      const at::Tensor grad_columns = call.columns(buffer, r1 - r0);
      dense_times(dense.narrow(0, r0, r1 - r0), w, grad_columns);
      Chunk chunk = call.chunk(r0, r1);
      chunk.grad_columns = grad_columns.data_ptr();
      part.attach(chunk);
      kernels.sweep(chunk, Sweep::col2im());
    });
  });
  parts.finish();
  return out;
}

// out = sum over k of weight[k] * sample(image): (B * L, C).
at::Tensor depthwise_forward(const SamplingKernels& kernels, const Call& call, const at::Tensor& image,
                             const at::Tensor& weight) {
  at::Tensor out = at::zeros({call.rows, call.p.grid_channels}, call.options);
  Parts(call).run([&](int64_t, const Part& part) {
    Chunk chunk = call.chunk(part.row_begin, part.row_end);
    chunk.image = image.data_ptr();
    chunk.depthwise_weight = weight.data_ptr();
    chunk.dense_out = out.data_ptr();
    kernels.sweep(chunk, Sweep::depthwise());
  });
  return out;
}

// out = col2im(weight[k] * dense): (B, *image_size, C).
at::Tensor depthwise_transposed(const SamplingKernels& kernels, const Call& call, const at::Tensor& dense,
                                const at::Tensor& weight) {
  at::Tensor out = at::zeros(call.image_shape(), call.options);
  const Parts parts(call, out);
  parts.run([&](int64_t, const Part& part) {
    Chunk chunk = call.chunk(part.row_begin, part.row_end);
    chunk.dense = dense.data_ptr();
    chunk.depthwise_weight = weight.data_ptr();
    part.attach(chunk);
    kernels.sweep(chunk, Sweep::depthwise_col2im());
  });
  parts.finish();
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

// The gradients as the steps make them, in the compute dtype: input channels-last (image-shaped for
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
// for convolution and im2col(image) @ W^T for the transposed op. One sweep per panel gathers the
// samples once for all of them.
void column_backward(const SamplingKernels& kernels, const Call& call, bool transposed, const Wanted& want,
                     const at::Tensor& image, const at::Tensor& dense, const at::Tensor& w, Gradients& grads) {
  const bool col2im = want.input && !transposed;
  const bool columns = want.weight || (want.input && transposed);
  const bool grad_columns = col2im || want.coordinates();
  if (col2im) grads.input = at::zeros(call.image_shape(), call.options);
  if (want.input && transposed) grads.input = at::empty({call.rows, call.p.grid_channels}, call.options);
  const int64_t panel = call.panel_rows(int64_t(columns) + int64_t(grad_columns));
  // Every part sums a whole weight gradient: a part should have the rows to amortise adding its
  // sum (at least 64), and the sums together stay within the workspace limit.
  const int64_t weight_bytes = w.numel() * int64_t(w.element_size());
  const int64_t max_parts = want.weight
                                ? std::min(call.rows / 64, workspace_limit() / std::max<int64_t>(weight_bytes, 1))
                                : std::numeric_limits<int64_t>::max();
  const Parts parts(call, col2im ? grads.input : at::Tensor(), max_parts);
  std::vector<at::Tensor> weight_sums(parts.size());
  parts.run([&](int64_t index, const Part& part) {
    const at::Tensor column_buffer = columns ? call.column_buffer(panel) : at::Tensor();
    const at::Tensor grad_buffer = grad_columns ? call.column_buffer(panel) : at::Tensor();
    if (want.weight) weight_sums[index] = at::zeros_like(w);
    part.for_each_panel(panel, [&](int64_t r0, int64_t r1) {
      const at::Tensor dense_rows = dense.narrow(0, r0, r1 - r0);
      const at::Tensor cols = columns ? call.columns(column_buffer, r1 - r0) : at::Tensor();
      const at::Tensor gcols = grad_columns ? call.columns(grad_buffer, r1 - r0) : at::Tensor();
      if (grad_columns) dense_times(dense_rows, w, gcols);
      Chunk chunk = call.chunk(r0, r1);
      grads.attach(chunk);
      part.attach(chunk);
      if (image.defined()) chunk.image = image.data_ptr();
      if (gcols.defined()) chunk.grad_columns = gcols.data_ptr();
      if (cols.defined()) chunk.columns = cols.data_ptr();
      if (want.coordinates()) {
        kernels.sweep(chunk, Sweep::gradients(columns, col2im));
      } else {
        if (columns) kernels.sweep(chunk, Sweep::im2col());
        if (col2im) kernels.sweep(chunk, Sweep::col2im());
      }
      if (want.weight) add_weight_gradient(weight_sums[index], dense_rows, cols);
      if (want.input && transposed) columns_times(cols, w, grads.input.narrow(0, r0, r1 - r0));
    });
  });
  parts.finish();
  if (want.weight) grads.weight = sum_in_order(weight_sums);
}

// d weight (and d offset, d mask) in one sweep; d input by the depthwise forward of the other role.
void depthwise_backward(const SamplingKernels& kernels, const Call& call, bool transposed, const Wanted& want,
                        const at::Tensor& image, const at::Tensor& dense, const at::Tensor& weight, Gradients& grads) {
  if (want.weight || want.coordinates()) {
    const Parts parts(call);
    std::vector<at::Tensor> weight_sums(parts.size());  // scratch sums when only coordinates are wanted
    parts.run([&](int64_t index, const Part& part) {
      weight_sums[index] = at::zeros_like(weight);
      Chunk chunk = call.chunk(part.row_begin, part.row_end);
      grads.attach(chunk);
      chunk.image = image.data_ptr();
      chunk.dense = dense.data_ptr();
      chunk.depthwise_weight = weight.data_ptr();
      chunk.grad_depthwise_weight = weight_sums[index].data_ptr();
      kernels.sweep(chunk, Sweep::depthwise_gradients(want.coordinates()));
    });
    grads.weight = sum_in_order(weight_sums);
  }
  if (want.input) {
    grads.input = transposed ? depthwise_forward(kernels, call, image, weight)
                             : depthwise_transposed(kernels, call, dense, weight);
  }
}

}  // namespace

at::Tensor deform_conv_forward(const SamplingKernels& kernels, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                               int64_t groups) {
  const Problem p =
      describe(input, weight, offset, mask, bias, stride, padding, dilation, transposed, output_padding, groups);
  const Call call(p, input, offset, mask);
  const at::Tensor x = to_channels_last(kernels, input, call.dtype);
  at::Tensor out;
  if (is_depthwise(p)) {
    const at::Tensor w = call.depthwise_weight(weight);
    out = transposed ? depthwise_transposed(kernels, call, x, w) : depthwise_forward(kernels, call, x, w);
  } else {
    const at::Tensor w = call.column_weight(weight);
    out = transposed ? convolve_transposed(kernels, call, x.view({call.rows, p.grid_channels}), w)
                     : convolve(kernels, call, x, w);
  }
  out = from_channels_last(kernels, out.view(transposed ? call.image_shape() : call.grid_shape()),
                           output_format(input, weight), input.scalar_type());
  if (bias) {
    std::vector<int64_t> bias_shape(out.dim(), 1);
    bias_shape[1] = -1;
    out.add_(bias->view(bias_shape));
  }
  return owning(out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const SamplingKernels& kernels, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
    std::array<bool, 4> output_mask) {
  const Problem p = describe(input, weight, offset, mask, std::nullopt, stride, padding, dilation, transposed,
                             output_padding, groups);
  check_grad_output(p, input, grad_output);
  const Wanted want{output_mask[0], output_mask[1], output_mask[2] && offset.has_value(),
                    output_mask[3] && mask.has_value()};
  // Gradients that are not asked for come back as empty tensors (distinct ones: outputs never alias).
  std::array<at::Tensor, 4> result;
  for (at::Tensor& r : result) r = input.new_empty({0});
  if (!(want.input || want.weight || want.coordinates()))
    return std::make_tuple(result[0], result[1], result[2], result[3]);

  const Call call(p, input, offset, mask);
  Gradients grads;
  if (want.offset) grads.offset = zero_gradient(*offset, call.dtype);
  if (want.mask) grads.mask = zero_gradient(*mask, call.dtype);
  // The sampled tensor and the dense one on the grid, channels-last.
  const bool sampled = want.weight || want.coordinates() || (want.input && transposed);
  const at::Tensor image =
      sampled ? to_channels_last(kernels, transposed ? grad_output : input, call.dtype) : at::Tensor();
  const at::Tensor dense =
      to_channels_last(kernels, transposed ? input : grad_output, call.dtype).view({call.rows, p.grid_channels});
  if (is_depthwise(p)) {
    depthwise_backward(kernels, call, transposed, want, image, dense, call.depthwise_weight(weight), grads);
  } else {
    column_backward(kernels, call, transposed, want, image, dense, call.column_weight(weight), grads);
  }

  const at::ScalarType dtype = input.scalar_type();
  if (want.input) {
    const at::Tensor cl = grads.input.view(transposed ? call.grid_shape() : call.image_shape());
    result[0] = from_channels_last(kernels, cl, input.suggest_memory_format(), dtype);
  }
  if (want.weight) {
    const at::Tensor w =
        is_depthwise(p) ? grads.weight.t().reshape(weight.sizes()) : weight_from_columns(grads.weight, weight);
    result[1] = in_format(w, weight.suggest_memory_format(), dtype);
  }
  if (want.offset) result[2] = grads.offset.to(dtype);
  if (want.mask) result[3] = grads.mask.to(dtype);
  return std::make_tuple(owning(result[0]), owning(result[1]), owning(result[2]), owning(result[3]));
}

}  // namespace dcn_plugin
