# mmdetection 3.x's own Faster R-CNN with modulated deformable RoI pooling (its configs/dcnv2/
# faster-rcnn_r50_fpn_mdpool_1x_coco.py), the pooling served by dcn_plugin. mmdetection looks the
# roi_layer type 'ModulatedDeformRoIPoolPack' up in mmcv.ops, where mmcv-full runs it on CUDA only;
# importing dcn_plugin.compat.mmcv_ops makes mmcv.ops serve dcn_plugin's (CPU and GPU; mmcv's
# arguments, keys and outputs). Needs mmcv-full and mmdetection 3.x; train with mmdetection's
# tools/train.py.
_base_ = "mmdet::dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py"
custom_imports = dict(imports=["dcn_plugin", "dcn_plugin.compat.mmcv_ops"], allow_failed_imports=False)
