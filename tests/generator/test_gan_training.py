"""Training: exact resume, crash-safe checkpoints, shape checks, and that a tiny net learns."""

import os
import re

import pytest
import torch

from generator import checkpoint as ckpt
from generator.errors import CheckpointError
from generator.metrics import evaluate
from generator.runtime import make_runtime
from generator.synthetic import synthetic_data
from generator.training import Trainer, train
from tests.generator.training_testdata import small_config


def final_state(directory):
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(directory))


def test_resume_is_exact(tmp_path, data):
    config = small_config()
    train(data, config, tmp_path / "split", steps=7, progress=False)  # stops mid-epoch
    resumed = train(data, config, tmp_path / "split", steps=13, progress=False)
    straight = train(data, config, tmp_path / "straight", steps=13, progress=False)
    assert resumed.step == straight.step == 13
    assert [h["l1"] for h in resumed.history] == [h["l1"] for h in straight.history[7:]]
    a, b = final_state(tmp_path / "split"), final_state(tmp_path / "straight")
    for part in ("generator", "discriminator"):
        for key, value in a[part]["state"].items():
            assert torch.equal(value, b[part]["state"][key]), key
    assert (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])
    assert a["opt_g"]["state"][0]["exp_avg"].equal(b["opt_g"]["state"][0]["exp_avg"])


def test_nothing_to_do_when_already_at_the_step(tmp_path, data):
    train(data, small_config(), tmp_path, steps=2, progress=False)
    result = train(data, small_config(), tmp_path, steps=2, progress=False)
    assert result.step == 2 and result.history == []


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch):
    trainer = Trainer(data, small_config(), tmp_path)
    trainer.run(1, progress=False)
    good = ckpt.latest_checkpoint(tmp_path)
    assert good.name == "step-00000001.pt"
    before = good.read_bytes()

    def dies_half_way(obj, fh):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        trainer.run(2, progress=False)
    assert os.listdir(tmp_path) == ["step-00000001.pt"]  # no partial file left, none renamed
    assert good.read_bytes() == before
    monkeypatch.undo()
    resumed = Trainer(data, small_config(), tmp_path)
    assert resumed.step == 1


def test_a_partial_file_is_never_taken_for_a_checkpoint(tmp_path):
    (tmp_path / ".step-00000009.pt.123.partial").write_bytes(b"junk")
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_only_the_newest_checkpoints_are_kept(tmp_path, data):
    train(data, small_config(checkpoint_every=1, keep_checkpoints=2), tmp_path, steps=4,
          progress=False)
    assert sorted(os.listdir(tmp_path)) == ["step-00000003.pt", "step-00000004.pt"]


def test_a_checkpoint_of_another_shape_is_refused(tmp_path, data):
    train(data, small_config(ngf=8), tmp_path, steps=1, progress=False)
    path = tmp_path / "step-00000001.pt"
    with pytest.raises(CheckpointError) as err:
        Trainer(data, small_config(ngf=16), tmp_path)
    assert str(err.value) == (
        f"{path} holds a generator of another shape (input_skip True, n_w 11, ngf 8, size 32, "
        "upsample resize) than this run's (input_skip True, n_w 11, ngf 16, size 32, upsample "
        "resize): use the matching preset and resolution, or another target directory")


def test_a_damaged_checkpoint_is_named(tmp_path):
    (tmp_path / "step-00000005.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'step-00000005.pt'} is not a readable checkpoint")):
        ckpt.load_checkpoint(tmp_path / "step-00000005.pt")


def test_tiny_net_learns_and_writes_samples(tmp_path):
    data = synthetic_data(frames=64, size=64)
    config = small_config(batch_size=4, sample_every=100)
    trainer = Trainer(data, config, tmp_path / "checkpoints", tmp_path / "samples")
    device = torch.device("cpu")
    before = evaluate(make_runtime(trainer.g, "cpu", device), data, device)
    result = trainer.run(150, progress=False)
    after = evaluate(make_runtime(trainer.g, "cpu", device), data, device)
    assert after["model"]["l1"] < 0.6 * before["model"]["l1"]
    assert after["model"]["psnr"] > before["model"]["psnr"] + 4
    first, last = (sum(h["l1"] for h in part) / 10 for part in
                   (result.history[:10], result.history[-10:]))
    assert last < 0.6 * first
    samples = sorted(os.listdir(tmp_path / "samples"))
    assert samples[-2:] == ["step-00000100.png", "step-00000150.png"]
    assert any(name.startswith("events.out.tfevents") for name in samples)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_resumes_samples_and_evaluates(tmp_path):
    device = torch.device("cuda")
    data = synthetic_data(frames=64, size=64)
    config = small_config(batch_size=4, sample_every=20, checkpoint_every=20)
    trainer = Trainer(data, config, tmp_path / "c", tmp_path / "s", device)
    assert trainer.dataset.device == device  # the cache lives on the GPU
    first = trainer.run(40, progress=False)
    assert sum(h["l1"] for h in first.history[-10:]) < sum(h["l1"] for h in first.history[:10])
    resumed = Trainer(data, config, tmp_path / "c", tmp_path / "s", device)
    assert resumed.step == 40 and resumed.run(50, progress=False).step == 50
    assert "step-00000040.png" in os.listdir(tmp_path / "s")
    model = ckpt.latest_generator(tmp_path / "c", device)
    report = evaluate(make_runtime(model, "torch", device), data, device)
    cpu = evaluate(make_runtime(model.cpu(), "cpu", torch.device("cpu")), data,
                   torch.device("cpu"))
    assert abs(report["model"]["psnr"] - cpu["model"]["psnr"]) < 0.5
