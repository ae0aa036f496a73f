"""How much of a source video a job really used: frames decoded and frames with a face.

A truncated or damaged video decodes fewer frames than its headers announce, and a video
without a visible face tracks with every frame invalid; `dvp track`, `dvp prepare` and
`dvp reenact` still succeed then, so they say so: one warning line with the figures, or,
with `--strict`, an error (exit 1) before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamer.video.io import VideoInfo
from tracker.errors import DvpError


class PartialResultError(DvpError):
    """`--strict`: a video that was not decoded whole, or frames without a face."""


@dataclass(frozen=True)
class Coverage:
    """What a job made of one video.

    video: the file. announced: frames its headers give (`exact`: recorded by the container,
    else estimated from duration x fps). decoded: frames read (a `max_frames` limit lowers
    `announced` to match). faces: decoded frames in which a face was found.
    """

    video: Path
    announced: int
    exact: bool
    decoded: int
    faces: int

    @classmethod
    def of(cls, info: VideoInfo, decoded: int, faces: int,
           max_frames: int | None = None) -> Coverage:
        announced = info.frame_count if max_frames is None else min(info.frame_count,
                                                                     max_frames)
        return cls(info.path, announced, info.frame_count_exact, decoded, faces)

    @property
    def missing_frames(self) -> bool:
        """Fewer frames decoded than announced (an estimated count may be one second off)."""
        slack = 0 if self.exact else max(1, round(0.01 * self.announced))
        return self.decoded < self.announced - slack

    def shortfall(self, without_face: str = "") -> str | None:
        """The figures, as one sentence, when frames were lost or had no face; else None.

        without_face: what a frame without a face becomes in the output, said in brackets.
        """
        parts = []
        if self.missing_frames:
            about = "" if self.exact else "about "
            parts.append(f"only {self.decoded} of {about}{self.announced} frames could be "
                         "decoded (the file ends early or is damaged)")
        note = f" ({without_face})" if without_face else ""
        if self.faces == 0 and self.decoded:
            parts.append(f"no face was found in any of the {self.decoded} frames{note}")
        elif self.faces < self.decoded:
            parts.append(f"a face was found in {self.faces} of {self.decoded} frames{note}")
        return f"{self.video}: " + "; ".join(parts) if parts else None


def check_coverage(coverage: Coverage, strict: bool, without_face: str = "") -> str | None:
    """The warning to print for a partial result (None when complete).

    without_face: what a frame without a face becomes in this command's output (e.g. "they
    show the target at rest"). With `strict`, raises PartialResultError instead.
    """
    if strict:
        shortfall = coverage.shortfall()
        if shortfall is not None:
            raise PartialResultError(f"{shortfall} (--strict: nothing written)")
    shortfall = coverage.shortfall(without_face)
    return None if shortfall is None else f"{shortfall}; --strict makes this an error"
