// The CPU driver of dcn_plugin::deform_conv: forward and backward from matrix products and sampling sweeps.
//
// The CUDA kernels are Triton kernels with the same algebra (dcn_plugin/ops/triton/).
#pragma once

#include <ATen/ATen.h>

#include "sweep.h"

namespace dcn_plugin {

// dcn_plugin::deform_conv and dcn_plugin::deform_conv_backward on CPU tensors, sampling with `kernels`.
at::Tensor deform_conv_forward(const SamplingKernels& kernels, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                               int64_t groups);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const SamplingKernels& kernels, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
    std::array<bool, 4> output_mask);

}  // namespace dcn_plugin
