"""The live engine's output on the device: the synthetic mark, the latency stamp, RGB ->
yuv420p, and the download into a small ring of pinned host buffers.

Each generated frame is finished where it was made (the GPU on CUDA), a whole batch at once:
the visible "synthetic" mark (streamer.video.mark.mark_frames, the one implementation of
it), the echoed frame id (streamer.video.stamp, when `streamer.echo_stamp` is on), and for
frames that go to a video encoder the conversion to yuv420p planes, so the download is 1.5
bytes per pixel instead of 3 and the encoder does no colour conversion. The download is
asynchronous, on a stream of its own, into one of a few pinned slabs (`HostRing`): the
device thread queues it and moves on to the next batch; the output thread waits for it.
A full ring makes the device thread wait: nothing queues without bound.

**yuv420p** (`rgb_to_yuv420p`): BT.601 limited range, its integer formulas, chroma the
mean of each 2 x 2 block; the layout is PyAV's yuv420p ndarray, `[H*3/2, W]`: the Y plane, then
the U and V planes each packed into H/4 rows. libswscale's rgb24 -> yuv420p (PyAV's
`reformat`, what `streamer.webrtc.media.video_frame` does) uses the same matrix: Y agrees
to one level; its chroma filter differs slightly (a few levels on sharp edges).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from streamer.live.device import DeviceKit, Fence
from streamer.video.mark import mark_frames
from streamer.video.stamp import stamp_patch, stamp_region

#: Output formats of a session: yuv420p planes for a video encoder, or RGB.
FORMATS = ("yuv420p", "rgb")


def rgb_to_yuv420p(rgb: torch.Tensor) -> torch.Tensor:
    """`[..., H, W, 3]` uint8 RGB -> `[..., H*3/2, W]` uint8 yuv420p planes (module doc).

    H and W must be multiples of 4 and 2 (the chroma planes pack into whole rows). The
    arithmetic is BT.601's integer formulas, computed on whole-number float32 values (exact:
    every intermediate stays below 2^24), elementwise on channel planes: no matmul, so no
    TF32 rounding on a GPU, and fast on the CPU too."""
    if rgb.ndim < 3 or rgb.shape[-1] != 3 or rgb.dtype != torch.uint8:
        raise ValueError(f"expected [..., H, W, 3] uint8 RGB, got {list(rgb.shape)} {rgb.dtype}")
    h, w = int(rgb.shape[-3]), int(rgb.shape[-2])
    if h % 4 or w % 2:
        raise ValueError(f"yuv420p planes need a height divisible by 4 and an even width, "
                         f"got {w}x{h}")
    lead = rgb.shape[:-3]
    c = rgb.reshape(-1, h, w, 3).permute(0, 3, 1, 2).float().contiguous()  # N,3,H,W
    r, g, b = c[:, 0], c[:, 1], c[:, 2]
    y = torch.floor((66.0 * r + 129.0 * g + 25.0 * b + 128.0) / 256.0) + 16.0  # N,H,W
    q = F.avg_pool2d(c, 2) * 4.0  # N,3,H/2,W/2: the sum of each 2 x 2 block
    r, g, b = q[:, 0], q[:, 1], q[:, 2]
    u = torch.floor((-38.0 * r - 74.0 * g + 112.0 * b + 512.0) / 1024.0) + 128.0
    v = torch.floor((112.0 * r - 94.0 * g - 18.0 * b + 512.0) / 1024.0) + 128.0
    n = c.shape[0]
    planes = torch.cat([y.reshape(n, -1), u.reshape(n, -1), v.reshape(n, -1)], 1)
    return planes.clamp(0, 255).to(torch.uint8).reshape(*lead, h * 3 // 2, w)


def finish_frames(kit: DeviceKit, rgb: torch.Tensor, stamps: list[int | None],
                  mark: bool) -> torch.Tensor:
    """Mark (when `mark`) and stamp `rgb` `[B, S, S, 3]` uint8 in place, as
    `LivePipeline.process` does to one frame: the mark, then the echoed id of each frame
    whose stamp is not None (uploaded together, without waiting). Returns `rgb`."""
    if mark:
        mark_frames(rgb)
    stamped = [(i, s) for i, s in enumerate(stamps) if s is not None]
    if stamped:
        h, w = int(rgb.shape[-3]), int(rgb.shape[-2])
        rows, cols = stamp_region(h, w)
        patches = kit.upload(np.stack([stamp_patch(w, s) for _, s in stamped]))
        for j, (i, _) in enumerate(stamped):
            rgb[i, rows, cols] = patches[j]
    return rgb


def frame_bytes(size: int, fmt: str) -> int:
    """Bytes of one S x S frame in `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format '{fmt}': use one of {', '.join(FORMATS)}")
    return size * size * 3 // 2 if fmt == "yuv420p" else size * size * 3


@dataclass
class Download:
    """A batch's frames on their way into a host slab; `wait()` gives them as numpy."""

    fence: Fence
    ring: HostRing
    slab: torch.Tensor
    spans: list[tuple[int, tuple[int, ...]]]  # offset, shape of each frame in the slab
    sources: list[torch.Tensor]  # kept alive until the copy is done

    def wait(self) -> list[np.ndarray]:
        """Block until the download is done; each frame as its own numpy array (copied out
        of the slab, which goes back to the ring)."""
        self.fence.wait()
        try:
            return [self.slab[o:o + int(np.prod(shape))].view(shape).numpy().copy()
                    for o, shape in self.spans]
        finally:
            self.sources = []
            self.ring.release(self.slab)


class HostRing:
    """`slabs` host buffers of `nbytes` each (pinned on CUDA) for downloads in flight.

    `download(parts, stream)` waits for a free slab (so at most `slabs` batches are in
    flight), queues the copies of `parts` (device tensors, uint8) on `stream` after the
    work queued so far on the current stream, and returns a `Download`."""

    def __init__(self, kit: DeviceKit, slabs: int, nbytes: int) -> None:
        self.kit = kit
        self.nbytes = int(nbytes)
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(slabs):
            self._free.put(kit.host_buffer(self.nbytes))

    def release(self, slab: torch.Tensor) -> None:
        self._free.put(slab)

    def download(self, parts: list[torch.Tensor], stream: torch.cuda.Stream | None
                 ) -> Download:
        need = sum(int(p.numel()) for p in parts)
        if need > self.nbytes:
            raise ValueError(f"a batch of {need} bytes does not fit the host slabs of "
                             f"{self.nbytes} bytes")
        slab = self._free.get()
        ready = self.kit.fence()  # the frames are made once the current stream gets here
        ready.block(stream)
        spans = []
        offset = 0
        with self.kit.on(stream):
            for part in parts:
                n = int(part.numel())
                slab[offset:offset + n].view(tuple(part.shape)).copy_(part, non_blocking=True)
                spans.append((offset, tuple(part.shape)))
                offset += n
            done = self.kit.fence()
        return Download(done, self, slab, spans, list(parts))
