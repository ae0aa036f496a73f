"""A damaged or hostile target directory: every case is one 'dvp: error:' line (exit 1, no
traceback, nothing left aside), and a killed `dvp prepare` leaves nothing behind for long."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from streamer.cli.main import main
from tests.streamer.stand_ins import make_target_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, face_model: Any) -> Path:
    """A complete target (12 frames, 64 px, random generator) with its caches built."""
    root = make_target_dir(tmp_path_factory.mktemp("pristine") / "t",
                           list(face_model.expression_names), frames=12)
    assert main(["eval", str(root), "--device", "cpu"]) == 0
    assert (root / "cache" / "conditioning.npy").is_file()
    return root


@pytest.fixture()
def target(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine target to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "t"))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, which must be exactly one 'dvp: error:' line (the message)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("dvp: error: "), err
    return lines[0][len("dvp: error: "):]


def edit_yaml(root: Path, **changes: Any) -> None:
    meta = root / "target.yaml"
    data = yaml.safe_load(meta.read_text())
    data.update(changes)
    meta.write_text(yaml.safe_dump(data, sort_keys=False))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated params", lambda t: truncate(t / "params.npz", 100),
     "{t}/params.npz: not a parameters .npz file (File is not a zip file)"),
    ("empty params", lambda t: truncate(t / "params.npz", 0),
     "{t}/params.npz: not a parameters .npz file (the file is empty (0 bytes))"),
    ("garbage albedo", lambda t: (t / "albedo.png").write_bytes(b"not a png\n" * 10),
     ("{t}/albedo.png is not a readable image (cannot identify image file): restore it, or "
     "make the target again with 'dvp prepare'")),
    ("window 0", lambda t: edit_yaml(t, window=0),
     "{t}/target.yaml: window must be at least 1, got 0"),
    ("empty consent", lambda t: edit_yaml(t, consent=""),
     ("{t}/target.yaml records no consent ('consent' is empty): a target needs the consent "
     "of the person shown; make it with 'dvp prepare --consent TEXT'")),
    ("null consent", lambda t: edit_yaml(t, consent=None),
     ("{t}/target.yaml records no consent ('consent' is empty): a target needs the consent "
     "of the person shown; make it with 'dvp prepare --consent TEXT'")),
    ("format_version as a string", lambda t: edit_yaml(t, format_version="1"),
     ("{t}/target.yaml has format_version '1', a string: write the number without quotes "
     "(format_version: 1)")),
    ("a billion frames", lambda t: edit_yaml(t, frames=1_000_000_000),
     ("target directory {t} is incomplete: missing frames/000012.png (and 999999987 more "
     "frames)")),
    ("params of another length", lambda t: edit_yaml(t, frames=11, holdout_start=10),
     "{t}/params.npz holds 12 frames, but target.yaml says 11"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("damage", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_eval_of_a_damaged_target_is_one_error_line(
        target: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], None],
        message: str) -> None:
    damage(target)
    assert main(["eval", str(target), "--device", "cpu"]) == 1
    assert one_error_line(capsys) == message.format(t=target)


@pytest.mark.timeout(120)
def test_serve_and_reenact_refuse_a_garbage_neutral_and_an_empty_consent(
        target: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (target / "neutral.npz").write_bytes(b"\x00garbage" * 20)
    assert main(["serve", str(target), "--port", "0", "--device", "cpu"]) == 1
    assert one_error_line(capsys) == (f"{target}/neutral.npz: not a readable .npz file (it is "
                                      "not an .npz archive): make the target again with "
                                      "'dvp prepare'")
    edit_yaml(target, consent=" ")
    from streamer.video.io import VideoWriter

    source = tmp_path / "source.mp4"
    with VideoWriter(source, fps=10.0) as writer:
        for i in range(3):
            writer.write(np.full((32, 32, 3), 100, np.uint8), i / 10)
    assert main(["reenact", str(target), "--source", str(source), "-o",
                 str(tmp_path / "out.mp4"), "--device", "cpu"]) == 1
    assert "records no consent ('consent' is empty)" in one_error_line(capsys)


def test_a_garbage_frame_without_a_cache_leaves_no_partial_file(
        target: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(target / "cache")
    (target / "frames" / "000003.png").write_bytes(b"\x89PNG garbage")
    assert main(["eval", str(target), "--device", "cpu"]) == 1
    assert one_error_line(capsys) == (
        f"{target}/frames/000003.png is not a readable image (cannot identify image file): "
        "restore it, or make the target again with 'dvp prepare'")
    assert sorted(p.name for p in (target / "cache").iterdir()) == [
        "conditioning.json", "conditioning.npy", "masks.npy"]  # no .frames.npy.*.partial


def test_damaged_caches_are_made_again(target: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = target / "cache"
    whole = {name: (cache / name).stat().st_size for name in ("conditioning.npy", "frames.npy")}
    truncate(cache / "conditioning.npy", 300)
    (cache / "frames.npy").write_bytes(b"")
    assert main(["eval", str(target), "--device", "cpu"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert {name: (cache / name).stat().st_size for name in whole} == whole


@pytest.mark.parametrize(("generator", "reason"), [
    (None, "lacks 'generator': it is not a complete dvp generator checkpoint"),
    ({"state": {}}, ("holds no usable generator ('shape'): it is damaged or was not written "
                    "by dvp")),
])
def test_a_checkpoint_without_its_network_is_named(
        target: Path, capsys: pytest.CaptureFixture[str], generator: Any, reason: str) -> None:
    from generator.checkpoint import CHECKPOINT_FORMAT

    path = next((target / "checkpoints").iterdir())
    state: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "step": 0}
    if generator is not None:
        state["generator"] = generator
    torch.save(state, path)
    assert main(["eval", str(target), "--device", "cpu"]) == 1
    assert one_error_line(capsys) == f"{path} {reason}"


def test_serve_checks_the_port_before_loading_the_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path / "no-target"), "--port", "99999"]) == 1
    assert one_error_line(capsys) == "--port must lie in 0..65535 (0: any free port), got 99999"


# ---- a killed `dvp prepare` -------------------------------------------------------------------
#: A process in the position of `dvp prepare` writing its target: the CLI's SIGTERM handling
#: (streamer.cli.main) around a TargetWriter that has begun (frames written, not committed).
WRITER = textwrap.dedent("""
    import signal, sys, time
    import numpy as np
    from generator.target import TargetWriter
    from streamer.cli import main as cli
    signal.signal(signal.SIGTERM, cli._terminate)
    try:
        with TargetWriter(sys.argv[1]) as writer:
            for _ in range(3):
                writer.add_frame(np.zeros((16, 16, 3), np.uint8))
            print(writer.staging, flush=True)
            time.sleep(120)
    except cli.Terminated:
        sys.exit(143)
