# A small FCOS for the bundled 128x128 data, trained from scratch on CPU: ResNet-18 at half
# width, FPN P3-P5, two-conv GroupNorm towers.
model = dict(
    type="FCOS",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32,
    ),
    backbone=dict(
        type="ResNet",
        depth=18,
        base_channels=32,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
    ),
    neck=dict(
        type="FPN",
        in_channels=[64, 128, 256],
        out_channels=64,
        start_level=0,
        num_outs=3,
    ),
    bbox_head=dict(
        type="FCOSHead",
        num_classes=6,  # the bundled dataset's CLASSES
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        strides=[8, 16, 32],
        regress_ranges=((-1, 24), (24, 48), (48, 1e8)),
        norm_cfg=dict(type="GN", num_groups=16, requires_grad=True),
        center_sampling=True,
        center_sample_radius=1.5,
        norm_on_bbox=True,
        centerness_on_reg=True,
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=1.0),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    ),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type="nms", iou_threshold=0.5),
        max_per_img=100,
    ),
)
