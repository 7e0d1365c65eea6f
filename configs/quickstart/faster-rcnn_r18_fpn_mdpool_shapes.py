# Faster R-CNN with modulated deformable RoI pooling (DCNv2's) in place of RoIAlign.
_base_ = "./faster-rcnn_r18_fpn_shapes.py"

# The offset and mask heads (two fc stacks on the 64 x 7 x 7 pooled RoI) are 64 wide, a quarter of
# the box head's 256: at mmcv's 1024 (or 256) they cost more than the box head itself, and the RoI
# step of this small model is then 1.6x RoIAlign's (tools/time_train_step.py, README).
model = dict(
    roi_head=dict(
        bbox_roi_extractor=dict(
            roi_layer=dict(_delete_=True, type="ModulatedDeformRoIPoolPack", output_size=7,
                           output_channels=64, sampling_ratio=2, deform_fc_channels=64)
        )
    )
)
