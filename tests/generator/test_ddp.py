"""DistributedDataParallel on the CPU: two gloo processes under torchrun."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from generator.config import GeneratorConfig
from generator.distributed import torchrun_command
from generator.synthetic import synthetic_data
from generator.training import Trainer

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args, timeout=120):
    command = torchrun_command(2, [WORKER, *map(str, args)])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_two_gloo_processes_train_and_resume_at_another_world_size(tmp_path, caplog):
    run = torchrun(tmp_path, 4)
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    checkpoints = os.listdir(tmp_path / "checkpoints")
    assert checkpoints == ["step-00000004.pt"]  # written by rank 0 only, once
    # the same global batch of 4 on one process: its first loss is close to the two-rank one
    config = GeneratorConfig(preset="tiny", ngf=8, ndf=8, batch_size=4,
                             checkpoint_every=10_000, sample_every=10_000)
    data = synthetic_data(frames=24, size=32)
    single = Trainer(data, config, tmp_path / "single").run(1, progress=False)
    assert abs(single.history[0]["l1"] - history[0]["l1"]) < 0.1 * history[0]["l1"]
    # resuming the two-process checkpoint in one process reseeds and carries on
    caplog.set_level("INFO", logger="generator.training")
    resumed = Trainer(data, config, tmp_path / "checkpoints")
    assert resumed.step == 4
    assert "at world size 1 (was 2): RNG reseeded" in caplog.text
    assert resumed.run(6, progress=False).step == 6


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path):
    run = torchrun(tmp_path, 5, "--fail-rank", 1)
    assert run.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in run.stdout + run.stderr
    assert not (tmp_path / "history.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_on_nccl_train_and_a_failing_rank_ends_the_run(tmp_path):
    run = torchrun(tmp_path / "ok", 6, "--device", "cuda")
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.listdir(tmp_path / "ok" / "checkpoints") == ["step-00000006.pt"]
    failed = torchrun(tmp_path / "bad", 6, "--device", "cuda", "--fail-rank", 1)
    assert failed.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in failed.stdout + failed.stderr
