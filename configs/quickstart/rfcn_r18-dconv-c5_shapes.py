# R-FCN with deformable convolution (DCNv1) in ResNet stage c5.
_base_ = "./rfcn_r18_shapes.py"

model = dict(
    backbone=dict(dcn=dict(type="DCN", deform_groups=1, fallback_on_stride=False),
                  stage_with_dcn=(False, False, False, True)),
)
