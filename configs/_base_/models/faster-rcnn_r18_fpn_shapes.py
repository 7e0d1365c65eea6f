# A small Faster R-CNN for the bundled 128x128 data, trained from scratch on CPU: ResNet-18 at half
# width, FPN P3-P5, an RPN with two anchor sizes per level, RoIAlign and a two-fc box head.
model = dict(
    type="FasterRCNN",
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
    neck=dict(type="FPN", in_channels=[64, 128, 256], out_channels=64, num_outs=3),
    rpn_head=dict(
        type="RPNHead",
        in_channels=64,
        feat_channels=64,
        # Objects of the bundled data are 12-140 pixels: anchors of 16-128.
        anchor_generator=dict(type="AnchorGenerator", scales=[2, 4], ratios=[0.5, 1.0, 2.0],
                              strides=[8, 16, 32]),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
    ),
    roi_head=dict(
        type="StandardRoIHead",
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor",
            roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=2),
            out_channels=64,
            featmap_strides=[8, 16, 32],
            # Boxes under 64 pixels pool from P3, under 128 from P4 (mmdet's 56 is for 800-pixel images).
            finest_scale=32,
        ),
        bbox_head=dict(
            type="Shared2FCBBoxHead",
            in_channels=64,
            fc_out_channels=256,
            roi_feat_size=7,
            num_classes=6,  # the bundled dataset's CLASSES
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
    ),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                          match_low_quality=True),
            sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                         add_gt_as_proposals=False),
        ),
        rpn_proposal=dict(nms_pre=500, max_per_img=300, nms=dict(type="nms", iou_threshold=0.7),
                          min_bbox_size=0),
        rcnn=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                          match_low_quality=False),
            sampler=dict(type="RandomSampler", num=128, pos_fraction=0.25, neg_pos_ub=-1,
                         add_gt_as_proposals=True),
        ),
    ),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=300, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100),
    ),
)
