# DCNv2 in ResNet stages c3-c5 and on the last conv of both head towers
# (mmdetection's "fcos ... dcn ... center-normbbox-centeronreg-giou" recipe, here with the
# pytorch-style backbone).
_base_ = "./fcos_r50-dcnv2-c3-c5_fpn_1x_coco.py"

model = dict(
    bbox_head=dict(
        dcn_on_last_conv=True,
        center_sampling=True,
        center_sample_radius=1.5,
        norm_on_bbox=True,
        centerness_on_reg=True,
        loss_bbox=dict(type="GIoULoss", loss_weight=1.0),
    ),
)
