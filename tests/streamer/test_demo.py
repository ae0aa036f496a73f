"""`dvp demo`: the whole system end to end at a tiny size, reuse on a second run, settings and
bad output directories."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
import yaml

from streamer.cli.config import ConfigError
from streamer.cli.main import main
from streamer.jobs.demo import (
    DEMO_CONFIG,
    REPORT_KEYS,
    STEPS,
    DemoError,
    DemoSettings,
    load_demo_config,
    run_demo,
)
from streamer.video.io import probe, read_video
from streamer.video.mark import has_synthetic_mark

#: A demo of seconds: 40 target frames at 64 px, 16 source frames, 16 training steps, the
#: tests' small landmark regressor.
TINY = {
    "demo": {"target_frames": 40, "source_frames": 16, "synth_size": 80, "cpu_resolution": 64,
             "cpu_steps": 16, "cpu_batch": 2},
    "renderer": {"photometric_steps": 10, "albedo_size": 32},
    "tracker": {"regressor_samples": 6000, "regressor_epochs": 8},
}
S = 64


@dataclasses.dataclass
class DemoRun:
    out: Path
    demo_file: Path
    report: dict[str, Any]
    seconds: float


def _run(out: Path, demo_file: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    config, settings = load_demo_config(demo_file, None, overrides)
    return run_demo(out, config, settings, torch.device("cpu"))


@pytest.fixture(scope="module")
def demo_run(dvp_home: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    root = tmp_path_factory.mktemp("demo")
    demo_file = root / "tiny.yaml"
    demo_file.write_text(yaml.safe_dump(TINY))
    start = time.perf_counter()
    report = _run(root / "demo", demo_file)
    return DemoRun(root / "demo", demo_file, report, time.perf_counter() - start)


def test_demo_writes_the_video_and_the_report(demo_run: DemoRun) -> None:
    out, report = demo_run.out, demo_run.report
    assert list(report) == list(REPORT_KEYS)
    assert json.loads((out / "report.json").read_text()) == report
    held = report["heldout"]
    assert held["frames"] == 4  # the last 10 % of 40
    for who in ("model", "baseline"):
        assert set(held[who]) == {"psnr", "ssim", "l1"}
        assert all(np.isfinite(v) for v in held[who].values())
    assert set(report["stage_ms"]) >= {"landmarks", "fit", "transfer", "render", "window",
                                       "generator"}
    assert report["frames"] == {"target": 40, "heldout": 4, "source": 16, "reenacted": 16,
                                "source_with_face": 16}
    assert report["device"].startswith("cpu") and report["backend"] == "cpu"
    assert report["preset"] == "tiny" and report["resolution"] == S and report["batch"] == 2
    assert report["trained_steps"] == report["wanted_steps"] == 16
    assert not report["stopped_by_time_limit"]
    assert list(report["steps"]) == list(STEPS)
    assert all(not s["reused"] and s["seconds"] > 0 for s in report["steps"].values())
    assert report["synthetic"] is True and report["outputs"]["size"] == [S, 3 * S]

    info = probe(out / "out.mp4")
    assert (info.width, info.height) == (3 * S, S) and info.frame_count == 16
    frames, _, _ = read_video(out / "out.mp4")
    assert all(has_synthetic_mark(f[:, 2 * S:]) for f in frames)  # on the output panel
    assert not has_synthetic_mark(frames[0][:, :S])  # the source is shown as it is
    with av.open(str(out / "out.mp4")) as container:
        assert container.metadata.get("synthetic") == "true"

    meta = yaml.safe_load((out / "target" / "target.yaml").read_text())
    assert "synthetic actor" in meta["consent"] and meta["resolution"] == S
    from tracker.params import FaceParams

    target = FaceParams.load(out / "actors" / "target" / "params.npz")
    source = FaceParams.load(out / "actors" / "source" / "params.npz")
    assert not np.allclose(target.identity, source.identity)  # another identity
    assert not [p for p in out.rglob(".*") if "partial" in p.name]  # nothing left aside


def test_a_second_run_reuses_everything(demo_run: DemoRun) -> None:
    out = demo_run.out
    kept = [out / "out.mp4", out / "actors" / "target" / "video.mp4",
            out / "actors" / "source" / "params.npz", out / "target" / "target.yaml",
            *(out / "target" / "checkpoints").iterdir()]
    before = {p: p.stat().st_mtime_ns for p in kept}
    start = time.perf_counter()
    report = _run(out, demo_run.demo_file)
    seconds = time.perf_counter() - start
    assert seconds < max(2.0, demo_run.seconds / 10)
    assert all(s["reused"] for s in report["steps"].values())
    assert {p: p.stat().st_mtime_ns for p in kept} == before
    assert report["heldout"] == demo_run.report["heldout"]
    assert report["stage_ms"] == demo_run.report["stage_ms"]


def test_the_command_reuses_and_prints_the_outputs(demo_run: DemoRun,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = demo_run.out
    mtime = (out / "out.mp4").stat().st_mtime_ns
    assert main(["demo", "-o", str(out), "--demo-config", str(demo_run.demo_file),
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split() == [str(out / "out.mp4"), str(out / "report.json")]
    assert (out / "out.mp4").stat().st_mtime_ns == mtime


def test_serve_starts_the_live_server_on_the_demo_target(
        demo_run: DemoRun, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from streamer.cli.commands import live

    served: list[Any] = []

    async def start_and_stop(server: Any) -> int:  # `dvp serve`'s loop, without the wait
        url = await server.start()
        print(url, flush=True)
        served.append(server)
        await server.close()
        return 0

    monkeypatch.setattr(live, "_run_server", start_and_stop)
    assert main(["demo", "-o", str(demo_run.out), "--demo-config", str(demo_run.demo_file),
                 "--device", "cpu", "--serve", "--port", "0"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [str(demo_run.out / "out.mp4"), str(demo_run.out / "report.json")]
    assert printed[2].startswith("http://127.0.0.1:")
    assert served[0].target.root == demo_run.out / "target"


def test_a_changed_source_redoes_only_what_reads_it(demo_run: DemoRun) -> None:
    out = demo_run.out
    checkpoint = next((out / "target" / "checkpoints").iterdir())
    mtime = checkpoint.stat().st_mtime_ns
    report = _run(out, demo_run.demo_file, ("demo.source_seed=9",))
    reused = {step: s["reused"] for step, s in report["steps"].items()}
    assert reused == {"synth_target": True, "synth_source": False, "prepare": True,
                      "train": True, "eval": True, "reenact": False}
    assert checkpoint.stat().st_mtime_ns == mtime
    assert report["settings"]["source_seed"] == 9


def test_bad_output_directories(dvp_home: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    config, settings = load_demo_config()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DemoError, match=r"file exists and is not a directory: choose another"):
        run_demo(a_file, config, settings)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match=r"mine is not empty and was not made by 'dvp demo' "
                                        r"\(it has no demo.json\)"):
        run_demo(foreign, config, settings)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "demo.json").write_text("{")
    with pytest.raises(DemoError, match=r"demo.json is not a dvp demo record"):
        run_demo(broken, config, settings)
    assert main(["demo", "-o", str(a_file), "--device", "cpu"]) == 1
    assert "dvp: error: " in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine" and a_file.read_text() == "x"


@pytest.mark.parametrize(("override", "message"), [
    ("demo.source_seed=1", "demo.target_seed and demo.source_seed are both 1"),
    ("demo.cpu_resolution=100",
     "demo.cpu_resolution must be a power of two of at least 16, got 100"),
    ("demo.cpu_preset=huge", "demo.cpu_preset 'huge' is not a preset: use paper, tiny"),
    ("demo.target_frames=5", "demo.target_frames must be at least 20, got 5"),
    ("demo.mode=wild", "demo.mode 'wild' is not a mode"),
])
def test_bad_settings_are_named(tmp_path: Path, override: str, message: str) -> None:
    config, settings = load_demo_config(overrides=("demo.target_seed=1", override))
    with pytest.raises(DemoError, match=message.replace("(", r"\(")):
        run_demo(tmp_path / "d", config, settings)
    assert not (tmp_path / "d").exists()  # nothing made before the check


def test_demo_yaml_is_the_embedded_default() -> None:
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    assert data["demo"] == dataclasses.asdict(DemoSettings())
    config, settings = load_demo_config()
    assert settings == DemoSettings()
    # a fixed number of steps: the demo's model must not depend on the machine's load
    assert "max_minutes" not in data["generator"] and config.generator.max_minutes == 0


def test_demo_config_layers_and_errors(tmp_path: Path) -> None:
    extra = tmp_path / "c.yaml"
    extra.write_text("renderer:\n  photometric_steps: 7\n")
    config, settings = load_demo_config(DEMO_CONFIG, extra,
                                        ("demo.cpu_steps=5", "generator.max_minutes=1"))
    assert config.renderer.photometric_steps == 7 and settings.cpu_steps == 5
    assert config.generator.max_minutes == 1.0
    assert config.generator.checkpoint_every == yaml.safe_load(
        DEMO_CONFIG.read_text())["generator"]["checkpoint_every"]
    with pytest.raises(ConfigError, match=r"unknown config key 'demo\.nope'"):
        load_demo_config(overrides=("demo.nope=1",))
    with pytest.raises(ConfigError, match=r"config key 'demo\.cpu_steps' expects int"):
        load_demo_config(overrides=("demo.cpu_steps=many",))
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_demo_config(tmp_path / "missing.yaml")
