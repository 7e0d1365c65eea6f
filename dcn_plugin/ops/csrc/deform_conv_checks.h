// The argument checks of dcn_plugin::deform_conv and Problem, the description of a call they produce.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "sweep.h"

namespace dcn_plugin {

// One checked call: its geometry, computed here once, and what else the drivers need.
struct Problem {
  Geometry geometry;
  int64_t batch = 0;
  int64_t groups = 1;
  int64_t grid_channels = 0;          // channels of the dense tensor on the grid
  std::vector<int64_t> output_shape;  // (B, C_out, *output size)

  int64_t image_channels() const { return geometry.channels; }  // channels of the sampled tensor
};

// Checks the op's arguments (errors name the argument and the expected and actual shapes) and
// describes the call.
Problem describe(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                 int64_t groups);

// Checks that grad_output has the device, dtype and shape of the op's output.
void check_grad_output(const Problem& p, const at::Tensor& input, const at::Tensor& grad_output);

}  // namespace dcn_plugin
