# Quick start, R-FCN with position-sensitive RoI pooling:
#   python tools/train.py configs/quickstart/rfcn_r18_shapes.py
_base_ = [
    "../_base_/models/rfcn_r18_shapes.py",
    "../_base_/datasets/shapes_detection.py",
    "../_base_/schedules/schedule_quickstart.py",
    "../_base_/default_runtime.py",
]

# Iteration-based logging and checkpoints (a killed run resumes with --resume).
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=50),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=250, max_keep_ckpts=2),
)
log_processor = dict(by_epoch=False)
