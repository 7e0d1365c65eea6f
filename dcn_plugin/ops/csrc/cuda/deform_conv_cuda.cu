// CUDA sampling pass for dcn_plugin::deform_conv, and its CUDA registration.
//
// The driver (deform_conv.cpp) is shared with the CPU; here is only the sampling pass, as a few
// kernels that each recompute the sampling position from the offsets (cheaper on a GPU than
// storing a table) with the helpers of sampling.h:
//   - sample_kernel, one thread per (channel, kernel point, grid point): im2col and/or the
//     scatter of gradient columns onto the image (col2im, with atomic adds);
//   - coordinate_kernel, one thread per (run of channels, kernel point, grid point): the offset and
//     mask gradients of its channels, plus columns and the scatter when the pass wants them, so a
//     backward gathers each sample once; partial sums per run are then added in a fixed order by
//     reduce_coordinates_kernel, so these gradients are deterministic;
//   - depthwise_kernel and depthwise_weight_grad_kernel for the depthwise contractions.
// Half types are sampled natively: values are read in the input dtype, positions, weights and sums
// are in float32 (at::opmath_type), columns are written in the input dtype for the matrix products,
// and everything accumulated (gradients, the transposed op's output) is float32.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <numeric>

#include "deform_conv.h"

namespace dcn_plugin {
namespace {

constexpr int kThreads = 256;
// Channels one coordinate_kernel thread sums over (at most): enough to amortise locating the
// corners, few enough to leave threads for small feature maps.
constexpr int64_t kMaxRunChannels = 32;

// Blocks for a grid-stride loop over `work` items.
unsigned int blocks_for(int64_t work) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20)));
}

// What the kernels read and write (see SamplePass), with the geometry.
template <typename scalar_t, typename acc_t>
struct PassArgs : PassData<scalar_t, acc_t> {
  Geometry g;

  explicit PassArgs(const SamplePass& pass) : PassData<scalar_t, acc_t>(pass), g(pass.geometry) {}
};

// Corners of the sample of kernel point k at grid point first + j, for offset group og.
template <int N, typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ void locate(const PassArgs<scalar_t, acc_t>& a, index_t og, index_t k, index_t j,
                                       index_t* idx, acc_t* w, acc_t* dw) {
  acc_t pos[N];
  const index_t grid_point = static_cast<index_t>(a.first) + j;
  base_position<N, acc_t, index_t>(grid_point, k, a.g.grid_size, a.g.kernel_size, a.g.stride, a.g.padding,
                                   a.g.dilation, pos);
  if (a.offset != nullptr) {
    const index_t K = static_cast<index_t>(a.K), points = static_cast<index_t>(a.points);
#pragma unroll
    for (int d = 0; d < N; ++d) pos[d] += static_cast<acc_t>(a.offset[((og * K + k) * N + d) * points + grid_point]);
  }
  locate_corners<N, acc_t, index_t>(pos, a.g.image_size, a.g.image_stride, idx, w, dw);
}

template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ acc_t mask_at(const PassArgs<scalar_t, acc_t>& a, index_t mg, index_t k, index_t j) {
  if (a.mask == nullptr) return acc_t(1);
  return static_cast<acc_t>(a.mask[(mg * static_cast<index_t>(a.K) + k) * static_cast<index_t>(a.points) +
                                   static_cast<index_t>(a.first) + j]);
}

// d loss / d column (c, k) at grid point j: the gradient columns, or for depthwise weight[c, k] * dense.
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ acc_t grad_column_at(const PassArgs<scalar_t, acc_t>& a, index_t c, index_t ck, index_t j) {
  if (a.grad_columns != nullptr) return static_cast<acc_t>(a.grad_columns[ck * static_cast<index_t>(a.column_stride) + j]);
  return static_cast<acc_t>(a.depthwise_weight[ck]) *
         static_cast<acc_t>(a.dense[c * static_cast<index_t>(a.points) + static_cast<index_t>(a.first) + j]);
}

template <int N, typename acc_t, typename index_t>
__device__ __forceinline__ void scatter(acc_t* plane, const index_t* idx, const acc_t* w, acc_t value) {
#pragma unroll
  for (int corner = 0; corner < Corners<N>::kCount; ++corner) {
    if (w[corner] != acc_t(0)) atomicAdd(plane + idx[corner], w[corner] * value);
  }
}

