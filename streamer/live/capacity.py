"""How many live sessions one engine runs at once when `--max-sessions` is left to auto.

On the CPU a small fixed number (`CPU_SESSIONS`): one session already takes most of a
small machine. On CUDA the least of four bounds, each measured or counted when the engine
starts (`estimate_max_sessions`), at the configured size and frame rate:

- **GPU time**: the device stage's render + window + generator of a probe batch and one
  warm-fit replay, timed (synchronised) after their graphs are captured; sessions =
  `HEADROOM` x share x 1000 / (fps x ms per frame);
- **GPU memory**: the free memory after the engine's graphs are made (at most share x the
  GPU's total, less what this process holds), over one session's share: its window
  (N_w + 2 conditioning frames), its output buffers, the generator's activations per batch
  item (what the probe captures took per frame) and its fit;
- **host CPU**: two cores per session (MediaPipe's landmarks, the fit's host side, the
  transfer, VP8 decode and encode of the session's video), of the cores this process may
  run on;
- **one process**: `PROCESS_SESSIONS` at 30 fps (fewer at a higher rate). The sessions of
  a process share its interpreter lock, and past two they starve each other: on an H200,
  8 sessions at 256 px in one process got 2.5-4 fps each, 4 at 512 px two at 29 fps and
  two at 9, while 4 processes of 2 sessions each on the same GPU gave 24-30 fps each
  (README, "Results"). More sessions per GPU come from more processes:
  `dvp serve --ray local --workers-per-gpu K`.

`share` is the fraction of the GPU the engine may fill: 1 for a lone server, 1/K for each
of the K cluster workers (processes) that share a GPU (`streamer.workers_per_gpu`). Each
then sizes itself to its slice of the GPU's time and memory, so K of them together hold
about what one engine would (less the K-1 extra CUDA contexts, within `HEADROOM`); the
worker's probe may be timed while its neighbours capture their graphs, which errs on the
small side. The host-core bound needs no share: each worker is pinned to its own cores.

The figures and the bound that decided go to the log (`why`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from tracker.device import usable_cores

#: Sessions of an engine on the CPU unless `--max-sessions` says otherwise.
CPU_SESSIONS = 2
#: Most sessions the auto estimate ever gives.
MAX_AUTO_SESSIONS = 32
#: Share of the GPU's time and free memory the estimate fills.
HEADROOM = 0.8
#: Host cores per session.
CORES_PER_SESSION = 2
#: Batch of the probe that times the device stage.
PROBE_BATCH = 4
#: Sessions one process holds at 30 fps (module doc).
PROCESS_SESSIONS = 2


def estimate_max_sessions(stage: Any, fit_ms: float, fps: float, activation_bytes: float,
                          device: torch.device, share: float = 1.0) -> tuple[int, str]:
    """(sessions, why) on `device` for the engine's device stage `stage` (graphs captured
    for batches up to `PROBE_BATCH`); fit_ms: one warm fit's device time; activation_bytes:
    the generator graphs' memory per batch item; share: the fraction of the GPU this engine
    may fill, in (0, 1] (module doc)."""
    cores = usable_cores()
    by_cpu = max(1, cores // CORES_PER_SESSION)
    if device.type != "cuda":
        return CPU_SESSIONS, "the CPU's default; --max-sessions changes it"
    b = stage.generator_sizes[-1] if stage.generator_sizes else 1
    per_frame = time_device_stage(stage, b) / b + fit_ms
    by_gpu = max(1, int(HEADROOM * share * 1000.0 / (fps * per_frame)))
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    if share < 1.0:  # this process's slice: what it holds already counts against it
        free = min(free, max(0, int(share * total) - torch.cuda.memory_reserved(index)))
    s, n_w = stage.size, int(stage.target.n_w)
    per_session = (n_w + 2) * 9 * s * s * 4 + 2 * s * s * 3 + activation_bytes + (32 << 20)
    by_memory = max(1, int(HEADROOM * free / per_session))
    by_process = process_sessions(fps)
    n, bound = least_bound({"GPU time": by_gpu, "GPU memory": by_memory, "host cores": by_cpu,
                            "one process": by_process})
    part = "" if share >= 1.0 else f" (this process's {share:.3g} of the GPU)"
    why = (f"{n}, set by {bound}{part}: GPU {per_frame:.2f} ms per frame at {s} px (batch "
           f"{b}) -> {by_gpu} at {fps:g} fps; {free / 2**30:.1f} GiB free / "
           f"{per_session / 2**20:.0f} MiB per session -> {by_memory}; {cores} host cores -> "
           f"{by_cpu}; one process -> {by_process} (more sessions on this GPU: "
           f"dvp serve --ray local --workers-per-gpu K)")
    return n, why


def process_sessions(fps: float) -> int:
    """Sessions one process holds at `fps` frames/s each: `PROCESS_SESSIONS` at 30, scaled
    by 30 / fps (at least 1)."""
    return max(1, int(PROCESS_SESSIONS * 30.0 / fps))


def least_bound(bounds: dict[str, int]) -> tuple[int, str]:
    """(sessions, what set it): the least of the named `bounds`, at least 1 and at most
    `MAX_AUTO_SESSIONS` (then "the cap of N"); a tie names the first given."""
    name, value = min(bounds.items(), key=lambda kv: kv[1])
    if value > MAX_AUTO_SESSIONS:
        return MAX_AUTO_SESSIONS, f"the cap of {MAX_AUTO_SESSIONS}"
    return max(1, value), name


def time_device_stage(stage: Any, batch: int, repeats: int = 10) -> float:
    """Median ms of the device stage's render, window stack and generator of `batch`
    frames of the target at rest (synchronised)."""
    rest = stage.target.rest
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        conds = stage.render([rest] * batch)
        windows = [torch.cat([c] * int(stage.target.n_w)) for c in conds]
        stage.generate(windows)
        stage.kit.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[2:]))


def time_fit(slot: Any, repeats: int = 10) -> float:
    """Median ms of one replay of a slot's warm-fit graph (0 without one)."""
    graph = getattr(slot, "fit_graph", None)
    if graph is None:
        return 0.0
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        graph.graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times[2:]))
