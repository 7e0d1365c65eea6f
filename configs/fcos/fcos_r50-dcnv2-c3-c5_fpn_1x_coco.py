# Modulated deformable convolution (DCNv2) in the 3x3 convs of ResNet stages c3-c5.
_base_ = "./fcos_r50_fpn_1x_coco.py"

model = dict(
    backbone=dict(dcn=dict(type="DCNv2", deform_groups=1, fallback_on_stride=False),
                  stage_with_dcn=(False, True, True, True)),
)