template <int N, typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ acc_t gather(const scalar_t* plane, const index_t* idx, const acc_t* w) {
  acc_t value = 0;
#pragma unroll
  for (int corner = 0; corner < Corners<N>::kCount; ++corner) value += w[corner] * static_cast<acc_t>(plane[idx[corner]]);
  return value;
}

// columns[c * K + k, j] = mask * sample, and/or grad_image += adjoint of the gradient columns.
template <int N, typename scalar_t, typename acc_t, typename index_t>
__global__ void sample_kernel(const PassArgs<scalar_t, acc_t> a) {
  constexpr int kCorners = Corners<N>::kCount;
  const index_t K = a.K, count = a.count, image_points = a.image_points;
  const index_t per_offset_group = a.per_offset_group, per_mask_group = a.per_mask_group;
  const int64_t total = a.g.channels * a.K * a.count;
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const index_t i = static_cast<index_t>(item);
    const index_t j = i % count, ck = i / count, k = ck % K, c = ck / K;
    index_t idx[kCorners];
    acc_t w[kCorners];
    locate<N>(a, c / per_offset_group, k, j, idx, w, static_cast<acc_t*>(nullptr));
    const acc_t scale = mask_at(a, c / per_mask_group, k, j);
    if (a.columns != nullptr) {
      const acc_t value = gather<N>(a.image + c * image_points, idx, w);
      a.columns[ck * static_cast<index_t>(a.column_stride) + j] = static_cast<scalar_t>(scale * value);
    }
    if (a.grad_image != nullptr) scatter<N>(a.grad_image + c * image_points, idx, w, scale * grad_column_at(a, c, ck, j));
  }
}

// For a run of `run` channels within one offset group and one mask group, kernel point k and grid
// point j: partial[((r * K + k) * (N + 1) + d) * count + j] = sum over the run of d loss / d offset
// (d < N) and d loss / d mask (d = N). Also writes columns and scatters, as sample_kernel.
template <int N, typename scalar_t, typename acc_t, typename index_t>
__global__ void coordinate_kernel(const PassArgs<scalar_t, acc_t> a, const index_t run, const bool want_offset,
                                  acc_t* __restrict__ partial) {
  constexpr int kCorners = Corners<N>::kCount;
  const index_t K = a.K, count = a.count, image_points = a.image_points;
  const index_t per_offset_group = a.per_offset_group, per_mask_group = a.per_mask_group;
  const int64_t total = a.g.channels / run * a.K * a.count;
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const index_t i = static_cast<index_t>(item);
    const index_t j = i % count, rk = i / count, k = rk % K, r = rk / K;
    const index_t c0 = r * run;
    index_t idx[kCorners];
    acc_t w[kCorners], dw[N * kCorners];
    locate<N>(a, c0 / per_offset_group, k, j, idx, w, want_offset ? dw : nullptr);
    const acc_t scale = mask_at(a, c0 / per_mask_group, k, j);
    acc_t offset_sum[N] = {}, mask_sum = 0;
    for (index_t c = c0; c < c0 + run; ++c) {
      const scalar_t* plane = a.image + c * image_points;
      const index_t ck = c * K + k;
      acc_t value = 0, slope[N] = {};
#pragma unroll
      for (int corner = 0; corner < kCorners; ++corner) {
        const acc_t v = static_cast<acc_t>(plane[idx[corner]]);
        value += w[corner] * v;
        if (want_offset) {
#pragma unroll
          for (int d = 0; d < N; ++d) slope[d] += dw[d * kCorners + corner] * v;
        }
      }
      if (a.columns != nullptr) a.columns[ck * static_cast<index_t>(a.column_stride) + j] = static_cast<scalar_t>(scale * value);
      const acc_t g = grad_column_at(a, c, ck, j);
      mask_sum += g * value;
#pragma unroll
      for (int d = 0; d < N; ++d) offset_sum[d] += g * slope[d];
      if (a.grad_image != nullptr) scatter<N>(a.grad_image + c * image_points, idx, w, scale * g);
    }
    acc_t* out = partial + rk * (N + 1) * count + j;
#pragma unroll
    for (int d = 0; d < N; ++d) out[d * count] = scale * offset_sum[d];
    out[N * count] = mask_sum;
  }
}

