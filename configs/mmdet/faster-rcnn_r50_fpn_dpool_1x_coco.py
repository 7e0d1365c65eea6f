# mmdetection 3.x's own Faster R-CNN with deformable RoI pooling (its configs/dcn/
# faster-rcnn_r50_fpn_dpool_1x_coco.py), the pooling served by dcn_plugin. mmdetection looks the
# roi_layer type 'DeformRoIPoolPack' up in mmcv.ops, where mmcv-full runs it on CUDA only; importing
# dcn_plugin.compat.mmcv_ops makes mmcv.ops serve dcn_plugin's (CPU and GPU; mmcv's arguments, keys
# and outputs). Needs mmcv-full and mmdetection 3.x; train with mmdetection's tools/train.py.
_base_ = "mmdet::dcn/faster-rcnn_r50_fpn_dpool_1x_coco.py"
custom_imports = dict(imports=["dcn_plugin", "dcn_plugin.compat.mmcv_ops"], allow_failed_imports=False)
