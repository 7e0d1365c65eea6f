# Faster R-CNN with deformable convolution (DCNv1) in ResNet stages c3-c5.
_base_ = "./faster-rcnn_r18_fpn_shapes.py"

model = dict(
    backbone=dict(dcn=dict(type="DCN", deform_groups=1, fallback_on_stride=False),
                  stage_with_dcn=(False, True, True, True)),
)
