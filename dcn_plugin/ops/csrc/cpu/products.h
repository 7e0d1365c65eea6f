// The matrix products of the CPU driver, per convolution group: at::mm, or oneDNN's linear op for float32 columns.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace dcn_plugin {

// out (rows, groups * N) = columns[g] @ w[g]^T in group g's columns, for columns (groups, rows, K)
// and w (groups, N, K).
void columns_times(const at::Tensor& columns, const at::Tensor& w, const at::Tensor& out);

// grad_columns (groups, rows, K) = dense_g @ w[g] for dense (rows, groups * N) and w (groups, N, K).
void dense_times(const at::Tensor& dense, const at::Tensor& w, const at::Tensor& grad_columns);

// grad_w[g] += dense_g^T @ columns[g].
void add_weight_gradient(const at::Tensor& grad_w, const at::Tensor& dense, const at::Tensor& columns);

// Test hook (dcn_plugin::_use_onednn_linear): makes `name` the oneDNN op of columns_times in float32
// ("" or an op of another signature: at::mm); returns whether it was found.
bool use_onednn_linear(const std::string& name);

}  // namespace dcn_plugin
