# Deformable ConvNets' R-FCN: deformable convolution (v1) in the 3x3 convs of C5 and deformable
# position-sensitive RoI pooling.
_base_ = "./rfcn_r50_coco.py"

model = dict(
    backbone=dict(dcn=dict(type="DCN", deform_groups=1, fallback_on_stride=False),
                  stage_with_dcn=(False, False, False, True)),
    roi_head=dict(bbox_head=dict(no_trans=False)),
)
