"""Where the benches find the shared media clips (../shared/media beside the repository,
or shared/media inside it, or $DVP_MEDIA)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def media_dirs() -> list[Path]:
    """The folders searched, in order."""
    env = os.environ.get("DVP_MEDIA")
    return ([Path(env)] if env else []) + [ROOT.parent / "shared" / "media",
                                          ROOT / "shared" / "media"]


def find_media(*names: str) -> Path:
    """The first of `names` found in `media_dirs()` (else the first name in the first
    folder, for the error message a reader gives)."""
    for name in names:
        for folder in media_dirs():
            if (folder / name).is_file():
                return folder / name
    return media_dirs()[0] / names[0]
