// The N-d deformable convolution op on the CPU: its geometry, the sampling pass the CPU kernels
// implement, and the driver that builds forward and backward from it and matrix products. (The
// CUDA kernels are Triton kernels with the same algebra: dcn_plugin/ops/triton/.)
//
// Roles. Forward and transposed convolution are adjoints, so one vocabulary serves both:
// - the *image* is the tensor that is sampled at deformed positions: the input of deformable
//   convolution, the output of the transposed op;
// - the *grid* is where offsets and masks live and where columns are laid out: the output grid
//   of convolution, the input grid of the transposed op.
// Columns have shape (C_image * K, L): row c * K + k holds, for every grid point l, channel c of
// the image sampled by kernel point k at grid point l, times the mask.
#pragma once

#include <ATen/ATen.h>

#include "sampling.h"

namespace dcn_plugin {

struct Geometry {
  int64_t dims = 0;                 // N, the number of spatial dimensions
  int64_t image_size[kMaxDims];     // spatial size of the sampled image
  int64_t image_stride[kMaxDims];   // row-major strides of the image, in elements
  int64_t grid_size[kMaxDims];      // spatial size of the column grid
  int64_t kernel_size[kMaxDims];
  int64_t stride[kMaxDims];
  int64_t padding[kMaxDims];
  int64_t dilation[kMaxDims];
  int64_t channels = 0;             // C_image, channels of the sampled image
  int64_t offset_groups = 0;        // 0 when there is no offset
  int64_t mask_groups = 0;          // 0 when there is no mask

  int64_t kernel_points() const { return product(kernel_size); }
  int64_t grid_points() const { return product(grid_size); }
  int64_t image_points() const { return product(image_size); }

 private:
  int64_t product(const int64_t* values) const {
    int64_t p = 1;
    for (int64_t d = 0; d < dims; ++d) p *= values[d];
    return p;
  }
};

// One call of the sampling pass, over the grid points [first, first + count) of one image. All
// tensors are contiguous, of the column dtype; undefined tensors are not read or written.
//   image:   (C_image, *image_size), the tensor that is sampled
//   offset:  (offset_groups * K * N, L);  mask: (mask_groups * K, L)
//   grad_columns: (C_image * K, count), d loss / d columns (or any columns to scatter)
// Outputs:
//   columns      = mask * sample(image)                              (im2col), overwritten
//   grad_image  += sampling's adjoint applied to grad_columns        (col2im), accumulated
//   grad_offset += d loss / d offset, grad_mask += d loss / d mask, for the given grad_columns,
//                  in columns [first, first + count) of (rows, L) tensors
//
// Depthwise convolution (one channel per group on both sides) has no matrix product to amortise
// the columns over, so the pass contracts them with the weight itself instead of materialising
// them. Then, with (C_image, L) tensors `dense` and `dense_out` and a (C_image, K) weight:
//   grad_columns[c * K + k, j] is taken as depthwise_weight[c, k] * dense[c, first + j]
//   dense_out[c, first + j]          += sum_k depthwise_weight[c, k] * columns[c * K + k, j]
//   grad_depthwise_weight[c, k]      += sum_j dense[c, first + j] * columns[c * K + k, j]
struct SamplePass {
  const Geometry& geometry;
  at::Tensor image, offset, mask, grad_columns;
  int64_t first = 0, count = 0;
  // Row stride, in elements, of `columns` and `grad_columns` ((rows, count) views of a wider buffer
  // when the driver puts several images side by side); 0 means `count`.
  int64_t column_stride = 0;
  at::Tensor columns, grad_image, grad_offset, grad_mask;
  at::Tensor depthwise_weight, dense, dense_out, grad_depthwise_weight;

  // The column dtype: that of whichever input the pass has.
  at::ScalarType dtype() const {
    for (const at::Tensor* t : {&image, &grad_columns, &dense}) {
      if (t->defined()) return t->scalar_type();
    }
    TORCH_INTERNAL_ASSERT(false, "deform_conv: a sampling pass with no input");
    return at::kFloat;
  }
};

// A pass's tensors as raw pointers (null where undefined) and its extents, as kernels read them:
// `scalar_t` is the column dtype.
template <typename scalar_t>
struct PassData {
  int64_t K, points, image_points, first, count, column_stride;
  // Channels per offset group and per mask group (all channels where there are no offsets / masks).
  int64_t per_offset_group, per_mask_group;
  const scalar_t *image, *offset, *mask, *grad_columns, *depthwise_weight, *dense;
  scalar_t* columns;
  scalar_t *grad_image, *dense_out, *grad_depthwise_weight;

