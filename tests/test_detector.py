"""The detector built from the bundled configs: modes, learning, and config-only layer swaps."""

import glob
import os
import os.path as osp

import pytest
import torch
from extras import require_detector  # noqa: E402

require_detector()

from mmengine.config import Config  # noqa: E402

import dcn_plugin.models  # noqa: E402,F401
from dcn_plugin.datasets.shapes import CLASSES  # noqa: E402
from dcn_plugin.layers import LAYERS  # noqa: E402
from dcn_plugin.models.roi_heads import PSRoIBBoxHead  # noqa: E402
from dcn_plugin.ops import DeformRoIPoolPack  # noqa: E402
from dcn_plugin.registry import MODELS  # noqa: E402
from dcn_plugin.structures import DetDataSample, InstanceData  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
QUICK = osp.join(ROOT, "configs", "quickstart")
DEFORMABLE = tuple(LAYERS.values())


def build(config, **model_overrides):
    cfg = Config.fromfile(config)
    cfg.model.update(model_overrides)
    return MODELS.build(cfg.model)


def batch(num_images=2, size=(96, 128), seed=0):
    """A preprocessor-ready batch: uint8 images and samples with a few boxes each."""
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(num_images):
        h, w = size[0] - 8 * i, size[1]  # different sizes: the preprocessor pads
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        s = DetDataSample(metainfo=dict(img_id=i, img_shape=(h, w), ori_shape=(h, w),
                                        scale_factor=(1.0, 1.0)))
        boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [50.0, 20.0, 120.0, 80.0]])
        s.gt_instances = InstanceData(bboxes=boxes, labels=torch.tensor([i % 5, 3]))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize("config", sorted(glob.glob(osp.join(QUICK, "*.py"))), ids=osp.basename)
def test_quickstart_heads_predict_every_bundled_class(config):
    model = Config.fromfile(config).model
    head = model.bbox_head if "bbox_head" in model else model.roi_head.bbox_head
    assert head.num_classes == len(CLASSES) == 6


def test_loss_predict_tensor_modes():
    torch.manual_seed(0)
    model = build(osp.join(QUICK, "fcos_r18-dcnv2-c3-c5_fpn_shapes.py"))
    model.init_weights()
    data = model.data_preprocessor(batch(), training=True)
    assert data["inputs"].shape == (2, 3, 96, 128) and data["inputs"].dtype == torch.float32
    assert data["data_samples"][1].batch_input_shape == (96, 128)
    losses = model(**data, mode="loss")
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    cls, reg, ctr = model(data["inputs"], mode="tensor")
    n = len(CLASSES)
    assert [tuple(c.shape) for c in cls] == [(2, n, 12, 16), (2, n, 6, 8), (2, n, 3, 4)]
    assert [tuple(r.shape) for r in reg] == [(2, 4, 12, 16), (2, 4, 6, 8), (2, 4, 3, 4)]
    assert [tuple(c.shape) for c in ctr] == [(2, 1, 12, 16), (2, 1, 6, 8), (2, 1, 3, 4)]
    model.eval()
    with torch.no_grad():
        out = model(**model.data_preprocessor(batch(), training=False), mode="predict")
    assert len(out) == 2
    for sample in out:
        pred = sample.pred_instances
        assert pred.bboxes.shape[1] == 4 and pred.scores.shape == pred.labels.shape == (len(pred),)
    with pytest.raises(ValueError, match="mode"):
        model(data["inputs"], mode="bogus")


@pytest.mark.parametrize("name", ["fcos_r18_fpn_shapes", "fcos_r18-dcnv2-c3-c5_fpn_shapes"])
def test_training_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = build(osp.join(QUICK, f"{name}.py"))
    model.init_weights()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = batch(num_images=4)
    losses = []
    for _ in range(12):
        log_vars = model.train_step(data, _optim_wrapper(optimizer))
        losses.append(log_vars["loss"].item())
    assert all(map(lambda v: v == v, losses))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def _optim_wrapper(optimizer):
    from mmengine.optim import OptimWrapper

    return OptimWrapper(optimizer)


def layer_types(model):
    return {name: type(m) for name, m in model.named_modules()}


def test_config_swap_changes_only_the_deformable_layers():
    plain = build(osp.join(QUICK, "fcos_r18_fpn_shapes.py"))
    for variant, expected in [("fcos_r18-dcn-c3-c5_fpn_shapes", "DCN"),
                              ("fcos_r18-dcnv2-c3-c5_fpn_shapes", "DCNv2")]:
        deformable = build(osp.join(QUICK, f"{variant}.py"))
        plain_types, dcn_types = layer_types(plain), layer_types(deformable)
        changed = {n for n in plain_types if plain_types[n] is not dcn_types.get(n)}
        # Every changed module is a conv that became the expected deformable layer ...
        assert changed and all(plain_types[n] is torch.nn.Conv2d for n in changed)
        assert {dcn_types[n].__name__ for n in changed} == {expected}
        # ... in stages c3-c5 (layer2-4; conv1 carries the stride in BasicBlock) and on the
        # last conv of both head towers, nowhere else.
        backbone = sorted(n for n in changed if n.startswith("backbone."))
        assert backbone == [f"backbone.layer{s}.{b}.conv1" for s in (2, 3, 4) for b in (0, 1)]
        assert sorted(n for n in changed if n.startswith("bbox_head.")) == [
            "bbox_head.cls_convs.1.conv", "bbox_head.reg_convs.1.conv"]
        # Modules only the deformable model has are the layers' own children (offset generators).
        extra = set(dcn_types) - set(plain_types)
        assert extra and all(any(e.startswith(n + ".") for n in changed) for e in extra)
        # Same parameters apart from the generators.
        plain_shapes = {k: v.shape for k, v in plain.state_dict().items()}
        dcn_shapes = {k: v.shape for k, v in deformable.state_dict().items()
                      if ".conv_offset." not in k and ".conv_mask." not in k}
        assert plain_shapes == dcn_shapes


def test_every_config_builds():
    configs = sorted(glob.glob(osp.join(ROOT, "configs", "**", "*.py"), recursive=True))
    # configs/mmdet/ holds configs for mmdetection itself (tests/test_mmdet_compat.py builds them)
    configs = [c for c in configs if "_base_" not in c and f"{os.sep}mmdet{os.sep}" not in c]
    assert len(configs) >= 19
    for path in configs:
        cfg = Config.fromfile(path)
        model = MODELS.build(cfg.model)  # builds; pretrained weights are only loaded by init_weights
        name = osp.basename(path)
        # Names say what is deformable: "dcn"/"dconv" the convolutions, "dpool"/"dpsroi" the RoI pooling.
        deformable_conv = any(isinstance(m, DEFORMABLE) for m in model.modules())
        assert ("dcn" in name or "dconv" in name) == deformable_conv, path
        roi_layers = [m for m in model.modules() if isinstance(m, (DeformRoIPoolPack, PSRoIBBoxHead))]
        deformable_pooling = any(not getattr(m, "no_trans", False) for m in roi_layers)
        assert ("dpool" in name or "dpsroi" in name) == deformable_pooling, path
