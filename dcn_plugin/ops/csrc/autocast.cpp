// Autocast kernels of dcn_plugin::deform_conv for the CPU and CUDA autocast keys.
//
// Under torch.autocast the op runs in the autocast dtype of the enclosing region, as aten::conv2d
// does (torchvision's deform_conv2d instead upcasts to float32): floating-point tensor arguments on
// the autocast device are cast with at::autocast::cached_cast, then the op is called again with
// the autocast key excluded, which reaches autograd and the device kernel.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace dcn_plugin {
namespace {

using OptionalTensor = std::optional<at::Tensor>;
using DeformConvFn = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                const OptionalTensor&, const OptionalTensor&, at::IntArrayRef, at::IntArrayRef,
                                at::IntArrayRef, bool, at::IntArrayRef, int64_t);

template <c10::DeviceType device>
at::Tensor deform_conv_autocast(const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& offset,
                                const OptionalTensor& mask, const OptionalTensor& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                                at::IntArrayRef output_padding, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dcn_plugin::deform_conv", "").typed<DeformConvFn>();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const auto& tensor) { return at::autocast::cached_cast(dtype, tensor, device); };
  return op.call(cast(input), cast(weight), cast(offset), cast(mask), cast(bias), stride, padding, dilation,
                 transposed, output_padding, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_plugin, AutocastCPU, m) {
  m.impl("deform_conv", TORCH_FN(deform_conv_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(dcn_plugin, AutocastCUDA, m) {
  m.impl("deform_conv", TORCH_FN(deform_conv_autocast<c10::DeviceType::CUDA>));
}

}  // namespace dcn_plugin
