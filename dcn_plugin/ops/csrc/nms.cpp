// Schema of dcn_plugin::nms, greedy non-maximum suppression (the CPU kernel: cpu/nms_cpu.cpp; on
// other devices a torch implementation registered from Python, dcn_plugin/ops/nms.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dcn_plugin, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
}
