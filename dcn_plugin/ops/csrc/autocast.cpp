// Autocast kernels (CPU and CUDA) of dcn_plugin::deform_conv and the RoI pooling ops: they run in the autocast dtype.
//
// Under torch.autocast the op runs in the autocast dtype of the enclosing region, as aten::conv2d
// does (torchvision's deform_conv2d instead upcasts to float32): floating-point tensor arguments on
// the autocast device are cast with at::autocast::cached_cast, then the op is called again with
// the autocast key excluded, which reaches autograd and the device kernel. The RoI pooling ops cast
// their input and offset, not the RoIs (boxes stay in their dtype; the ops read any float dtype).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace dcn_plugin {
namespace {

using OptionalTensor = std::optional<at::Tensor>;
using DeformConvFn = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                const OptionalTensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool,
                                at::IntArrayRef, int64_t);

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
  return op.call(cast(input), cast(weight), cast(offset), cast(mask), cast(bias), stride, padding, dilation, transposed,
                 output_padding, groups);
}

using DeformRoiPoolFn = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, at::IntArrayRef, double,
                                   int64_t, double);
using DeformPsroiPoolFn = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&, double, int64_t,
                                     int64_t, int64_t, int64_t, int64_t, double);

// The RoI pooling ops: (input, rois, offset, *params) with input and offset cast, rois as given.
template <typename Fn, c10::DeviceType device>
struct RoiPoolAutocast {
  template <typename... Params>
  static at::Tensor call(const char* name, const at::Tensor& input, const at::Tensor& rois,
                         const OptionalTensor& offset, Params... params) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
    const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
    return op.call(at::autocast::cached_cast(dtype, input, device), rois,
                   at::autocast::cached_cast(dtype, offset, device), params...);
  }
};

template <c10::DeviceType device>
at::Tensor deform_roi_pool_autocast(const at::Tensor& input, const at::Tensor& rois, const OptionalTensor& offset,
                                    at::IntArrayRef output_size, double spatial_scale, int64_t sampling_ratio,
                                    double gamma) {
  return RoiPoolAutocast<DeformRoiPoolFn, device>::call("dcn_plugin::deform_roi_pool", input, rois, offset, output_size,
                                                        spatial_scale, sampling_ratio, gamma);
}

template <c10::DeviceType device>
at::Tensor deform_psroi_pool_autocast(const at::Tensor& input, const at::Tensor& rois, const OptionalTensor& offset,
                                      double spatial_scale, int64_t output_dim, int64_t group_size, int64_t pooled_size,
                                      int64_t part_size, int64_t sample_per_part, double trans_std) {
  return RoiPoolAutocast<DeformPsroiPoolFn, device>::call("dcn_plugin::deform_psroi_pool", input, rois, offset,
                                                          spatial_scale, output_dim, group_size, pooled_size, part_size,
                                                          sample_per_part, trans_std);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_plugin, AutocastCPU, m) {
  m.impl("deform_conv", TORCH_FN(deform_conv_autocast<c10::DeviceType::CPU>));
  m.impl("deform_roi_pool", TORCH_FN(deform_roi_pool_autocast<c10::DeviceType::CPU>));
  m.impl("deform_psroi_pool", TORCH_FN(deform_psroi_pool_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(dcn_plugin, AutocastCUDA, m) {
  m.impl("deform_conv", TORCH_FN(deform_conv_autocast<c10::DeviceType::CUDA>));
  m.impl("deform_roi_pool", TORCH_FN(deform_roi_pool_autocast<c10::DeviceType::CUDA>));
  m.impl("deform_psroi_pool", TORCH_FN(deform_psroi_pool_autocast<c10::DeviceType::CUDA>));
}

}  // namespace dcn_plugin
