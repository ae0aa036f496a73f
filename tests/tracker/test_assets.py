"""Face-model install: from a folder, from a loopback HTTP mirror, and its failure modes."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tracker import assets
from tracker.assets import AssetError


def test_install_from_folder_and_info(dvp_home: Path) -> None:
    report = assets.info(dvp_home)
    assert report["cache"] == str(dvp_home / "face-model-v3")
    assert report["identity_modes"] == 100
    assert len(report["expressions"]) == 53
    assert report["expressions"][:2] == ["browDown_L", "browDown_R"]
    assert report["landmarks"] == 478
    assert report["vertices"] == 26719


def test_second_install_is_a_no_op(dvp_home: Path, assets_dir: Path) -> None:
    cache = dvp_home / "face-model-v3" / "face_model.npz"
    before = cache.stat().st_mtime_ns
    assert assets.install(assets_dir, home=dvp_home) == dvp_home / "face-model-v3"
    assert cache.stat().st_mtime_ns == before


def _no_cache_left(home: Path) -> None:
    assert not (home / "face-model-v3").exists()
    assert [p.name for p in home.iterdir()] == [] if home.exists() else True


def test_truncated_archive_names_it(tmp_path: Path, assets_dir: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(assets_dir, src)
    archive = src / assets.ICT_ARCHIVE
    archive.chmod(0o644)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 3])
    with pytest.raises(AssetError, match=r"ict-facekit-da5f95a\.tar\.xz: damaged or truncated"):
        assets.install(src, home=tmp_path / "home")
    _no_cache_left(tmp_path / "home")


def test_missing_file_in_folder_names_it(tmp_path: Path, assets_dir: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(assets_dir, src)
    (src / "mediapipe-face-geometry" / "face_model_with_iris.obj").unlink()
    with pytest.raises(AssetError, match=r"face_model_with_iris\.obj: missing file"):
        assets.install(src, home=tmp_path / "home")
    _no_cache_left(tmp_path / "home")


def test_wrong_checksum_in_archive_names_the_member(tmp_path: Path, assets_dir: Path) -> None:
    src = tmp_path / "src"
    (src / "ict-facekit").mkdir(parents=True)
    shutil.copytree(assets_dir / "mediapipe-face-geometry", src / "mediapipe-face-geometry")
    # an archive whose LICENSE differs from the public one
    with tarfile.open(src / assets.ICT_ARCHIVE, "w:xz", preset=0) as tar:
        lic = tmp_path / "LICENSE"
        lic.write_text("not the MIT licence\n")
        tar.add(lic, arcname="LICENSE")
    with pytest.raises(AssetError, match=r"tar\.xz: LICENSE: wrong checksum"):
        assets.install(src, home=tmp_path / "home")
    _no_cache_left(tmp_path / "home")


def test_full_disk_leaves_no_cache(tmp_path: Path, assets_dir: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assets.np, "savez", full)
    home = tmp_path / "home"
    with pytest.raises(AssetError, match=r"face_model\.npz: no space left on the disk"):
        assets.install(assets_dir, home=home)
    assert list(home.iterdir()) == []


def test_info_without_install_says_how(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match=r"face model not installed; run 'dvp assets install'"):
        assets.info(tmp_path)


@pytest.fixture(scope="module")
def mirror(assets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A raw.githubusercontent.com-style mirror on 127.0.0.1, built from the local copies."""
    root = tmp_path_factory.mktemp("mirror")
    ict = root / assets.ICT_REPO / assets.ICT_COMMIT
    ict.mkdir(parents=True)
    with tarfile.open(assets_dir / assets.ICT_ARCHIVE, "r:xz") as tar:
        tar.extractall(ict, filter="data")
    mp = root / assets.MEDIAPIPE_REPO / assets.MEDIAPIPE_COMMIT / assets.MEDIAPIPE_DIR
    mp.mkdir(parents=True)
    for name in assets.MEDIAPIPE_SUMS:
        shutil.copy(assets_dir / "mediapipe-face-geometry" / name, mp / name)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "root": root, "ict": ict,
           "mp": mp}
    server.shutdown()


def test_install_from_http_mirror_matches_folder_install(
    mirror: dict, dvp_home: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    labels: list[str] = []
    path = assets.install(base_url=mirror["url"], home=home, progress=labels.append)
    assert path == home / "face-model-v3"
    assert "downloading FaceXModel/generic_neutral_mesh.obj" in labels
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["base_url"] == mirror["url"]
    with np.load(path / "face_model.npz") as a, \
            np.load(dvp_home / "face-model-v3" / "face_model.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_http_wrong_checksum_and_missing_file(mirror: dict, tmp_path: Path) -> None:
    target = mirror["ict"] / "CREDITS.md"
    original = target.read_bytes()
    try:
        target.write_bytes(original + b"tampered")
        digest = hashlib.sha256(original + b"tampered").hexdigest()
        with pytest.raises(AssetError, match=rf"CREDITS\.md: wrong checksum \(sha256 {digest}"):
            assets.install(base_url=mirror["url"], home=tmp_path / "a")
        target.unlink()
        with pytest.raises(AssetError, match=r"CREDITS\.md: download failed \(.*HTTP 404\)"):
            assets.install(base_url=mirror["url"], home=tmp_path / "b")
    finally:
        target.write_bytes(original)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_cli_assets_install_and_info(dvp_home: Path, assets_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from streamer.cli.main import main

    assert main(["assets", "install", "--from", str(assets_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(dvp_home / "face-model-v3")
    assert main(["assets", "info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["identity_modes"], len(report["expressions"]), report["landmarks"]) == (
        100, 53, 478)
