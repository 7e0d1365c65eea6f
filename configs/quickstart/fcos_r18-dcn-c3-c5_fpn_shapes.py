# Quick start with DCN (v1) in ResNet stages c3-c5 and on the last conv of the head's towers.
_base_ = "./fcos_r18_fpn_shapes.py"

model = dict(
    backbone=dict(dcn=dict(type="DCN", deform_groups=1, fallback_on_stride=False),
                  stage_with_dcn=(False, True, True, True)),
    bbox_head=dict(dcn_on_last_conv=True, dcn_cfg=dict(type="DCN")),
)
