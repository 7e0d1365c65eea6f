// Schema of dcn_plugin::nms, greedy non-maximum suppression.
//
// The CPU kernel is cpu/nms_cpu.cpp; other devices run a torch implementation registered from
// Python (dcn_plugin/ops/boxes.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dcn_plugin, m) { m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor"); }
