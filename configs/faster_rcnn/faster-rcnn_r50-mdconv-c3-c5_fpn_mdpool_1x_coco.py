# DCNv2 throughout: modulated deformable convolution in ResNet stages c3-c5 and modulated
# deformable RoI pooling.
_base_ = "./faster-rcnn_r50_fpn_mdpool_1x_coco.py"

model = dict(
    backbone=dict(dcn=dict(type="DCNv2", deform_groups=1, fallback_on_stride=False),
                  stage_with_dcn=(False, True, True, True)),
)
