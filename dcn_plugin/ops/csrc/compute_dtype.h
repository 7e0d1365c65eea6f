// The dtype the C++ kernels and the RoI table compute in, for both ops: float64 for double, float32 otherwise.
//
// Sampling positions, columns, products and sums of half types are float32 on the CPU. (The Triton
// convolution keeps half-type columns, for tensor cores, but accumulates in float32 as well.)
#pragma once

#include <c10/core/ScalarType.h>

namespace dcn_plugin {

inline c10::ScalarType compute_dtype(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

}  // namespace dcn_plugin
