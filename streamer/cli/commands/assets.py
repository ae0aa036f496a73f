"""`dvp assets install` and `dvp assets info`: the face model in the local cache."""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from streamer.cli.config import Config
from tracker import assets


def _add_install(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", metavar="DIR",
                   help="offline: take the files from DIR, laid out like shared/assets "
                        "(ict-facekit/ict-facekit-da5f95a.tar.xz, mediapipe-face-geometry/*.obj)")
    p.add_argument("--base-url", metavar="URL",
                   help=f"download from a mirror of {assets.DEFAULT_BASE_URL} instead")


def _install(args: argparse.Namespace, config: Config) -> int:
    with tqdm(desc="assets", unit="step", leave=False) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label[-48:])
            bar.update(1)

        path = assets.install(args.source, args.base_url, progress=progress)
    _regressor(config)
    print(path)
    return 0


def _regressor(config: Config) -> None:
    """Train the tracker's landmark regressor of the config's settings now (with a progress
    bar), so that no later command trains it unannounced; a cached one is kept."""
    from tracker.regressor import load_or_train, settings_from_config

    load_or_train(assets.load_face_model(), settings_from_config(config.tracker))


def _info(args: argparse.Namespace, config: Config) -> int:
    print(json.dumps(assets.info(), indent=2))
    return 0


COMMANDS = {
    "assets install": (("install the face model into the cache ($DVP_HOME) and train the "
                        "tracker's landmark regressor there (once)"), False,
                       _add_install, _install),
    "assets info": ("print the installed face model's sizes as JSON", False,
                    lambda p: None, _info),
}
