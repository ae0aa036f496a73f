"""`dvp train`, `dvp eval`, `dvp export` on a target directory whose conditioning is cached.

The conditioning renderer is stood in for by the synthetic target's own conditioning: the
commands read the cache, so these tests cover everything after rendering.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from generator.config import GeneratorConfig
from generator.dataset import cache_conditioning
from generator.synthetic import synthetic_data
from generator.target import TargetInfo, TargetWriter, software_versions
from streamer.cli.commands import COMMANDS, generator_cmds
from streamer.cli.config import Config
from streamer.cli.main import build_parser
from tracker.params import FaceParams

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"ngf": 8, "ndf": 8, "batch_size": 4, "sample_every": 20, "checkpoint_every": 20}


class CachedRenderer:
    """A ConditioningSource that returns the synthetic target's conditioning."""

    def __init__(self, data):
        self.data = data

    def frames(self, params, indices=None):
        return torch.from_numpy(self.data.conditioning[indices]).float() / 255

    def masks(self, params, indices=None):
        return torch.from_numpy(self.data.masks[indices]).float()


@pytest.fixture(scope="module")
def target(tmp_path_factory, dvp_home):  # dvp_home: the face model, for the mouth box
    data = synthetic_data(frames=40, size=32)
    root = tmp_path_factory.mktemp("cli") / "target"
    with TargetWriter(root) as w:
        for frame in data.frames:
            w.add_frame(frame)
        names = [f"e{i}" for i in range(53)]
        w.write_params(FaceParams.empty(40, names, (32, 32), 40.0, data.timestamps))
        w.write_albedo(np.full((8, 8, 3), 200, np.uint8))
        w.write_neutral({"expression": np.zeros(53, np.float32)})
        target = w.commit(TargetInfo(
            source_video="synthetic", source_sha256="0" * 64, crop=(0, 0, 32), resolution=32,
            window=11, preset="tiny", holdout_start=data.holdout_start, frames=40, fps=data.fps,
            consent="synthetic actor", software=software_versions()))
    cache_conditioning(target, lambda: CachedRenderer(data))
    return root


def dvp(argv, capsys, stderr=False):
    """Run a command as `dvp` would, with the small-network settings as the config."""
    args = build_parser([generator_cmds]).parse_args([*argv, "--device", "cpu"])
    config = Config(generator=GeneratorConfig(**SETTINGS))
    code = args._run(args, config)
    captured = capsys.readouterr()
    return (code, captured.out, captured.err) if stderr else (code, captured.out)


def test_train_eval_export(target, capsys):
    code, out, err = dvp(["train", str(target), "--steps", "30"], capsys, stderr=True)
    assert code == 0
    assert out.strip() == str(target / "checkpoints" / "step-00000030.pt")
    assert re.search(r"^dvp train: step 30, \d+\.\d images/s on 1 process \(global batch 4\)$",
                     err, re.MULTILINE), err
    assert sorted(os.listdir(target / "checkpoints")) == ["step-00000020.pt", "step-00000030.pt"]
    assert {"step-00000020.png", "step-00000030.png"} <= set(os.listdir(target / "samples"))

    code, out = dvp(["eval", str(target)], capsys)
    report = json.loads(out)
    assert code == 0 and report["frames"] == 4
    assert set(report["model"]) == set(report["baseline"]) == {"psnr", "ssim", "l1"}
    assert set(report["regions"]) == {"face", "mouth", "background"}
    for region in report["regions"].values():
        assert 1 <= region["frames"] <= 4
        assert set(region["model"]) == set(region["baseline"]) == {"psnr", "ssim", "l1"}

    code, out = dvp(["export", str(target), "--backend", "onnx"], capsys)
    assert code == 0 and out.strip() == str(target / "engine" / "generator.onnx")
    assert (target / "engine" / "onnx.json").is_file()


@pytest.mark.skipif(generator_cmds not in COMMANDS, reason="'dvp train' is not registered in "
                    "streamer.cli.commands yet (it waits for renderer.conditioning)")
def test_train_on_two_processes_through_torchrun(target, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = [s for k, v in SETTINGS.items() for s in ("--set", f"generator.{k}={v}")]
    code, _ = dvp(["train", str(target), "--steps", "32", "--gpus", "2", *settings], capsys)
    assert code == 0
    assert "step-00000032.pt" in os.listdir(target / "checkpoints")


def test_eval_without_checkpoint_says_so(tmp_path, target, capsys):
    from generator.errors import CheckpointError

    empty = tmp_path / "t"
    os.symlink(target, empty)  # same target, but look for checkpoints via the link
    for path in (target / "checkpoints").iterdir():
        path.rename(tmp_path / path.name)
    try:
        with pytest.raises(CheckpointError) as err:
            dvp(["eval", str(empty)], capsys)
        assert str(err.value) == (f"no checkpoint in {empty / 'checkpoints'}: run "
                                  f"'dvp train {empty}' first")
    finally:
        for path in tmp_path.glob("step-*.pt"):
            path.rename(target / "checkpoints" / path.name)


def test_an_export_of_an_older_checkpoint_is_refused(tmp_path, target, capsys):
    """dvp export records the checkpoint's sha256; after more training the export is stale:
    the `onnx` backend refuses it by name, `auto` on the CPU does not use it."""
    import shutil

    from generator.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from generator.errors import BackendError
    from generator.runtime import load_runtime, stale_export
    from generator.target import TargetDir, file_sha256

    root = Path(shutil.copytree(target, tmp_path / "t"))
    assert dvp(["export", str(root)], capsys)[0] == 0
    first = latest_checkpoint(root / "checkpoints")
    record = json.loads((root / "engine" / "onnx.json").read_text())["checkpoint"]
    assert record == {"name": first.name, "sha256": file_sha256(first)}
    tdir = TargetDir(root)
    assert load_runtime(tdir, "onnx", torch.device("cpu")).backend == "onnx"
    state = load_checkpoint(first)  # "more training": a newer checkpoint, other weights
    state["step"] += 1
    for value in state["generator"]["state"].values():
        if value.is_floating_point():
            value.add_(0.01)
    newer = save_checkpoint(root / "checkpoints", state)
    with pytest.raises(BackendError) as err:
        load_runtime(tdir, "onnx", torch.device("cpu"))
    assert str(err.value) == (
        f"backend 'onnx' refuses a stale export: {root}/engine/generator.onnx was exported "
        f"from {first.name} (sha256 {record['sha256'][:12]}), not from the latest checkpoint "
        f"{newer.name} (sha256 {file_sha256(newer)[:12]}): run 'dvp export {root} --backend "
        "onnx' again")
    assert load_runtime(tdir, "auto", torch.device("cpu")).backend == "cpu"
    (root / "engine" / "onnx.json").write_text("{}")  # an export from before the record
    assert stale_export(root, "onnx", newer, file_sha256(newer)) == (
        f"{root}/engine/generator.onnx does not record the checkpoint it was exported from "
        f"({root}/engine/onnx.json has no 'checkpoint'), so it may run an older network than "
        f"{newer.name}: run 'dvp export {root} --backend onnx' again")
    plan = root / "engine" / "generator.plan"  # the same record check for a TensorRT engine
    plan.write_bytes(b"engine")
    (root / "engine" / "engine.json").write_text(json.dumps({"checkpoint": record}))
    assert stale_export(root, "tensorrt", first, record["sha256"]) is None
    assert "was exported from" in stale_export(root, "tensorrt", newer, file_sha256(newer))
    assert dvp(["export", str(root)], capsys)[0] == 0  # exported again: usable again
    assert load_runtime(tdir, "onnx", torch.device("cpu")).backend == "onnx"
