"""Face-model assets: download or copy, verify, build the compact cache, report.

Sources (public, pinned): ICT-FaceKit at commit ICT_COMMIT and MediaPipe's two face-geometry
OBJ files at commit MEDIAPIPE_COMMIT. Every source file is checked against the sha256 sums
kept in `tracker/data/`. The cache `$DVP_HOME/face-model-v3/` (default `~/.cache/dvp`) holds
`face_model.npz` and `manifest.json`; it is built in a temporary folder beside it and renamed
into place once, so a failed install leaves no cache behind, and a second install is a no-op.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tracker.errors import DvpError
from tracker.face_model import MODEL_FORMAT, FaceModel, build_model_arrays

log = logging.getLogger(__name__)

ICT_COMMIT = "da5f95a607f5e6b37755b38d3385d7f2853732e5"
MEDIAPIPE_COMMIT = "85c0cdc7d70653888903c88df45962b764296342"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
ICT_REPO = "ICT-VGL/ICT-FaceKit"
MEDIAPIPE_REPO = "google-ai-edge/mediapipe"
MEDIAPIPE_DIR = "mediapipe/modules/face_geometry/data"
ICT_ARCHIVE = "ict-facekit/ict-facekit-da5f95a.tar.xz"
#: The cache folder's name; its number follows face_model.MODEL_FORMAT, so that a cache of
#: an older format is left alone and a new one built beside it.
CACHE_NAME = f"face-model-v{MODEL_FORMAT}"
_DATA = Path(__file__).resolve().parent / "data"


class AssetError(DvpError):
    """An asset that is missing, damaged, of the wrong checksum, or could not be written."""


def dvp_home() -> Path:
    """The cache root: `$DVP_HOME`, default `~/.cache/dvp`."""
    return Path(os.environ.get("DVP_HOME") or Path.home() / ".cache" / "dvp")


def cache_dir(home: Path | None = None) -> Path:
    """The face-model cache folder."""
    return (home or dvp_home()) / CACHE_NAME


def _sums(name: str) -> dict[str, str]:
    sums = {}
    for line in (_DATA / name).read_text().splitlines():
        if line.strip():
            digest, path = line.split(maxsplit=1)
            sums[path.strip()] = digest
    return sums


ICT_SUMS = _sums("ict-facekit.sha256")
MEDIAPIPE_SUMS = _sums("mediapipe-face-geometry.sha256")


def _check(label: str, data: bytes, expected: str) -> bytes:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise AssetError(f"{label}: wrong checksum (sha256 {got}, expected {expected})")
    return data


def _files_from_dir(source: Path, note: Callable[[str], None]) -> dict[str, bytes]:
    """Every listed source file from a folder laid out like `../shared/assets/`, verified.

    Keys: archive paths of ICT-FaceKit (`FaceXModel/...`, `LICENSE`, ...) and the bare names
    of the MediaPipe OBJ files.
    """
    archive = source / ICT_ARCHIVE
    if not archive.is_file():
        raise AssetError(f"{archive}: missing file")
    note(f"reading {archive}")
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:xz") as tar:
            for info in tar:
                if info.isfile():
                    fh = tar.extractfile(info)
                    assert fh is not None
                    members[info.name.removeprefix("./")] = fh.read()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as err:
        raise AssetError(f"{archive}: damaged or truncated archive ({err})") from err
    files = {path: _check(f"{archive}: {path}", data, ICT_SUMS[path])
             for path, data in members.items() if path in ICT_SUMS}
    for path in ICT_SUMS:
        if path not in files:
            raise AssetError(f"{archive}: missing file {path}")
    for name, digest in MEDIAPIPE_SUMS.items():
        path = source / "mediapipe-face-geometry" / name
        if not path.is_file():
            raise AssetError(f"{path}: missing file")
        files[name] = _check(str(path), path.read_bytes(), digest)
    return files


def _files_from_url(base_url: str, note: Callable[[str], None]) -> dict[str, bytes]:
    """Every listed source file downloaded from `base_url` (raw.githubusercontent.com
    layout: BASE/OWNER/REPO/COMMIT/PATH), verified."""
    base = base_url.rstrip("/")
    urls = {path: f"{base}/{ICT_REPO}/{ICT_COMMIT}/{path}" for path in ICT_SUMS}
    urls |= {name: f"{base}/{MEDIAPIPE_REPO}/{MEDIAPIPE_COMMIT}/{MEDIAPIPE_DIR}/{name}"
             for name in MEDIAPIPE_SUMS}
    sums = ICT_SUMS | MEDIAPIPE_SUMS
    files: dict[str, bytes] = {}
    for path, url in urls.items():
        note(f"downloading {path}")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                data = resp.read()
        except urllib.error.HTTPError as err:
            raise AssetError(f"{path}: download failed ({url}: HTTP {err.code})") from err
        except (urllib.error.URLError, OSError) as err:
            raise AssetError(f"{path}: download failed ({url}: {err})") from err
        files[path] = _check(path, data, sums[path])
    return files


def install(source: str | Path | None = None, base_url: str | None = None,
            home: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """Install the face model into the cache and return the cache folder.

    source: a folder laid out like `../shared/assets/` (offline); else each file is
    downloaded from `base_url` (default DEFAULT_BASE_URL). A no-op when the cache exists.
    Raises AssetError naming the file on a missing file, wrong checksum, damaged archive,
    failed download or full disk; no partial cache is left behind.
    """
    target = cache_dir(home)
    if (target / "manifest.json").is_file():
        log.info("face model already installed at %s", target)
        return target
    note = progress or (lambda label: None)
    if source is not None:
        files = _files_from_dir(Path(source), note)
        origin = {"from": str(Path(source).resolve())}
    else:
        files = _files_from_url(base_url or DEFAULT_BASE_URL, note)
        origin = {"base_url": base_url or DEFAULT_BASE_URL}
    note("building the face model")
    arrays, figures = build_model_arrays(lambda n: files[f"FaceXModel/{n}"], files.__getitem__)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.", dir=target.parent))
    try:
        np.savez(tmp / "face_model.npz", **arrays)
        manifest = {"format": MODEL_FORMAT, "ict_facekit_commit": ICT_COMMIT,
                    "mediapipe_commit": MEDIAPIPE_COMMIT, **origin, **figures}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        os.rename(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise AssetError(f"{target / 'face_model.npz'}: no space left on the disk") from err
        raise AssetError(f"{target}: could not write the face-model cache ({err})") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_face_model(home: Path | None = None) -> FaceModel:
    """The installed face model; an AssetError says how to install it when missing."""
    target = cache_dir(home)
    if not (target / "manifest.json").is_file():
        raise AssetError(f"{target}: face model not installed; run 'dvp assets install' "
                         "(or 'dvp assets install --from DIR' offline)")
    return FaceModel.load(target / "face_model.npz")


def info(home: Path | None = None) -> dict[str, object]:
    """What `dvp assets info` prints: cache path and model sizes."""
    target = cache_dir(home)
    model = load_face_model(home)
    manifest = json.loads((target / "manifest.json").read_text())
    return {
        "cache": str(target),
        "vertices": model.n_vertices,
        "triangles": int(model.triangles.shape[0]),
        "identity_modes": int(model.identity_basis.shape[0]),
        "expressions": model.expression_names,
        "landmarks": int(model.landmark_triangles.shape[0]),
        "landmark_fit_median_mm": manifest.get("landmark_fit_median_mm"),
    }