""")


def start_writer(root: Path) -> tuple[subprocess.Popen[str], Path]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    staging = Path(proc.stdout.readline().strip())
    assert staging.is_dir() and staging.name == f".{root.name}.{proc.pid}.partial"
    return proc, staging


def test_sigterm_while_writing_a_target_removes_its_staging_folder(tmp_path: Path) -> None:
    proc, staging = start_writer(tmp_path / "t")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    assert not staging.exists() and sorted(os.listdir(tmp_path)) == []


def test_the_next_run_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    from generator.target import TargetWriter

    proc, staging = start_writer(tmp_path / "t")
    proc.kill()
    proc.wait(30)
    assert staging.is_dir()  # SIGKILL: nobody could clean up
    alive, alive_staging = start_writer(tmp_path / "u")  # a writer still at work
    try:
        with TargetWriter(tmp_path / "t") as writer:
            assert not staging.exists()
            assert alive_staging.is_dir(), "a running writer's folder was removed"
            assert writer.staging.is_dir()
    finally:
        alive.kill()
        alive.wait(30)
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / f".frames.npy.{proc.pid}.partial"
    dead.write_bytes(np.zeros(10, np.uint8).tobytes())
    from tracker.files import remove_stale_partials

    assert remove_stale_partials(cache) == [dead] and not dead.exists()


def test_sigterm_ends_a_dvp_command_through_its_handler(tmp_path: Path) -> None:
    """The console script installs the handler: SIGTERM during `dvp track` ends it with
    'dvp: terminated' and exit code 143, writing nothing."""
    from streamer.video.io import VideoWriter

    video = tmp_path / "v.mp4"
    with VideoWriter(video, fps=10.0) as writer:
        for i in range(300):
            writer.write(np.full((64, 64, 3), i % 200, np.uint8), i / 10)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "streamer.cli.main", "track", str(video),
                             "-o", str(tmp_path / "p.npz"), "--device", "cpu"],
                            stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    seen = b""
    while b"/300" not in seen:  # tqdm's bar over the 300 frames: the command is at work
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143
    # a substring: a run once showed the message on the line of a progress bar (the
    # landmark worker processes and the bars share the stream)
    assert "dvp: terminated" in (seen + rest).decode(errors="replace")
    assert sorted(os.listdir(tmp_path)) == ["v.mp4"]