// grad_offset (rows og * K * N + k * N + d) and grad_mask (rows mg * K + k) at grid points
// [first, first + count) += the partial sums of the runs of their group, in run order.
template <int N, typename acc_t>
__global__ void reduce_coordinates_kernel(const acc_t* __restrict__ partial, int64_t run, int64_t K, int64_t count,
                                          int64_t points, int64_t first, int64_t per_offset_group,
                                          int64_t per_mask_group, acc_t* grad_offset, int64_t offset_rows,
                                          acc_t* grad_mask, int64_t mask_rows) {
  const int64_t total = (offset_rows + mask_rows) * count;
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = item % count;
    int64_t row = item / count;
    int64_t group, k, slot, runs_per_group;
    acc_t* out;
    if (row < offset_rows) {
      group = row / (K * N);
      k = row / N % K;
      slot = row % N;
      runs_per_group = per_offset_group / run;
      out = grad_offset + row * points + first + j;
    } else {
      row -= offset_rows;
      group = row / K;
      k = row % K;
      slot = N;
      runs_per_group = per_mask_group / run;
      out = grad_mask + row * points + first + j;
    }
    acc_t sum = 0;
    for (int64_t r = group * runs_per_group; r < (group + 1) * runs_per_group; ++r) {
      sum += partial[((r * K + k) * (N + 1) + slot) * count + j];
    }
    *out += sum;
  }
}

// Depthwise: dense_out[c, first + j] += sum_k depthwise_weight[c, k] * mask * sample.
template <int N, typename scalar_t, typename acc_t, typename index_t>
__global__ void depthwise_kernel(const PassArgs<scalar_t, acc_t> a) {
  constexpr int kCorners = Corners<N>::kCount;
  const index_t K = a.K, count = a.count;
  const int64_t total = a.g.channels * a.count;
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const index_t i = static_cast<index_t>(item);
    const index_t j = i % count, c = i / count;
    const scalar_t* plane = a.image + c * static_cast<index_t>(a.image_points);
    const index_t og = c / static_cast<index_t>(a.per_offset_group), mg = c / static_cast<index_t>(a.per_mask_group);
    acc_t sum = 0;
    for (index_t k = 0; k < K; ++k) {
      index_t idx[kCorners];
      acc_t w[kCorners];
      locate<N>(a, og, k, j, idx, w, static_cast<acc_t*>(nullptr));
      sum += static_cast<acc_t>(a.depthwise_weight[c * K + k]) * mask_at(a, mg, k, j) * gather<N>(plane, idx, w);
    }
    a.dense_out[c * static_cast<index_t>(a.points) + static_cast<index_t>(a.first) + j] += sum;
  }
}

// Depthwise: grad_depthwise_weight[c, k] += sum_j dense[c, first + j] * mask * sample; one block per
// (c, k), summed in a fixed order (each thread a fixed set of j, then a fixed tree).
template <int N, typename scalar_t, typename acc_t, typename index_t>
__global__ void depthwise_weight_grad_kernel(const PassArgs<scalar_t, acc_t> a) {
  constexpr int kCorners = Corners<N>::kCount;
  __shared__ acc_t sums[kThreads];
  const index_t K = a.K, ck = blockIdx.x, c = ck / K, k = ck % K;
  const scalar_t* plane = a.image + c * static_cast<index_t>(a.image_points);
  const scalar_t* dense = a.dense + c * static_cast<index_t>(a.points) + static_cast<index_t>(a.first);
  const index_t og = c / static_cast<index_t>(a.per_offset_group), mg = c / static_cast<index_t>(a.per_mask_group);
  acc_t sum = 0;
  for (index_t j = threadIdx.x; j < static_cast<index_t>(a.count); j += kThreads) {
    index_t idx[kCorners];
    acc_t w[kCorners];
    locate<N>(a, og, k, j, idx, w, static_cast<acc_t*>(nullptr));
    sum += static_cast<acc_t>(dense[j]) * mask_at(a, mg, k, j) * gather<N>(plane, idx, w);
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) a.grad_depthwise_weight[ck] += sums[0];
}

