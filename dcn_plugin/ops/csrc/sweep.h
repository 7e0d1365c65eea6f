// The interface between the CPU driver and its sampling sweeps: Geometry, Sweep, Chunk, SamplingKernels.
//
// The driver is cpu/deform_conv_driver.cpp; the sweeps (cpu/sweeps.h) are compiled once per
// instruction set, so this header is kept free of ATen's tensor headers and the per-ISA translation
// units include little besides the vector code. The checks (deform_conv_checks.cpp) fill Geometry.
//
// Roles. Forward and transposed convolution are adjoints, so one vocabulary serves both:
// - the *image* is the tensor that is sampled at deformed positions: the input of deformable
//   convolution, the output of the transposed op;
// - the *grid* is where offsets and masks live and where columns are laid out: the output grid
//   of convolution, the input grid of the transposed op.
// Every tensor a sweep touches is channels-last: the C channels of one point are contiguous, so
// one N-linear sample of all the channels of an offset group is 2^N contiguous vector loads.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "sampling.h"

namespace dcn_plugin {

struct Geometry {
  int64_t dims = 0;                // N, the number of spatial dimensions
  int64_t image_size[kMaxDims];    // spatial size of the sampled image
  int64_t image_stride[kMaxDims];  // row-major strides of the image's points, in points
  int64_t grid_size[kMaxDims];     // spatial size of the column grid
  int64_t kernel_size[kMaxDims];
  int64_t stride[kMaxDims];
  int64_t padding[kMaxDims];
  int64_t dilation[kMaxDims];
  int64_t channels = 0;       // C_image, channels of the sampled image
  int64_t offset_groups = 0;  // 0 when there is no offset
  int64_t mask_groups = 0;    // 0 when there is no mask

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

// The sweeps. Each is one pass, on the calling thread, over the samples (grid point, kernel point,
// channel) of a chunk of grid points; the driver composes forward and backward from them and
// matrix products, and runs chunks on several threads.
struct Sweep {
  enum Kind {
    kIm2col,              // columns = mask * sample(image)
    kCol2im,              // grad_image += the adjoint of sampling, applied to grad_columns
    kGradients,           // grad_offset, grad_mask += coordinate gradients against grad_columns
    kDepthwise,           // dense_out += sum over k of weight[k] * mask * sample(image)
    kDepthwiseCol2im,     // grad_image += the adjoint of sampling, applied to weight[k] * dense
    kDepthwiseGradients,  // grad_depthwise_weight += sum over the grid of dense * mask * sample(image)
  };
  Kind kind;
  // kGradients: in the same sweep, also write the columns (im2col) and/or scatter grad_columns
  // onto grad_image (col2im), so the samples are gathered once.
  bool with_columns = false;
  bool with_col2im = false;
  // kDepthwiseGradients: also grad_offset and grad_mask, against weight[k] * dense.
  bool with_coordinates = false;

  static Sweep im2col() { return {kIm2col}; }
  static Sweep col2im() { return {kCol2im}; }
  static Sweep gradients(bool columns, bool col2im) { return {kGradients, columns, col2im}; }
  static Sweep depthwise() { return {kDepthwise}; }
  static Sweep depthwise_col2im() { return {kDepthwiseCol2im}; }
  static Sweep depthwise_gradients(bool coordinates) { return {kDepthwiseGradients, false, false, coordinates}; }
};

// A tensor on the grid (offset, mask, their gradients): element (image i, channel c, grid point l)
// at data + i * image + c * channel + l * point. Null data: absent.
struct GridTensor {
  void* data = nullptr;
  int64_t image = 0, channel = 0, point = 0;
};

// What a sweep reads and writes. It covers the rows [row_begin, row_end) of the batch's grid:
// row r is grid point r % L of image r / L (L grid points per image). Pointers address the whole
// batch, in the compute dtype (compute_dtype.h), except grad_image, columns and grad_columns; a
// sweep reads only those its kind needs. Sums it accumulates into must not be written by another
// thread meanwhile.
struct Chunk {
  const Geometry* geometry = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Float;
  int64_t row_begin = 0, row_end = 0;
  int64_t groups = 1;                 // convolution groups: the column layout
  const void* image = nullptr;        // (B, image points, C)
  void* grad_image = nullptr;         // (images, image points, C), accumulated, holding images
  int64_t grad_image_first = 0;       // grad_image_first, grad_image_first + 1, ...
  GridTensor offset, mask;            // (B, offset_groups * K * N, L), (B, mask_groups * K, L)
  GridTensor grad_offset, grad_mask;  // their gradients, accumulated; null: not wanted
  // The chunk's columns, group-major: (groups, rows, K, C / groups) for rows = row_end - row_begin.
  void* columns = nullptr;
  const void* grad_columns = nullptr;
  // Depthwise (one channel per group on both sides): weight (K, C); dense (B, L, C) is grad_output
  // or the transposed op's input; dense_out (B, L, C) is accumulated.
  const void* depthwise_weight = nullptr;
  const void* dense = nullptr;
  void* dense_out = nullptr;
  void* grad_depthwise_weight = nullptr;  // (K, C), accumulated
};

// The sweeps compiled for one instruction set, and the layout changes around them.
struct SamplingKernels {
  const char* isa;
  void (*sweep)(const Chunk& chunk, Sweep sweep);
  // dst[b] = src[b]^T for `batch` contiguous (rows, cols) matrices of a floating dtype.
  void (*transpose)(c10::ScalarType dtype, const void* src, void* dst, int64_t batch, int64_t rows, int64_t cols);
};

}  // namespace dcn_plugin
