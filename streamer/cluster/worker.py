"""A cluster worker: one GPU (or one CPU worker slot) serving live sessions for a front.

`ClusterWorker` is made a Ray actor by the front (streamer.cluster.front), K per GPU of
the cluster (`num_gpus=1/K`, K = `streamer.workers_per_gpu`) and one per unit of the
custom resource `dvp_worker` on nodes that offer it (CPU workers). When it starts it
loads the target once, makes one session's stages (so a missing or broken stage fails
here) and the target's live engine (streamer.live.engine: its CUDA graphs captured before
any session); then it holds each of its sessions' media (streamer.webrtc.peer.PeerSession): the aiortc peer connection
gathers its candidates on this worker's host, so video and audio flow between the client
and this worker, never through the front.

The front reaches it through the actor's methods, run on the actor's asyncio loop: `open`
(the offer, checked by the front; returns the answer), `control`, `close`, and `poll`, a
long poll that returns the sessions' outgoing messages (`stats`, `error`) and session ends
as they happen, with the worker's figures (`metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamer.cli.config import Config
from streamer.live.controls import Controls
from streamer.live.pipeline import SessionStages, p50_p95
from streamer.webrtc.peer import OfferError, PeerSession

log = logging.getLogger(__name__)

#: Frames of each session's recent `server_ms` history that the worker's latency figures
#: take (so a long session does not outweigh a new one).
LATENCY_FRAMES = 300


class ClusterWorker:
    """One worker's loaded target, live engine and sessions (module doc).

    name: the front's name for it (`w0`, ...); target_dir: the target directory, at this
    path on the worker's host; device: `cuda` (the GPU Ray gave the actor) or `cpu`;
    stage_factory(target, config) -> SessionStages: one session's tracker and transfer
    (default streamer.live.stages.make_session_stages); vmc: (HOST, PORT) of a VMC
    receiver for every session's feed; log_level: the front's logging level; share:
    (index, count): the worker runs on the index-th of `count` equal shares of its host's
    cores (one per worker of the host), so workers of one host do not compete for cores
    and each sizes its sessions by its own (streamer.live.capacity); gpu_share: the
    fraction of its GPU it was given (1/K with K workers per GPU): its engine sizes its
    sessions to that share of the GPU's time and memory.
    """

    def __init__(self, name: str, target_dir: str, config: Config, device: str,
                 stage_factory: Callable[[Any, Config], SessionStages] | None = None,
                 vmc: tuple[str, int] | None = None, log_level: int = logging.INFO,
                 share: tuple[int, int] = (0, 1), gpu_share: float = 1.0) -> None:
        from streamer.live.engine import LiveEngine
        from streamer.live.process import apply_process_settings
        from streamer.live.stages import LoadedTarget, make_session_stages
        from streamer.webrtc.security import restrict_ice_addresses
        from streamer.webrtc.server import target_facts
        from tracker.device import pick_device

        logging.basicConfig(level=log_level, format=f"%(levelname)s {name} %(name)s: "
                            "%(message)s")
        logging.getLogger().setLevel(log_level)
        started = time.perf_counter()
        self.cores = pin_to_share(*share)
        self.name = name
        self.config = config
        self.gpu_share = gpu_share
        self.vmc = vmc
        apply_process_settings(config)  # as `dvp serve` does
        if not Path(target_dir).is_dir():
            raise FileNotFoundError(f"worker {name} on {socket.gethostname()}: the target "
                                    f"directory {target_dir} is not on this host (every "
                                    "worker host needs it at the same path)")
        self.target = LoadedTarget(target_dir, config, pick_device(device))
        self.stage_factory = stage_factory or make_session_stages
        # one session's stages now (as `dvp serve` does): a broken stage fails here
        probe = stage_factory(self.target, config) if stage_factory is not None else \
            make_session_stages(self.target, config, monitor=False)
        try:
            self.engine = LiveEngine(self.target, config, config.streamer.max_sessions or None,
                                     stage_factory=self.stage_factory, gpu_share=gpu_share)
            self.engine.report(probe)
        finally:
            probe.close()
        # candidates on every address of this host (127.0.0.1 where it has no other): the
        # loopback-only rule is a single-process server's (streamer.webrtc.security)
        restrict_ice_addresses(None)
        self.facts = target_facts(self.target)
        self.sessions: dict[str, PeerSession] = {}
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self._wake: asyncio.Event | None = None
        self._frames_closed = 0  # frames of sessions already closed
        self._errors_closed = 0
        self._setup_failures = 0
        self.ready_s = time.perf_counter() - started
        log.info("worker %s ready in %.1f s: %s, %d core(s), %d session(s)", name,
                 self.ready_s, self.device_name(), len(self.cores), self.engine.max_sessions)

    def device_name(self) -> str:
        import torch

        device = self.target.device
        if device.type == "cuda":
            part = "" if self.gpu_share >= 1 else f", {round(1 / self.gpu_share)} workers"
            return f"{torch.cuda.get_device_name(device)} (GPU {self.gpu_ids()}{part})"
        return "cpu"

    @staticmethod
    def gpu_ids() -> str:
        try:
            import ray

            return ",".join(str(i) for i in ray.get_gpu_ids()) or "?"
        except Exception:  # noqa: BLE001  (outside Ray: a plain process)
            return os.environ.get("CUDA_VISIBLE_DEVICES", "?")

    # -- the front's calls (async: they run on the actor's event loop) --
    async def info(self) -> dict[str, Any]:
        """Who and where this worker is, and what it serves."""
        host = _host_address()
        return {"name": self.name, "pid": os.getpid(), "host": host,
                "hostname": socket.gethostname(), "device": self.device_name(),
                "cores": len(self.cores),
                "capacity": self.engine.max_sessions, "facts": self.facts,
                "ready_s": round(self.ready_s, 2),
                "choices": {k: c.chosen for k, c in self.engine.choices().items()}}

    async def open(self, sid: str, sdp: str, controls: Controls,
                   ice_servers: list[dict[str, Any]]) -> dict[str, Any]:
        """Answer a session's offer: `{"sdp": answer}` or `{"error": message}` (the
        client's `error` text; nothing is kept then)."""
        from streamer.webrtc.server import open_engine_session

        if sid in self.sessions:
            return {"error": f"session {sid} is already open on worker {self.name}"}

        async def send(message: dict[str, Any]) -> None:
            if message.get("type") == "error":
                self._setup_failures += 1
            self._event(sid, "message", message)

        async def end() -> None:
            await self.close(sid)
            self._event(sid, "end", {})

        def opener(peer: PeerSession) -> Any:
            return open_engine_session(self.engine, self.stage_factory, self.config,
                                       peer.on_output, f"session-{peer.id}", self.vmc)

        peer = PeerSession(sid, opener, self.facts["expression_names"], ice_servers, send, end,
                           self.config.streamer.negotiation_seconds)
        self.sessions[sid] = peer
        try:
            answer = await peer.open(sdp, controls)
        except OfferError as err:
            self.sessions.pop(sid, None)
            await peer.close()
            return {"error": str(err)}
        log.info("session %s: placed on worker %s (%d open)", sid, self.name,
                 len(self.sessions))
        return {"sdp": answer}

    async def control(self, sid: str, controls: Controls, neutral: bool) -> None:
        """New controls of a session (checked by the front)."""
        peer = self.sessions.get(sid)
        if peer is not None:
            await peer.control(controls, neutral)

    async def close(self, sid: str) -> None:
        """Free a session (its WebSocket at the front closed). Idempotent."""
        peer = self.sessions.pop(sid, None)
        if peer is None:
            return
        stats = peer.stats()
        await peer.close()
        self._frames_closed += peer.frames_out
        self._errors_closed += int(stats.get("errors", 0) or 0)
        log.info("session %s: closed on worker %s (%d open)", sid, self.name,
                 len(self.sessions))

    async def poll(self, wait: float) -> dict[str, Any]:
        """The sessions' events since the last poll, waiting up to `wait` seconds for one:
        `events`: [(session id, "message" | "end", message)], oldest first; `metrics`."""
        if self._wake is None:
            self._wake = asyncio.Event()
        if not self.events:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
        events, self.events = self.events, []
        return {"events": events, "metrics": self.metrics()}

    async def shutdown(self) -> None:
        """Close every session and the engine (the front stops)."""
        for sid in list(self.sessions):
            await self.close(sid)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)

    # -- figures --
    def metrics(self) -> dict[str, Any]:
        """sessions, capacity, frames_total (frames handed to the video senders since the
        worker started), fps (output frames per second, summed over its sessions),
        latency_ms {p50, p95} (server-side ms, a decoded frame handed to the engine -> its
        output handed to the video sender, each session's last LATENCY_FRAMES frames),
        errors_total (frames that failed and sessions that could not start)."""
        fps, errors, frames, recent = 0.0, 0, 0, []
        for peer in self.sessions.values():
            stats = peer.pipeline.stats() if peer.pipeline is not None else {}
            fps += float(stats.get("fps", 0.0) or 0.0)
            errors += int(stats.get("errors", 0) or 0)
            frames += peer.frames_out
            recent.extend(list(peer.handoff_ms)[-LATENCY_FRAMES:])
        return {"sessions": len(self.sessions), "capacity": self.engine.max_sessions,
                "frames_total": self._frames_closed + frames, "fps": round(fps, 2),
                "latency_ms": p50_p95(recent),
                "errors_total": self._errors_closed + errors + self._setup_failures}

    def _event(self, sid: str, kind: str, message: dict[str, Any]) -> None:
        self.events.append((sid, kind, message))
        if self._wake is not None:
            self._wake.set()


def pin_to_share(index: int, count: int) -> list[int]:
    """Pin this process (each of its threads; threads started later inherit it) to the
    `index`-th of `count` equal shares of the cores it may run on, and return those cores
    (all of them when count is 1 or the cores are fewer than the shares)."""
    cores = sorted(os.sched_getaffinity(0))
    if count <= 1 or len(cores) < count:
        return cores
    per = len(cores) // count
    mine = cores[index * per:(index + 1) * per]
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:  # a thread that ended meanwhile
            continue
    return mine


def _host_address() -> str:
    """This host's address as the cluster sees it (Ray's node address, else a guess)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001  (outside Ray)
        return socket.gethostbyname(socket.gethostname())
