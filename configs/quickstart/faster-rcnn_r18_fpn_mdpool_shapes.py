# Faster R-CNN with modulated deformable RoI pooling (DCNv2's) in place of RoIAlign.
_base_ = "./faster-rcnn_r18_fpn_shapes.py"

model = dict(
    roi_head=dict(
        bbox_roi_extractor=dict(
            roi_layer=dict(_delete_=True, type="ModulatedDeformRoIPoolPack", output_size=7,
                           output_channels=64, sampling_ratio=2, deform_fc_channels=256)
        )
    )
)
