"""Shared fixtures: the face model installed once per test session from ../shared/assets.

`DVP_TEST_ASSETS` overrides the assets folder; `DVP_TEST_HOME` reuses an existing cache
(set by .ci/run to the cache the README's install command made, so it is built once).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DVP_TEST_ASSETS", REPO.parent / "shared" / "assets"))
#: Real footage (franck_talking_200s.webm, webcam_driver_53s.mp4, megamind.avi);
#: `DVP_TEST_MEDIA` overrides the folder (a worktree that is not beside ../shared).
MEDIA = Path(os.environ.get("DVP_TEST_MEDIA", REPO.parent / "shared" / "media"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests, with the reason shown, where no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run 'pytest -m gpu' on the lent machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The local copy of the public assets (laid out like ../shared/assets)."""
    if not (ASSETS / "ict-facekit").is_dir():
        pytest.fail(f"assets not found at {ASSETS}: set DVP_TEST_ASSETS")
    return ASSETS


@pytest.fixture(scope="session")
def dvp_home(assets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVP_HOME with the face model installed (once per session)."""
    from tracker import assets

    reuse = os.environ.get("DVP_TEST_HOME")
    home = Path(reuse) if reuse else tmp_path_factory.mktemp("dvp_home")
    assets.install(assets_dir, home=home)
    os.environ["DVP_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def face_model(dvp_home: Path):  # type: ignore[no-untyped-def]
    """The installed FaceModel (shared; treat as read-only)."""
    from tracker.assets import load_face_model

    return load_face_model(dvp_home)
