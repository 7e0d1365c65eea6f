# The bundled dataset: deformed shapes on cluttered backgrounds, generated on first use into
# ~/.cache/dcn_plugin (or $DCN_PLUGIN_CACHE), deterministic from the seed.
dataset_type = "ShapesDataset"
image_size = 128

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]

train_dataloader = dict(
    batch_size=16,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(type=dataset_type, split="train", seed=0, filter_cfg=dict(filter_empty_gt=True),
                 pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=16,
    num_workers=1,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type=dataset_type, split="val", seed=0, test_mode=True, pipeline=test_pipeline),
)
test_dataloader = val_dataloader

# No ann_file: the metric takes the ground truth of the dataset it evaluates.
val_evaluator = dict(type="CocoMetric", metric="bbox")
test_evaluator = val_evaluator
