// CPU registration of dcn_plugin::deform_conv: the driver with the sweeps of the best instruction set, and test hooks.
//
// The sweeps are compiled once per instruction set (cpu/sweeps_*.cpp); the one used is chosen as
// ATen chooses its own kernels (at::get_cpu_capability(): the CPU's best, or lower when
// ATEN_CPU_CAPABILITY says so).
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "cpu/deform_conv_driver.h"
#include "cpu/products.h"

namespace dcn_plugin {

// One kernel table per instruction set that setup.py built (cpu/sweeps_*.cpp).
namespace DEFAULT {
const SamplingKernels& kernels();
}
#ifdef DCN_PLUGIN_AVX2
namespace AVX2 {
const SamplingKernels& kernels();
}
#endif
#ifdef DCN_PLUGIN_AVX512
namespace AVX512 {
const SamplingKernels& kernels();
}
#endif

namespace {

// The compiled tables, from the least to the most demanding.
std::vector<const SamplingKernels*> compiled() {
  return {
      &DEFAULT::kernels(),
#ifdef DCN_PLUGIN_AVX2
      &AVX2::kernels(),
#endif
#ifdef DCN_PLUGIN_AVX512
      &AVX512::kernels(),
#endif
  };
}

int64_t rank(const std::string& isa) {
  static const std::vector<std::string> order{"DEFAULT", "AVX2", "AVX512"};
  return std::find(order.begin(), order.end(), isa) - order.begin();
}

// The most demanding compiled table that `capability` (an at::get_cpu_capability() name) allows.
const SamplingKernels* best_for(const std::string& capability) {
  const SamplingKernels* best = compiled().front();
  for (const SamplingKernels* k : compiled()) {
    if (rank(k->isa) <= rank(capability)) best = k;
  }
  return best;
}

std::atomic<const SamplingKernels*>& active() {
  static std::atomic<const SamplingKernels*> kernels{best_for(at::get_cpu_capability())};
  return kernels;
}

// The instruction set the sweeps run with. Given one, switches to the best compiled table that it
// and this CPU allow: for tests of every compiled table.
std::string cpu_isa(std::optional<c10::string_view> isa) {
  if (isa) {
    const std::string wanted(*isa), cpu = at::get_cpu_capability();
    TORCH_CHECK(rank(wanted) < 3, "_cpu_isa: expected DEFAULT, AVX2 or AVX512, got ", wanted);
    active().store(best_for(rank(wanted) < rank(cpu) ? wanted : cpu));
  }
  return active().load()->isa;
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                   const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                   int64_t groups) {
  return deform_conv_forward(*active().load(), input, weight, offset, mask, bias, stride, padding, dilation, transposed,
                             output_padding, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& mask, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding, int64_t groups,
    std::array<bool, 4> output_mask) {
  return deform_conv_backward(*active().load(), grad_output, input, weight, offset, mask, stride, padding, dilation,
                              transposed, output_padding, groups, output_mask);
}

}  // namespace

// Test hooks: the instruction set of the sweeps, and which oneDNN op float32 products use ("" or a
// wrong one: at::mm; returns whether it was found).
TORCH_LIBRARY_FRAGMENT(dcn_plugin, m) {
  m.def("_cpu_isa(str? isa=None) -> str", &cpu_isa);
  m.def("_use_onednn_linear(str name) -> bool", &use_onednn_linear);
}

TORCH_LIBRARY_IMPL(dcn_plugin, CPU, m) {
  m.impl("deform_conv", &forward);
  m.impl("deform_conv_backward", &backward);
}

}  // namespace dcn_plugin
