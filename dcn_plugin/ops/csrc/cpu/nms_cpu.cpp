// CPU kernel of dcn_plugin::nms.
//
// Boxes in decreasing score order (ties: the earlier box first), each kept unless a kept box above
// it overlaps it with IoU above the threshold.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace dcn_plugin {
namespace {

template <typename T, typename Acc>
std::vector<int64_t> greedy_nms(const at::Tensor& boxes, const at::Tensor& order, Acc iou_threshold) {
  const int64_t count = boxes.size(0);
  const T* box = boxes.const_data_ptr<T>();
  const int64_t* rank = order.const_data_ptr<int64_t>();
  std::vector<Acc> x1(count), y1(count), x2(count), y2(count), area(count);
  for (int64_t r = 0; r < count; ++r) {
    const T* b = box + 4 * rank[r];
    x1[r] = static_cast<Acc>(b[0]);
    y1[r] = static_cast<Acc>(b[1]);
    x2[r] = static_cast<Acc>(b[2]);
    y2[r] = static_cast<Acc>(b[3]);
    area[r] = std::max<Acc>(x2[r] - x1[r], 0) * std::max<Acc>(y2[r] - y1[r], 0);
  }
  // The same IoU as dcn_plugin.models.bbox.bbox_overlaps: the union is at least 1e-6.
  const Acc eps = Acc(1e-6);
  std::vector<char> suppressed(count, 0);
  std::vector<int64_t> keep;
  for (int64_t i = 0; i < count; ++i) {
    if (suppressed[i]) continue;
    keep.push_back(rank[i]);
    for (int64_t j = i + 1; j < count; ++j) {
      if (suppressed[j]) continue;
      const Acc w = std::max<Acc>(std::min(x2[i], x2[j]) - std::max(x1[i], x1[j]), 0);
      const Acc h = std::max<Acc>(std::min(y2[i], y2[j]) - std::max(y1[i], y1[j]), 0);
      const Acc overlap = w * h;
      const Acc iou = overlap / std::max(area[i] + area[j] - overlap, eps);
      if (iou > iou_threshold) suppressed[j] = 1;
    }
  }
  return keep;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "nms: boxes must have shape (N, 4), got ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "nms: scores must have shape (N,) = (",
              boxes.size(0), ",), got ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()) && at::isFloatingType(scores.scalar_type()),
              "nms: boxes and scores must be floating-point, got ", boxes.scalar_type(), " and ", scores.scalar_type());
  if (boxes.size(0) == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  const at::Tensor contiguous = boxes.contiguous();
  std::vector<int64_t> keep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms", [&] {
    using Acc = at::opmath_type<scalar_t>;
    keep = greedy_nms<scalar_t, Acc>(contiguous, order, static_cast<Acc>(iou_threshold));
  });
  return at::tensor(keep, boxes.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_plugin, CPU, m) { m.impl("nms", &nms_cpu); }

}  // namespace dcn_plugin
