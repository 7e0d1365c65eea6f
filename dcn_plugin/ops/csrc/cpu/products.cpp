// The matrix products of the CPU driver (products.h), and the guarded look-up of oneDNN's linear op.
#include "cpu/products.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>

namespace dcn_plugin {
namespace {

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);
using LinearHandle = c10::TypedOperatorHandle<LinearFn>;

// The op `name` if this torch has it with a CPU kernel and LinearFn's signature; nullptr otherwise.
// mkldnn::_linear_pointwise is private to torch: a later torch may drop it or change its schema, and
// then every float32 CPU call must fall back to at::mm rather than throw, so nothing here throws.
const LinearHandle* find_linear(const std::string& name) {
  try {
    const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
    if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return nullptr;
    return new LinearHandle(handle->typed<LinearFn>());  // typed() throws on a signature mismatch
  } catch (const std::exception&) {
    return nullptr;
  }
}

// The oneDNN op matmul_nt uses (nullptr: at::mm), looked up once; _use_onednn_linear replaces it.
std::atomic<const LinearHandle*>& onednn_linear() {
  static std::atomic<const LinearHandle*> handle{find_linear("mkldnn::_linear_pointwise")};
  return handle;
}

// a @ b^T for a (M, K) and b (N, K). In float32 this is oneDNN's inner product where torch has it
// (the primitive behind torch.compile's CPU linear): on the shapes of issue 12 it matches torch's
// own convolution, where MKL's sgemm is 5-50% slower. MKL (at::mm) everywhere else, and wherever the
// oneDNN op is missing, has another signature or throws.
at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& b) {
  const LinearHandle* onednn = onednn_linear().load();
  if (onednn && a.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 &&
      at::globalContext().userEnabledMkldnn()) {
    try {
      return onednn->call(a.contiguous(), b, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
                          std::nullopt);
    } catch (const std::exception&) {
      // fall through to at::mm
    }
  }
  return at::mm(a, b.t());
}

}  // namespace

// Handles are never freed: a product on another thread may still hold one.
bool use_onednn_linear(const std::string& name) {
  const LinearHandle* handle = name.empty() ? nullptr : find_linear(name);
  onednn_linear().store(handle);
  return handle != nullptr;
}

void columns_times(const at::Tensor& columns, const at::Tensor& w, const at::Tensor& out) {
  const int64_t groups = w.size(0), per_group = w.size(1);
  for (int64_t group = 0; group < groups; ++group) {
    out.narrow(1, group * per_group, per_group).copy_(matmul_nt(columns[group], w[group]));
  }
}

void dense_times(const at::Tensor& dense, const at::Tensor& w, const at::Tensor& grad_columns) {
  const int64_t groups = w.size(0), per_group = w.size(1);
  for (int64_t group = 0; group < groups; ++group) {
    at::Tensor out = grad_columns[group];
    at::mm_out(out, dense.narrow(1, group * per_group, per_group), w[group]);
  }
}

void add_weight_gradient(const at::Tensor& grad_w, const at::Tensor& dense, const at::Tensor& columns) {
  const int64_t groups = grad_w.size(0), per_group = grad_w.size(1);
  for (int64_t group = 0; group < groups; ++group) {
    grad_w[group].addmm_(dense.narrow(1, group * per_group, per_group).t(), columns[group]);
  }
}

}  // namespace dcn_plugin
