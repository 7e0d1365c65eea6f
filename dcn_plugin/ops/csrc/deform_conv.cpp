// The schemas of dcn_plugin::deform_conv and its backward, their helper ops, and the Python module init.
//
// Kernels register elsewhere: the CPU ones in cpu/deform_conv_cpu.cpp, the CUDA ones (Triton) from
// Python, dcn_plugin/ops/triton/, which run the same checks (_check_arguments) first.
#include "deform_conv.h"

#include <Python.h>
#include <torch/library.h>

#include <atomic>

#include "deform_conv_checks.h"

namespace dcn_plugin {
namespace {

std::atomic<int64_t> g_workspace_limit{int64_t(256) << 20};

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

int64_t workspace_limit() { return g_workspace_limit.load(); }

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
