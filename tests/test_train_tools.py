"""tools/train.py and tools/test.py end to end on a tiny bundled dataset: single process,
resume after a checkpoint, a two-process torchrun (gloo) run, and checkpoint -> metrics."""

import os
import os.path as osp
import re
import shutil
import socket
import subprocess
import sys

import torch
from extras import require_detector  # noqa: E402

require_detector()

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, "configs", "quickstart", "fcos_r18-dcnv2-c3-c5_fpn_shapes.py")
TINY = [
    "train_cfg.max_iters=4", "train_cfg.val_interval=4",
    "default_hooks.checkpoint.interval=2", "default_hooks.checkpoint.max_keep_ckpts=5",
    "default_hooks.logger.interval=1", "log_processor.window_size=1",
    "train_dataloader.batch_size=2", "val_dataloader.batch_size=2",
]
for split in ("train_dataloader", "val_dataloader"):
    TINY += [f"{split}.num_workers=0", f"{split}.persistent_workers=False",
             f"{split}.dataset.num_train=8", f"{split}.dataset.num_val=4", f"{split}.dataset.image_size=64"]
# Resuming is compared bit for bit with an uninterrupted run: no random flips.
NO_FLIP = ["train_dataloader.dataset.pipeline.3.prob=0.0"]


def run(args, tmp_path, timeout=300, returncode=0):
    env = dict(os.environ, DCN_PLUGIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert (proc.returncode == 0) == (returncode == 0), proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def train(work_dir, tmp_path, *extra, options=()):
    return run(["tools/train.py", CONFIG, "--work-dir", str(work_dir), *extra,
                "--cfg-options", *TINY, *options], tmp_path)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_then_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    log = train(full, tmp_path, options=NO_FLIP)
    assert "Iter(train) [4/4]" in log and "coco/bbox_mAP" in log
    # No registry warning (the scope defines every child registry mmengine looks up) and no
    # deprecation warning (from our code, configs, or the file clients mmengine builds unused).
    warnings = [line for line in log.splitlines() if "WARNING" in line or "Warning:" in line]
    assert not warnings, "\n".join(warnings)
    assert (full / "iter_2.pth").exists() and (full / "iter_4.pth").exists()

    # A run killed after its iter-2 checkpoint: the work dir holds that checkpoint and points at it.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(full / "iter_2.pth", stopped / "iter_2.pth")
    (stopped / "last_checkpoint").write_text(str(stopped / "iter_2.pth"))
    log = train(stopped, tmp_path, "--resume", options=NO_FLIP)
    assert re.search(r"resumed epoch: \d+, iter: 2", log), log[-3000:]
    assert "Iter(train) [3/4]" in log and "Iter(train) [1/4]" not in log

    resumed, reference = load(stopped / "iter_4.pth"), load(full / "iter_4.pth")
    assert resumed["meta"]["iter"] == reference["meta"]["iter"] == 4
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, msg=key)
    ref_state, res_state = reference["optimizer"]["state"], resumed["optimizer"]["state"]
    assert ref_state.keys() == res_state.keys() and len(ref_state) > 0
    for index, entries in ref_state.items():  # e.g. AdamW's step, exp_avg, exp_avg_sq
        assert res_state[index].keys() == entries.keys()
        for name, value in entries.items():
            torch.testing.assert_close(res_state[index][name], value, msg=f"optimizer state {index}.{name}")
    assert resumed["param_schedulers"] == reference["param_schedulers"]

    # tools/test.py: checkpoint -> the same COCO metrics keys.
    out = run(["tools/test.py", CONFIG, str(full / "iter_4.pth"), "--work-dir", str(tmp_path / "test"),
               "--out", str(tmp_path / "predictions.pkl"), "--cfg-options", *TINY], tmp_path)
    assert "coco/bbox_mAP_50" in out and (tmp_path / "predictions.pkl").exists()


def test_head_with_fewer_classes_than_the_dataset_fails_at_start(tmp_path):
    checkpoint = tmp_path / "empty.pth"  # loads with missing keys; the check fails before testing
    torch.save({"state_dict": {}}, checkpoint)
    for tool in (["tools/train.py", CONFIG], ["tools/test.py", CONFIG, str(checkpoint)]):
        log = run([*tool, "--work-dir", str(tmp_path / "mismatch"), "--cfg-options", *TINY,
                   "model.bbox_head.num_classes=5"], tmp_path, returncode=1)
        assert "model.bbox_head.num_classes is 5, but the" in log, log[-3000:]
        assert "has 6 classes ('triangle', 'square', 'star', 'cross', 'ring', 'heart')" in log
        assert "set model.bbox_head.num_classes=6" in log
        assert "Iter(train)" not in log


def test_resume_from_explicit_checkpoint_path(tmp_path):
    first = tmp_path / "first"
    train(first, tmp_path, options=["train_cfg.max_iters=2", "train_cfg.val_interval=2"])
    log = train(tmp_path / "second", tmp_path, "--resume", str(first / "iter_2.pth"))
    assert re.search(r"resumed epoch: \d+, iter: 2", log)
    assert load(tmp_path / "second" / "iter_4.pth")["meta"]["iter"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_torchrun(tmp_path):
    work_dir = tmp_path / "dist"
    log = run(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "tools/train.py", CONFIG, "--launcher", "pytorch", "--work-dir", str(work_dir),
               "--cfg-options", *TINY, "train_cfg.max_iters=3", "train_cfg.val_interval=3"], tmp_path, 600)
    assert "Distributed launcher: pytorch" in log and "Distributed training: True" in log
    assert "Iter(train) [3/3]" in log and "coco/bbox_mAP" in log
    assert (work_dir / "iter_2.pth").exists()


def test_amp_training_on_cpu_runs_in_bfloat16(tmp_path):
    log = train(tmp_path / "amp", tmp_path, "--amp",
                options=["train_cfg.max_iters=2", "train_cfg.val_interval=2"])
    assert "CPUAutocastOptimWrapper" in log and "Iter(train) [2/2]" in log
    assert re.search(r"loss: \d+\.\d+", log) and "nan" not in log.split("Iter(train) [2/2]")[1].split("\n")[0]


def test_time_train_step_times_each_config_on_the_same_batches(tmp_path):
    plain = osp.join(ROOT, "configs", "quickstart", "fcos_r18_fpn_shapes.py")
    out = run(["tools/time_train_step.py", plain, CONFIG, "--steps", "1", "--rounds", "1", "--cfg-options",
               *[o for o in TINY if o.startswith("train_dataloader")]], tmp_path)
    lines = [line for line in out.splitlines() if "ms/step" in line]
    assert len(lines) == 2 and lines[0].split()[2] == "1.00x" and lines[1].endswith(CONFIG), out[-2000:]
