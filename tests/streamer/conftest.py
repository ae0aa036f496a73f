"""Fixtures of the streamer tests: a tiny target directory, its loaded target (with the
stand-ins of tests/streamer/stand_ins.py), and a live server in a background thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from streamer.cli.config import Config, load_config
from tests.streamer.serving import RunningServer, serve_in_thread, stop_server
from tests.streamer.stand_ins import SIZE, ShadedDiskConditioner, make_target_dir, stand_in_stages


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """As `dvp serve` runs (streamer.cpu_threads = 1); restored after each test module."""
    before = torch.get_num_threads()
    torch.set_num_threads(load_config(None, []).streamer.cpu_threads or before)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def names(face_model: Any) -> list[str]:
    return list(face_model.expression_names)


@pytest.fixture(scope="session")
def target_dir(tmp_path_factory: pytest.TempPathFactory, names: list[str]) -> Path:
    return make_target_dir(tmp_path_factory.mktemp("targets") / "tiny", names)


@pytest.fixture()
def config() -> Config:
    return load_config(None, [])


@pytest.fixture(scope="session")
def loaded_target(target_dir: Path, face_model: Any) -> Any:
    from streamer.live.stages import LoadedTarget

    return LoadedTarget(target_dir, load_config(None, []), torch.device("cpu"),
                        conditioner=ShadedDiskConditioner(SIZE), face_model=face_model)


@pytest.fixture(scope="session")
def real_target(target_dir: Path, face_model: Any) -> Any:
    """The tiny target with the real ConditioningRenderer (and the generator runtime)."""
    from streamer.live.stages import LoadedTarget

    return LoadedTarget(target_dir, load_config(None, []), torch.device("cpu"),
                        face_model=face_model)


def start_server(target: Any, config: Config | None = None,
                 stage_factory: Any = stand_in_stages, **options: Any) -> RunningServer:
    """A DvpServer on 127.0.0.1 (free port) running in a thread of its own (ServeOptions
    fields as `options`); stop it with `stop_server`."""
    from streamer.webrtc.server import DvpServer, ServeOptions

    return serve_in_thread(lambda: DvpServer(
        target, config or load_config(None, []),
        ServeOptions(host="127.0.0.1", port=0, **options), stage_factory=stage_factory))


@pytest.fixture()
def run_server(loaded_target: Any) -> Iterator[Callable[..., RunningServer]]:
    """Start a DvpServer on 127.0.0.1 (free port) in a thread: `run_server(**options)`
    (ServeOptions fields; `config`, `stage_factory` and `target` may be given)."""
    running: list[RunningServer] = []

    def start(config: Config | None = None, stage_factory: Any = stand_in_stages,
              target: Any = None, **options: Any) -> RunningServer:
        handle = start_server(target or loaded_target, config, stage_factory, **options)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        stop_server(handle)