// The largest divisor of `channels` that is at most kMaxRunChannels.
int64_t run_length(int64_t channels) {
  for (int64_t run = std::min(channels, kMaxRunChannels); run > 1; --run) {
    if (channels % run == 0) return run;
  }
  return 1;
}

template <int N, typename scalar_t, typename index_t>
void launch(SamplePass& pass) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = pass.geometry;
  const int64_t C = g.channels;
  const PassArgs<scalar_t, acc_t> a(pass);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool want_offset = pass.grad_offset.defined(), want_mask = pass.grad_mask.defined();
  if (want_offset || want_mask) {
    // Runs lie within one offset group and one mask group.
    const int64_t run = run_length(std::gcd(a.per_offset_group, a.per_mask_group));
    const int64_t runs = C / run;
    const auto acc_options = pass.image.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor partial = at::empty({runs * a.K * (N + 1) * a.count}, acc_options);
    coordinate_kernel<N, scalar_t, acc_t, index_t><<<blocks_for(runs * a.K * a.count), kThreads, 0, stream>>>(
        a, static_cast<index_t>(run), want_offset, partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t offset_rows = want_offset ? g.offset_groups * a.K * N : 0;
    const int64_t mask_rows = want_mask ? g.mask_groups * a.K : 0;
    reduce_coordinates_kernel<N, acc_t><<<blocks_for((offset_rows + mask_rows) * a.count), kThreads, 0, stream>>>(
        partial.data_ptr<acc_t>(), run, a.K, a.count, a.points, a.first, a.per_offset_group, a.per_mask_group,
        want_offset ? pass.grad_offset.data_ptr<acc_t>() : nullptr, offset_rows,
        want_mask ? pass.grad_mask.data_ptr<acc_t>() : nullptr, mask_rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (a.columns != nullptr || a.grad_image != nullptr) {
    sample_kernel<N, scalar_t, acc_t, index_t><<<blocks_for(C * a.K * a.count), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (a.dense_out != nullptr) {
    depthwise_kernel<N, scalar_t, acc_t, index_t><<<blocks_for(C * a.count), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (a.grad_depthwise_weight != nullptr) {
    depthwise_weight_grad_kernel<N, scalar_t, acc_t, index_t><<<C * a.K, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Whether every index the kernels form for this pass fits in 32 bits.
bool fits_int32(const SamplePass& pass) {
  const Geometry& g = pass.geometry;
  const int64_t K = g.kernel_points(), groups = std::max<int64_t>({g.offset_groups, g.mask_groups, 1});
  const int64_t stride = std::max(pass.column_stride, pass.count);
  // Columns (the coordinate partial sums are at most (N + 1) times as many), image, dense tensors, offsets.
  const int64_t largest = std::max({(kMaxDims + 1) * g.channels * K * stride, g.channels * g.image_points(),
                                    g.channels * g.grid_points(), groups * K * kMaxDims * g.grid_points()});
  return largest < std::numeric_limits<int32_t>::max();
}

void sample_cuda(SamplePass& pass) {
  const Geometry& g = pass.geometry;
  if (g.channels == 0 || pass.count == 0) return;
  if (pass.grad_image.defined()) {
    at::globalContext().alertNotDeterministic(
        "dcn_plugin::deform_conv on CUDA (the gradient of the input of deformable convolution, and the "
        "output of the transposed op, are scattered with atomic adds)");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pass.dtype(), "dcn_plugin_cuda", [&] {
    dispatch_geometry(g.dims, !fits_int32(pass),
                      [&]<int N, typename index_t>() { launch<N, scalar_t, index_t>(pass); });
  });
}

const SamplingKernels& cuda_kernels() {
  static const SamplingKernels kernels{
      // Half types are sampled natively; their matrix products accumulate in float32 (cuBLAS).
      [](at::ScalarType dtype) { return dtype; },
      [](at::ScalarType column_dtype) { return at::toOpMathType(column_dtype); },
      [](SamplePass& pass) { sample_cuda(pass); },
  };
  return kernels;
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_plugin, CUDA, m) {
  using Ops = DeviceOps<cuda_kernels, c10::cuda::CUDAGuard>;
  m.impl("deform_conv", &Ops::forward);
  m.impl("deform_conv_backward", &Ops::backward);
}

}  // namespace dcn_plugin
