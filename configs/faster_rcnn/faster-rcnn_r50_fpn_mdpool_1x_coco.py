# Modulated deformable RoI pooling (DCNv2) in place of RoIAlign, as mmdetection's dcn/ config.
_base_ = "./faster-rcnn_r50_fpn_1x_coco.py"

model = dict(
    roi_head=dict(
        bbox_roi_extractor=dict(
            roi_layer=dict(_delete_=True, type="ModulatedDeformRoIPoolPack", output_size=7,
                           output_channels=256)
        )
    )
)
