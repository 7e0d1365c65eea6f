# A small R-FCN (Dai et al., 2016) for the bundled 128x128 data, in the layout of Deformable ConvNets'
# R-FCN: ResNet-18 at half width whose C5 is dilated instead of strided, the RPN on C4, and
# position-sensitive score maps on C5 pooled in 7x7 bins. C4 and C5 keep stride 8 here (the paper's
# 16 is for ~600-pixel images; at 128 pixels it would leave the smallest objects under one cell).
model = dict(
    type="RFCN",
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
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        out_indices=(2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
    ),
    rpn_head=dict(
        type="RPNHead",
        in_channels=128,
        feat_channels=128,
        anchor_generator=dict(type="AnchorGenerator", scales=[2, 4, 8, 16], ratios=[0.5, 1.0, 2.0],
                              strides=[8]),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
    ),
    roi_head=dict(
        type="RFCNRoIHead",
        bbox_head=dict(
            type="PSRoIBBoxHead",
            in_channels=256,
            feat_channels=256,
            num_classes=6,  # the bundled dataset's CLASSES
            group_size=7,
            sample_per_part=4,
            spatial_scale=1 / 8,
            trans_std=0.1,
            no_trans=True,  # plain position-sensitive RoI pooling; the _dpsroi configs turn it off
            reg_class_agnostic=True,
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
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
