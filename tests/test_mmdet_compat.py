"""dcn_plugin beside the real mmcv-full 2.1.0 and mmdetection 3.3.0: mmdetection's own configs with
deformable layers build and give mmcv-full's outputs, and its RoI extractor runs our deformable RoI
pooling from ``configs/mmdet/``.

Runs where mmcv-full and mmdetection are installed (``bash ../shared/tools/mmcv-full-env.sh``, then
this file with that venv's python); ``tools/check_mmdet_configs.py`` runs every such config.
"""

from __future__ import annotations

import os
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
import torch
from extras import require

require("mmcv.ops", "mmdet")

from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

import dcn_plugin.layers  # noqa: E402,F401
from dcn_plugin import ops  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, "tools"))
import check_mmdet_configs  # noqa: E402

register_all_modules()


@pytest.mark.parametrize("folder", ["tood", "solov2"])
def test_configs_with_mmcv_legacy_deformable_groups_build_and_match(folder):
    """The configs that failed before (they pass mmcv's legacy ``deformable_groups``)."""
    names = check_mmdet_configs.Names()
    paths = check_mmdet_configs.deformable_configs(check_mmdet_configs.mmdet_config_dir(), [folder])
    assert paths
    for path in paths[:2]:
        parts, diff = check_mmdet_configs.compare(path, names, size=64)
        assert diff <= 1e-4, (path, parts, diff)
    names.use("dcn_plugin")


def _extractor(roi_layer: dict):
    return MODELS.build(dict(type="SingleRoIExtractor", roi_layer=roi_layer, out_channels=8,
                             featmap_strides=[4, 8, 16, 32]))


def _feats_and_rois():
    g = torch.Generator().manual_seed(0)
    feats = tuple(torch.randn(2, 8, 64 // s, 64 // s, generator=g, dtype=torch.float64)
                  for s in (1, 2, 4, 8))
    boxes = torch.tensor([[2.0, 3.0, 40.0, 50.0], [0.0, 0.0, 250.0, 200.0], [10.0, 20.0, 30.0, 26.0]],
                         dtype=torch.float64)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0]], dtype=torch.float64), boxes], dim=1)
    return feats, rois


@pytest.mark.parametrize("modulated", [False, True], ids=["dpool", "mdpool"])
def test_single_roi_extractor_runs_our_deformable_roi_pooling(modulated):
    """mmdetection's SingleRoIExtractor with our class as ``type``, on the CPU: at initialisation
    (zero offsets) it is mmcv-full's RoIAlign (aligned, as mmdetection configures it), times the
    mask's 0.5 when modulated; then it trains (gradients reach the offset head)."""
    cls = ops.ModulatedDeformRoIPoolPack if modulated else ops.DeformRoIPoolPack
    ours = _extractor(dict(type=cls, output_size=7, output_channels=8)).double()
    mmcv_align = _extractor(dict(type="RoIAlign", output_size=7, sampling_ratio=0)).double()
    assert all(isinstance(layer, cls) for layer in ours.roi_layers)
    feats, rois = _feats_and_rois()
    expected = mmcv_align(feats, rois) * (0.5 if modulated else 1.0)
    torch.testing.assert_close(ours(feats, rois), expected, rtol=1e-10, atol=1e-10)

    with torch.no_grad():  # non-zero offsets: the pooled values move and gradients flow to the fcs
        for layer in ours.roi_layers:
            layer.offset_fc[-1].weight.normal_(0, 0.01)
    out = ours(feats, rois)
    assert not torch.allclose(out, expected)
    out.square().sum().backward()
    assert ours.roi_layers[0].offset_fc[0].weight.grad.abs().sum() > 0


def _run(script: str) -> str:
    """Runs ``script`` in a fresh interpreter: ``install()`` changes mmcv.ops for the whole process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def test_install_serves_mmcv_ops_names_everywhere_mmcv_and_mmdet_took_them():
    out = _run("""
        import mmcv.ops, mmcv.ops.deform_conv as deform_conv_module
        from mmdet.models.dense_heads import reppoints_head, vfnet_head
        import dcn_plugin.compat.mmcv as compat
        replaced = compat.install()
        assert mmcv.ops.DeformConv2d is compat.DeformConv2d
        assert mmcv.ops.ModulatedDeformRoIPoolPack is compat.ModulatedDeformRoIPoolPack
        assert deform_conv_module.DeformConv2dPack is compat.DeformConv2dPack
        assert reppoints_head.DeformConv2d is compat.DeformConv2d
        assert vfnet_head.DeformConv2d is compat.DeformConv2d
        assert "mmcv.ops.deform_roi_pool" in replaced and compat.install() == []
        print(len(replaced))
    """)
    assert int(out.split()[-1]) >= 10


@pytest.mark.parametrize("name", ["faster-rcnn_r50_fpn_dpool_1x_coco.py",
                                  "faster-rcnn_r50_fpn_mdpool_1x_coco.py"])
def test_mmdet_dpool_configs_build_and_train_a_step_on_the_cpu(name):
    """mmdetection's own dpool/mdpool configs, through configs/mmdet/ (their custom_imports install
    ours into mmcv.ops): the model's RoI layers are ours, and a training step runs on the CPU."""
    _run(f"""
        import torch
        from mmdet.registry import MODELS
        from mmdet.structures import DetDataSample
        from mmdet.utils import register_all_modules
        from mmengine.config import Config
        from mmengine.structures import InstanceData

        register_all_modules()
        cfg = Config.fromfile("configs/mmdet/{name}")  # runs its custom_imports
        model = MODELS.build(cfg.model)
        extractor = model.roi_head.bbox_roi_extractor
        assert all(type(m).__module__.startswith("dcn_plugin") for m in extractor.roi_layers)
        size = (128, 128)
        sample = DetDataSample(metainfo=dict(img_shape=size, pad_shape=size, ori_shape=size,
                                             scale_factor=(1.0, 1.0), batch_input_shape=size))
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 12.0, 90.0, 100.0]]),
                                           labels=torch.tensor([3]))
        image = torch.randint(0, 255, (3, *size), dtype=torch.uint8)
        data = model.data_preprocessor(dict(inputs=[image], data_samples=[sample]), training=True)
        loss, _ = model.parse_losses(model(**data, mode="loss"))
        loss.backward()
        assert extractor.roi_layers[0].offset_fc[0].weight.grad is not None
    """)