  explicit PassData(const SamplePass& pass)
      : K(pass.geometry.kernel_points()),
        points(pass.geometry.grid_points()),
        image_points(pass.geometry.image_points()),
        first(pass.first),
        count(pass.count),
        column_stride(pass.column_stride > 0 ? pass.column_stride : pass.count),
        per_offset_group(per_group(pass.geometry, pass.geometry.offset_groups)),
        per_mask_group(per_group(pass.geometry, pass.geometry.mask_groups)),
        image(data_or_null<scalar_t>(pass.image)),
        offset(data_or_null<scalar_t>(pass.offset)),
        mask(data_or_null<scalar_t>(pass.mask)),
        grad_columns(data_or_null<scalar_t>(pass.grad_columns)),
        depthwise_weight(data_or_null<scalar_t>(pass.depthwise_weight)),
        dense(data_or_null<scalar_t>(pass.dense)),
        columns(data_or_null<scalar_t>(pass.columns)),
        grad_image(data_or_null<scalar_t>(pass.grad_image)),
        dense_out(data_or_null<scalar_t>(pass.dense_out)),
        grad_depthwise_weight(data_or_null<scalar_t>(pass.grad_depthwise_weight)) {}

 private:
  static int64_t per_group(const Geometry& g, int64_t groups) { return groups > 0 ? g.channels / groups : g.channels; }

  template <typename T>
  static T* data_or_null(const at::Tensor& t) {
    return t.defined() ? t.data_ptr<T>() : nullptr;
  }
};

// Calls f.template operator()<N, index_t>() with N = dims (1 to 3) and index_t = int64_t where
// `wide_index`, int32_t otherwise: how the sampling pass picks its kernel template.
template <typename F>
void dispatch_geometry(int64_t dims, bool wide_index, F&& f) {
  auto with_index = [&]<int N>() {
    if (wide_index) {
      f.template operator()<N, int64_t>();
    } else {
      f.template operator()<N, int32_t>();
    }
  };
  switch (dims) {
    case 1: with_index.template operator()<1>(); break;
    case 2: with_index.template operator()<2>(); break;
    case 3: with_index.template operator()<3>(); break;
    default: TORCH_CHECK(false, "deform_conv: unsupported number of spatial dims ", dims);
  }
}

struct SamplingKernels {
  // The dtype columns, matrix products and every sum are computed in, for inputs of `dtype`.
  at::ScalarType (*column_dtype)(at::ScalarType dtype);
  // Computes every output of the pass that is defined, in one sweep over the samples.
  void (*sample)(SamplePass& pass);
};

// Bytes of scratch memory one chunk may use (its columns plus the sampling tables the pass
// allocates); the driver sizes its chunks of grid points with it. The Triton driver reads it too.
int64_t workspace_limit();

at::Tensor deform_conv_forward(const SamplingKernels& kernels, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                               at::IntArrayRef output_padding, int64_t groups);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const SamplingKernels& kernels, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
    at::IntArrayRef output_padding, int64_t groups, std::array<bool, 4> output_mask);

// The kernels of the two ops: the driver run with a sampling pass. Registered with TORCH_LIBRARY_IMPL.
template <const SamplingKernels& (*kernels)()>
struct DeviceOps {
  static at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                            at::IntArrayRef output_padding, int64_t groups) {
    return deform_conv_forward(kernels(), input, weight, offset, mask, bias, stride, padding, dilation, transposed,
                               output_padding, groups);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
      const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
      at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
      int64_t groups, std::array<bool, 4> output_mask) {
    return deform_conv_backward(kernels(), grad_output, input, weight, offset, mask, stride, padding, dilation,
                                transposed, output_padding, groups, output_mask);
  }
};

}  // namespace dcn_plugin
