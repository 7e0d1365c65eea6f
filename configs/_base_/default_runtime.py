default_scope = "dcn_plugin"
custom_imports = dict(imports=["dcn_plugin", "dcn_plugin.engine"], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50),
    param_scheduler=dict(type="ParamSchedulerHook"),
    # mmengine's, without the warnings of an unused file client (dcn_plugin.engine)
    checkpoint=dict(type="dcn_plugin.CheckpointHook", interval=1),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)

# Fails the run at start where the head's num_classes is not the dataset's number of classes.
custom_hooks = [dict(type="NumClassCheckHook")]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)

vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="Visualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=50, by_epoch=True)

log_level = "INFO"
load_from = None
resume = False

# A fixed seed: runs are reproducible, and a resumed run's sampler continues the interrupted
# run's data order (mmengine builds the sampler before it reads the checkpoint's seed).
randomness = dict(seed=0)
