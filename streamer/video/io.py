"""Video files in and out, through PyAV: every `dvp` command that touches a video uses this.

Reading gives RGB frames (``(H, W, 3)`` uint8) with timestamps in seconds; writing makes
H.264 (libx264, yuv420p, BT.709 limited range) files that keep the source's frame timing,
can carry an audio stream copied from another file, and carry metadata tags (outputs of the
reenactment are tagged as synthetic). A writer only ever leaves a complete file: it writes
to a hidden partial file beside the target and renames it on a successful close.

Timestamps are seconds since the start of the video stream (its ``start_time``), taken from
each frame's presentation timestamp, so a variable frame timing survives a read/write round
trip.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import numbers
import os
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import av
import numpy as np

from streamer.video.convert import frame_to_rgb, rgb_to_yuv420p
from tracker.errors import DvpError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Decoders return frames in display order, but some containers (AVI with packed B-frames,
# e.g.) attach the packets' timestamps to them out of order. The reader hands out the sorted
# timestamps of a window this many frames deep, which undoes any such local shuffle.
_REORDER_DEPTH = 8
# The writer's time base is at least this fine (ticks per second) and a multiple of the fps.
_MIN_TICKS_PER_SECOND = 90_000
# Audio codecs copied into the output as they are (when the container takes them); any other
# codec is transcoded to AAC, which every player of an mp4 understands.
_COPYABLE_AUDIO = frozenset({"aac", "mp3", "ac3", "eac3", "opus", "flac", "alac", "vorbis"})
# Tags the mp4/mov muxer writes in the standard (iTunes) form; any other key makes the writer
# switch the muxer to free-form 'mdta' tags so that the key survives.
_MP4_STANDARD_TAGS = frozenset(
    {
        "title",
        "artist",
        "album_artist",
        "album",
        "composer",
        "date",
        "comment",
        "genre",
        "copyright",
        "grouping",
        "lyrics",
        "description",
        "synopsis",
        "show",
        "episode_id",
        "network",
        "keywords",
    }
)
# FFmpeg's enum values for BT.709 (primaries, transfer, matrix) and limited ("tv") range.
_AVCOL_BT709 = 1
_AVCOL_RANGE_MPEG = 1


class VideoError(DvpError):
    """A video cannot be read or written; the message names the file and the problem."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns from a video file's headers (no frames are decoded).

    Attributes:
        path: the file.
        width, height: frame size in pixels.
        fps: average frame rate in frames per second.
        frame_count: number of frames; exact where the container records it (mp4, avi),
            else estimated as ``round(duration * fps)``.
        duration: length of the video stream in seconds.
        has_audio: whether the file holds an audio stream.
        frame_count_exact: whether the container records `frame_count` (else estimated).
    """

    path: Path
    width: int
    height: int
    fps: float
    frame_count: int
    duration: float
    has_audio: bool
    frame_count_exact: bool = True


def _open_input(path: PathLike) -> Any:
    """Open ``path`` for reading, turning every failure into a `VideoError`."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video file not found: {p}")
    if not p.is_file():
        raise VideoError(f"not a file: {p}")
    if p.stat().st_size == 0:
        raise VideoError(f"{p} is empty (0 bytes)")
    try:
        return av.open(str(p), mode="r")
    except (av.error.FFmpegError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise VideoError(f"cannot open {p} as a video: {reason}") from e


def _video_stream(container: Any, path: PathLike) -> Any:
    """The first video stream of an open container, or a `VideoError` saying why none."""
    if not container.streams.video:
        if not container.streams:
            raise VideoError(f"{Path(path)} has no video frames (it holds no streams)")
        raise VideoError(f"{Path(path)} has no video stream")
    return container.streams.video[0]


def _stream_fps(stream: Any) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    return None


def probe(path: PathLike) -> VideoInfo:
    """Read a video file's headers: size, frame rate, frame count, duration, audio.

    Raises:
        VideoError: the file is missing, empty, not a video, has no video stream, or has
            no frames according to its headers.
    """
    p = Path(path)
    container = _open_input(p)
    try:
        stream = _video_stream(container, p)
        duration = 0.0
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration and container.duration > 0:
            duration = container.duration / av.time_base
        if stream.frames == 0 and duration <= 0:
            raise VideoError(f"{p} has no video frames")
        fps = _stream_fps(stream)
        frame_count = int(stream.frames)
        exact = frame_count > 0
        if fps is None:
            if frame_count <= 0 or duration <= 0:
                raise VideoError(f"{p}: cannot determine the frame rate")
            fps = Fraction(frame_count / duration)
        if frame_count <= 0:
            frame_count = max(1, round(duration * float(fps)))
        if duration <= 0:
            duration = frame_count / float(fps)
        info = VideoInfo(
            path=p,
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            fps=float(fps),
            frame_count=frame_count,
            duration=duration,
            has_audio=bool(container.streams.audio),
            frame_count_exact=exact,
        )
    finally:
        container.close()
    logger.debug("probed %s: %s", p, info)
    return info


def read_frames(
    path: PathLike, max_frames: int | None = None
) -> Iterator[tuple[np.ndarray, float]]:
    """Decode a video's frames in display order.

    Yields ``(frame, timestamp)``: ``frame`` an ``(H, W, 3)`` uint8 RGB array, ``timestamp``
    in seconds, the frame's pts times the stream's time base, counted from the video
    stream's start (its ``start_time``; the first frame's pts where there is none or it
    comes earlier), so the first frame is at 0 or, where the container puts it later (an
    AVI whose first frame has pts 1, e.g.), slightly after. Timestamps increase strictly: out-of-order timestamps that
    some containers attach (AVI with packed B-frames) are sorted back, and a frame without
    one, or with one that does not advance, is placed one frame period (1 / fps) after the
    previous frame.

    Args:
        path: the video file.
        max_frames: stop after this many frames (None: all of them); at least 1.

    Raises:
        VideoError: the file is missing, not a video, has no video frames, or a frame
            cannot be decoded. Errors about the file itself are raised by this call, before
            iteration starts.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 or None, got {max_frames}")
    p = Path(path)
    info = probe(p)  # raises on a missing, empty or non-video file before iteration begins
    return _iter_frames(p, max_frames, info.fps)


class _Clock:
    """`read_frames`' timestamps: seconds since the stream's start (its `start_time`, or the
    first frame's pts where there is none or it comes earlier); a frame without a pts, or
    whose pts does not advance, is placed one period (1 / fps) after the previous one."""

    def __init__(self, stream: Any, fps: float) -> None:
        self.time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 1)
        self.origin: int | None = stream.start_time
        self.period = 1.0 / fps
        self.count = 0
        self.last: float | None = None

    def __call__(self, pts: int | None) -> float:
        """The timestamp of the next frame (in display order) given its pts."""
        if pts is not None and (self.origin is None or (self.count == 0 and pts < self.origin)):
            self.origin = pts  # no start_time, or a first frame before it: count from that
        t = float((pts - self.origin) * self.time_base) \
            if pts is not None and self.origin is not None else None
        if t is None or (self.last is not None and t <= self.last):
            t = 0.0 if self.last is None else self.last + self.period
        self.last = t
        self.count += 1
        return t


def _iter_frames(
    path: Path, max_frames: int | None, fps: float
) -> Iterator[tuple[np.ndarray, float]]:
    container = _open_input(path)
    try:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        clock = _Clock(stream, fps)
        pending: deque[Any] = deque()
        pts_heap: list[int] = []
        count = 0

        def emit() -> tuple[np.ndarray, float]:
            nonlocal count
            frame = pending.popleft()
            t = clock(heapq.heappop(pts_heap) if pts_heap else None)
            count += 1
            return frame_to_rgb(frame), t

        try:
            for frame in container.decode(stream):
                pending.append(frame)
                if frame.pts is not None:
                    heapq.heappush(pts_heap, frame.pts)
                if len(pending) > _REORDER_DEPTH:
                    yield emit()
                    if max_frames is not None and count >= max_frames:
                        return
            while pending:
                yield emit()
                if max_frames is not None and count >= max_frames:
                    return
        except av.error.FFmpegError as e:
            raise VideoError(f"cannot decode {path} at frame {count}: {e}") from e
        if count == 0:
            raise VideoError(f"{path} has no video frames")
    finally:
        container.close()


@dataclass(frozen=True)
class VideoChunk:
    """Frames `[start, stop)` (display order) of a video, to be read on their own by
    `read_chunk` (in another process, say), exactly as `read_frames` gives them.

    seek_pts: the pts of the keyframe at or before the chunk's first frame, where decoding
    starts (None: the file's start); pts: each frame's presentation timestamp (the stream's
    time base), which `read_chunk` checks; times: each frame's timestamp in seconds, as
    `read_frames` gives it.
    """

    path: Path
    start: int
    stop: int
    seek_pts: int | None
    pts: tuple[int, ...]
    times: tuple[float, ...]

    def __len__(self) -> int:
        return self.stop - self.start


class ChunkError(VideoError):
    """A chunk whose frames did not come out of the decoder as planned (the caller reads the
    video in one piece instead)."""


def split_video(path: PathLike, parts: int, max_frames: int | None = None
                ) -> tuple[list[VideoChunk], str]:
    """Plan `parts` chunks of about equal length over the video's first `max_frames` frames
    (all if None), from its packets' timestamps alone (nothing is decoded).

    Returns (chunks, why): no chunks and the reason when the file cannot be split safely
    (a packet without a timestamp, timestamps repeated, fewer frames than parts). Raises
    VideoError as `probe`.
    """
    p = Path(path)
    info = probe(p)
    container = _open_input(p)
    try:
        stream = _video_stream(container, p)
        pts: list[int] = []
        keys: list[int] = []
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's final empty packet
            if packet.pts is None:
                return [], f"{p.name}: a video packet has no timestamp"
            pts.append(int(packet.pts))
            if packet.is_keyframe:
                keys.append(int(packet.pts))
        order = sorted(pts)
        if len(set(order)) != len(order):
            return [], f"{p.name}: video packets share timestamps"
        if max_frames is not None:
            order = order[:max_frames]
        if len(order) < max(parts, 1) or not keys:
            return [], f"{p.name}: {len(order)} frames cannot be split in {parts}"
        clock = _Clock(stream, info.fps)
        times = [clock(t) for t in order]
        keys.sort()
    finally:
        container.close()
    bounds = [round(i * len(order) / parts) for i in range(parts + 1)]
    chunks = []
    for a, b in itertools.pairwise(bounds):
        seek = None
        if a > 0:
            before = [k for k in keys if k <= order[a]]
            seek = before[-1] if before else None
        chunks.append(VideoChunk(p, a, b, seek, tuple(order[a:b]), tuple(times[a:b])))
    return chunks, ""


def read_chunk(chunk: VideoChunk) -> Iterator[tuple[np.ndarray, float]]:
    """The frames of a chunk planned by `split_video`, as `(frame, timestamp)` like
    `read_frames` (one decoder thread: the chunks' readers run side by side).

    Decoding starts at the chunk's keyframe (seeking), frames before the chunk are skipped
    unconverted. Raises ChunkError when the decoded frames' timestamps are not the planned
    ones (the frames would not be those of `read_frames`), VideoError as `read_frames`.
    """
    container = _open_input(chunk.path)
    got = 0
    try:
        stream = _video_stream(container, chunk.path)
        stream.codec_context.thread_count = 1
        if chunk.seek_pts is not None:
            container.seek(chunk.seek_pts, backward=True, any_frame=False, stream=stream)
        first = chunk.pts[0]
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    raise ChunkError(f"{chunk.path}: frame without a timestamp in frames "
                                     f"{chunk.start}-{chunk.stop}")
                if frame.pts < first:
                    continue
                if frame.pts != chunk.pts[got]:
                    raise ChunkError(f"{chunk.path}: frame {chunk.start + got} has pts "
                                     f"{frame.pts}, expected {chunk.pts[got]}")
                yield frame_to_rgb(frame), chunk.times[got]
                got += 1
                if got == len(chunk):
                    return
        except av.error.FFmpegError as e:
            raise VideoError(f"cannot decode {chunk.path} at frame {chunk.start + got}: {e}"
                             ) from e
        raise ChunkError(f"{chunk.path}: frames {chunk.start}-{chunk.stop} gave only {got}")
    finally:
        container.close()


def read_video(
    path: PathLike, max_frames: int | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode a whole video (or its first ``max_frames`` frames) into memory.

    Returns:
        ``(frames, timestamps, fps)``: frames ``(T, H, W, 3)`` uint8 RGB, timestamps ``(T,)``
        float64 seconds (as `read_frames` gives them), fps the stream's average frame rate.

    Raises:
        VideoError: as `read_frames`.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 or None, got {max_frames}")
    p = Path(path)
    fps = probe(p).fps
    frames: list[np.ndarray] = []
    times: list[float] = []
    for frame, t in _iter_frames(p, max_frames, fps):
        frames.append(frame)
        times.append(t)
    return np.stack(frames), np.asarray(times, dtype=np.float64), fps


def _fps_fraction(fps: float | Fraction) -> Fraction:
    """The frame rate as a small fraction: 23.976 -> 2997/125, 29.97003 -> 30000/1001."""
    if isinstance(fps, Fraction):
        return fps
    return Fraction(float(fps)).limit_denominator(1001)


def _time_base_for(fps: Fraction) -> Fraction:
    """A time base that is a multiple of 1/fps and at least 1/90000 s fine."""
    k = max(1, math.ceil(_MIN_TICKS_PER_SECOND / fps.numerator))
    return Fraction(1, fps.numerator * k)


class _AudioPassthrough:
    """The audio stream of ``audio_from``, copied (or transcoded to AAC) into an output.

    Audio times are shifted by the source's video start (or, without video, the audio's
    own start), the same origin `read_frames` counts from, so the audio stays in sync with
    frames written at the timestamps `read_frames` gave.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.container = _open_input(path)
        self.input = self.container.streams.audio[0] if self.container.streams.audio else None
        self.output: Any = None
        self.transcode = False
        self._packets: Iterator[Any] | None = None
        self._next: Any = None
        self._offset = 0  # in the input's time base
        if self.input is None:
            logger.warning("%s has no audio stream; the output will have none", path)
            return
        tb = Fraction(self.input.time_base)
        origin_s: Fraction | None = None
        if self.container.streams.video:
            video = self.container.streams.video[0]
            if video.start_time is not None and video.time_base:
                origin_s = video.start_time * Fraction(video.time_base)
        if origin_s is None and self.input.start_time is not None:
            origin_s = self.input.start_time * tb
        self._offset = round(origin_s / tb) if origin_s is not None else 0
        self._time_base = tb

    def attach(self, output: Any) -> None:
        """Add the audio stream to ``output`` (after the video stream, before any muxing)."""
        if self.input is None:
            return
        name = self.input.codec_context.name
        if name in _COPYABLE_AUDIO and name in output.supported_codecs:
            self.output = output.add_stream_from_template(self.input)
            logger.debug("copying %s audio from %s", name, self.path)
        else:
            self.transcode = True
            rate = self.input.codec_context.sample_rate or 48_000
            # mono stays mono, anything else becomes stereo (a WAV's layout is often just
            # "1 channels", which the AAC encoder does not take)
            layout = "mono" if self.input.codec_context.layout.nb_channels == 1 else "stereo"
            self.output = output.add_stream("aac", rate=rate, layout=layout)
            logger.info("transcoding %s audio from %s to AAC", name, self.path)
        self._packets = iter(self.container.demux(self.input))
        self._advance()

    def _advance(self) -> None:
        assert self._packets is not None
        for packet in self._packets:
            if (packet.dts is None and packet.pts is None) or packet.size == 0:
                continue  # the demuxer's final empty packet
            if packet.pts is None:
                packet.pts = packet.dts
            self._next = packet
            return
        self._next = None

    def mux_until(self, output: Any, t_end: float) -> None:
        """Mux the audio packets that start before ``t_end`` seconds (of the output)."""
        if self.output is None:
            return
        while self._next is not None:
            packet = self._next
            start = (packet.pts - self._offset) * self._time_base
            if start >= t_end:
                return
            end = start + (packet.duration or 0) * self._time_base
            if end >= 0:  # drop audio that ends before the video starts
                self._mux_packet(output, packet)
            self._advance()

    def finish(self, output: Any, t_end: float) -> None:
        """Mux what starts before ``t_end`` seconds, then flush the transcoder if any."""
        if self.output is None:
            return
        self.mux_until(output, t_end)
        if self.transcode:
            for frame in self.input.codec_context.decode(None):
                self._encode_frame(output, frame)
            for packet in self.output.encode(None):
                output.mux(packet)

    def _mux_packet(self, output: Any, packet: Any) -> None:
        if not self.transcode:
            packet.pts -= self._offset
            if packet.dts is not None:
                packet.dts -= self._offset
            packet.stream = self.output
            output.mux(packet)
            return
        for frame in packet.decode():
            self._encode_frame(output, frame)

    def _encode_frame(self, output: Any, frame: Any) -> None:
        if frame.pts is not None:
            frame.pts -= self._offset
        for packet in self.output.encode(frame):
            output.mux(packet)

    def close(self) -> None:
        self.container.close()


class VideoWriter:
    """Write RGB frames to an H.264 video file; use it as a context manager.

    ``with VideoWriter("out.mp4", fps=25.0, audio_from="src.mp4",
    metadata={"comment": "synthetic: ..."}) as w: w.write(frame, t)``

    - Frames are ``(H, W, 3)`` uint8 RGB, all of the first frame's shape. An odd width or
      height is padded to even (yuv420p needs it) by repeating the last column or row, so
      the file is up to one pixel wider/taller than the frames.
    - Each frame is stamped with the timestamp given to `write` (seconds, strictly
      increasing, >= 0), so a variable frame timing is kept; without one, with the previous
      frame's timestamp plus 1/fps (i/fps when no frame has one). The time base is a
      multiple of the fps at least 1/90000 s fine. ``fps`` is also the nominal rate of the
      stream.
    - Encoding: libx264 with ``crf`` and ``preset``, yuv420p, BT.709 limited range, tagged.
    - ``audio_from``: a file whose audio stream is carried over, in sync with timestamps as
      `read_frames` gives them for that file: copied as it is when the codec suits the
      container (AAC, MP3, AC-3, Opus, ... into mp4), else transcoded to AAC. Audio that
      starts after the last frame ends is dropped; a file without audio gives a warning.
    - ``metadata``: container tags (e.g. ``{"comment": "synthetic: ..."}``).
    - The file is written to ``.NAME.partial.EXT`` beside ``path`` and renamed to ``path``
      on a successful `close`; on an exception inside the ``with`` block (or `abort`), or
      when no frame was written, the partial file is removed and ``path`` is left as it was.

    Raises:
        VideoError: the output directory is missing, the format is unknown, ``audio_from``
            is unreadable, a frame has the wrong shape/dtype or timestamp, or encoding fails.
    """

    def __init__(
        self,
        path: PathLike,
        fps: float | Fraction,
        audio_from: PathLike | None = None,
        metadata: Mapping[str, str] | None = None,
        crf: int = 18,
        preset: str = "medium",
    ) -> None:
        self.path = Path(path)
        if not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
            raise VideoError(f"cannot write {self.path}: fps must be a positive number, got {fps}")
        if not 0 <= crf <= 51:
            raise VideoError(f"cannot write {self.path}: crf must be in 0..51, got {crf}")
        if not self.path.parent.is_dir():
            raise VideoError(
                f"cannot write {self.path}: directory {self.path.parent} does not exist"
            )
        self.fps = _fps_fraction(fps)  # Fraction
        self.partial_path = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self._time_base = _time_base_for(self.fps)
        self._crf = crf
        self._preset = preset
        self._metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._audio = _AudioPassthrough(Path(audio_from)) if audio_from is not None else None
        self._stream: Any = None
        self._shape: tuple[int, int, int] | None = None
        self._pad = (0, 0)
        self._count = 0
        self._last_pts: int | None = None
        self._last_t = 0.0
        self._closed = False
        self._video_muxed = False
        self._container: Any = None
        try:
            self._container = self._open_output()
        except BaseException:
            if self._audio is not None:
                self._audio.close()
            raise

    def _open_output(self) -> Any:
        fmt_options: dict[str, str] = {}
        suffix = self.path.suffix.lower()
        if suffix in (".mp4", ".m4v", ".mov"):
            flags = ["+faststart"]
            if set(self._metadata) - _MP4_STANDARD_TAGS:
                flags.append("+use_metadata_tags")
            fmt_options["movflags"] = "".join(flags)
        try:
            container = av.open(str(self.partial_path), mode="w", options=fmt_options)
        except ValueError as e:
            raise VideoError(
                f"cannot write {self.path}: unknown video format {self.path.suffix!r} ({e})"
            ) from e
        except (av.error.FFmpegError, OSError) as e:
            self.partial_path.unlink(missing_ok=True)
            raise VideoError(f"cannot write {self.path}: {e}") from e
        container.metadata.update(self._metadata)
        return container

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    @property
    def frames_written(self) -> int:
        """How many frames `write` has taken so far."""
        return self._count

    def _check_frame(self, frame: Any) -> None:
        expected = "a uint8 array of shape (H, W, 3)"
        if self._shape is not None:
            expected = f"a uint8 array of shape {self._shape} (the first frame's shape)"
        if not isinstance(frame, np.ndarray):
            raise VideoError(
                f"{self.path}: frame {self._count} must be {expected}, got {type(frame).__name__}"
            )
        ok = (
            frame.dtype == np.uint8
            and frame.ndim == 3
            and frame.shape[2] == 3
            and frame.shape[0] > 0
            and frame.shape[1] > 0
            and (self._shape is None or frame.shape == self._shape)
        )
        if not ok:
            raise VideoError(
                f"{self.path}: frame {self._count} must be {expected}, "
                f"got a {frame.dtype} array of shape {frame.shape}"
            )

    def _start(self, shape: tuple[int, int, int]) -> None:
        """Set up the video (and audio) streams from the first frame's shape."""
        h, w = shape[0], shape[1]
        self._shape = shape
        self._pad = (h % 2, w % 2)
        if any(self._pad):
            logger.warning(
                "%s: frame size %dx%d is odd; padding to %dx%d by repeating the edge",
                self.path,
                w,
                h,
                w + self._pad[1],
                h + self._pad[0],
            )
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width = w + self._pad[1]
        stream.height = h + self._pad[0]
        stream.pix_fmt = "yuv420p"
        stream.time_base = self._time_base
        cc = stream.codec_context
        cc.time_base = self._time_base
        cc.color_primaries = _AVCOL_BT709
        cc.color_trc = _AVCOL_BT709
        cc.colorspace = _AVCOL_BT709
        cc.color_range = _AVCOL_RANGE_MPEG
        stream.options = {"crf": str(self._crf), "preset": self._preset}
        self._stream = stream
        if self._audio is not None:
            self._audio.attach(self._container)

    def write(self, frame: np.ndarray, timestamp: float | None = None) -> None:
        """Encode one frame: ``(H, W, 3)`` uint8 RGB, at ``timestamp`` seconds (or None).

        Raises:
            VideoError: the writer is closed, the frame's shape/dtype is wrong (the message
                names expected and received), the timestamp is negative, not finite or not
                after the previous frame's, or encoding fails.
        """
        if self._closed:
            raise VideoError(f"{self.path}: write after the writer was closed")
        self._check_frame(frame)
        if timestamp is None:
            t = 0.0 if self._last_pts is None else self._last_t + 1.0 / float(self.fps)
        else:
            t = float(timestamp)
            if not math.isfinite(t) or t < 0:
                raise VideoError(
                    f"{self.path}: frame {self._count} timestamp must be a finite number "
                    f">= 0 s, got {timestamp}"
                )
        pts = round(t / self._time_base)
        if self._last_pts is not None and pts <= self._last_pts:
            raise VideoError(
                f"{self.path}: frame {self._count} timestamp {t:.6f} s is not after the "
                f"previous frame's {self._last_t:.6f} s"
            )
        try:
            if self._stream is None:
                self._start(frame.shape)
            if any(self._pad):
                frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
            yuv = rgb_to_yuv420p(frame, bt709=True)
            yuv.pts = pts
            yuv.time_base = self._time_base
            for packet in self._stream.encode(yuv):
                self._container.mux(packet)
                self._video_muxed = True
            # audio waits for the first video packet: muxers that shift negative timestamps
            # (B-frames) by the first packet's (matroska) then shift both streams alike
            if self._audio is not None and self._video_muxed:
                self._audio.mux_until(self._container, t)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"cannot write {self.path}: frame {self._count}: {e}") from e
        self._last_pts = pts
        self._last_t = t
        self._count += 1

    def close(self) -> None:
        """Finish the file and move it to ``path``. Idempotent.

        Raises:
            VideoError: no frame was written, or finishing the file failed (the partial file
                is removed either way).
        """
        if self._closed:
            return
        if self._count == 0:
            self.abort()
            raise VideoError(f"no frames were written to {self.path}; nothing was saved")
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            if self._audio is not None:
                self._audio.finish(self._container, self._last_t + 1.0 / float(self.fps))
            self._container.close()
            if self._audio is not None:
                self._audio.close()
            os.replace(self.partial_path, self.path)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            self.abort()
            raise VideoError(f"cannot finish {self.path}: {e}") from e
        except BaseException:
            self.abort()
            raise
        self._closed = True
        logger.info("wrote %s (%d frames)", self.path, self._count)

    def __del__(self) -> None:
        # a writer dropped without close() (outside a with block) leaves no partial file
        if not getattr(self, "_closed", True) and getattr(self, "_container", None) is not None:
            logger.warning("%s: writer dropped without close(); discarding it", self.path)
            self.abort()

    def abort(self) -> None:
        """Stop writing and remove the partial file; ``path`` is left untouched. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for closeable in (self._container, self._audio):
            if closeable is None:
                continue
            try:
                closeable.close()
            except Exception:  # cleaning up after a failure that is already being reported
                logger.debug("error while closing after abort", exc_info=True)
        self.partial_path.unlink(missing_ok=True)
        logger.debug("aborted %s; removed %s", self.path, self.partial_path)
