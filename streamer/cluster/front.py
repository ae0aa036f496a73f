"""The front door of `dvp serve --ray`: the page, `/ws` signalling, token, TLS and the
session cap of streamer.webrtc.server (the same `SignalServer` and `Session`, so every
message is checked as by a single server), each session's media placed on a worker of a
Ray cluster (streamer.cluster.worker), and `/metrics`.

- **Workers.** Every `DISCOVER_PERIOD` seconds the front looks at the cluster's alive
  nodes and starts `ClusterWorker` actors, pinned to their node, until each node has K
  per GPU (`--device auto|cuda`; K = `streamer.workers_per_gpu`, `--workers-per-gpu`, each
  actor `num_gpus=1/K`: Ray packs them, K on GPU 0 before GPU 1, and each sizes its
  sessions to its 1/K of the GPU) and one per unit of the custom resource `dvp_worker`
  (`--device auto|cpu`). The node's workers split its cores evenly (each pinned to its
  share): K processes per GPU spread the per-session CPU work (landmarks, fit, VP8) over K
  interpreter locks. Nodes that join later get workers the same way; a worker that could
  not start or was lost is tried again on its node after a back-off (`RETRY_S`, doubling
  up to `RETRY_MAX_S`). A worker takes sessions once it has loaded the target and made its
  engine (`info` answered): `hello` then carries its target's facts.
- **Placement.** A new WebSocket is placed at once on the least-loaded ready worker with
  room (streamer.cluster.placement); none: `busy` (as a full single server). The offer,
  checked here, goes to that worker, which answers it; the answer comes back (offer to
  answer: the placement time, `dvp_placement_ms`). Controls are checked here and relayed;
  the worker's `stats` and `error` messages come back through its long poll.
- **Faults.** Each worker is polled without pause (`poll` returns within `POLL_WAIT` s).
  A poll that fails (the worker's process died: Ray reports it within milliseconds) or
  does not answer within `POLL_WAIT + WORKER_TIMEOUT` s means the worker is lost: each of
  its clients gets `{"type": "error", "message": "the worker of this session (w0) was
  lost: ...; connect again for a new session"}` and its WebSocket closes (code 1011); a
  reconnect is placed on a worker that is alive. The front keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web

from streamer.cli.config import Config
from streamer.cluster.metrics import CONTENT_TYPE, exposition, log_lines
from streamer.cluster.placement import WorkerLoad, pick_worker
from streamer.live.controls import Controls
from streamer.live.pipeline import SessionStages
from streamer.webrtc.peer import OfferError
from streamer.webrtc.server import ServeOptions, Session, SessionMedia, SignalServer
from streamer.webrtc.tasks import spawn
from tracker.errors import DvpError

log = logging.getLogger(__name__)

#: Seconds between looks at the cluster's nodes for GPUs and worker slots without a worker.
DISCOVER_PERIOD = 2.0
#: Seconds a worker's `poll` waits for its sessions' messages before it returns anyway.
POLL_WAIT = 1.0
#: Seconds past POLL_WAIT after which a worker that has not answered its poll is lost.
WORKER_TIMEOUT = 4.0
#: Seconds a session's offer may take on its worker (its SDP work and ICE gathering).
OPEN_TIMEOUT = 30.0
#: Seconds the front waits for a worker's other calls (control, close, shutdown).
CALL_TIMEOUT = 10.0
#: Back-off before a node gets a worker again after one failed to start or was lost (s),
#: doubling per failure in a row up to RETRY_MAX_S.
RETRY_S = 5.0
RETRY_MAX_S = 300.0
#: The front's session cap when `--max-sessions` is not given: the workers' room decides.
UNCAPPED = 1_000_000
#: Placement times kept for `dvp_placement_ms`.
_PLACEMENTS = 1000


@dataclass
class WorkerRecord:
    """The front's view of one worker actor."""

    name: str
    actor: Any
    node_id: str
    kind: str  # "gpu" or "cpu"
    order: int
    share: int = 0  # which share of its host's cores it runs on
    info: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    alive: bool = True
    sessions: set[str] = field(default_factory=set)
    metrics: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def capacity(self) -> int:
        return int(self.info.get("capacity", 0))


class RemoteMedia:
    """A session's media on a cluster worker (SessionMedia): the checked offer and controls
    go to the worker, which holds the peer connection."""

    def __init__(self, front: ClusterFront, worker: WorkerRecord, session: Session) -> None:
        self.front = front
        self.worker = worker
        self.session = session
        self.opened = False
        self.told = False  # the client has been told its worker was lost

    async def open(self, sdp: str, controls: Controls) -> str:
        import ray

        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(self.worker.actor.open.remote(
                self.session.id, sdp, controls, self.front.ice_servers()), OPEN_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as err:
            self.told = True
            raise OfferError(lost_message(self.worker, describe(err))) from err
        if "error" in reply:
            raise OfferError(reply["error"])
        self.opened = True
        self.front.placement_ms.append((time.monotonic() - started) * 1e3)
        return str(reply["sdp"])

    async def control(self, controls: Controls, neutral: bool) -> None:
        await self._call("control", controls, neutral)

    async def close(self) -> None:
        self.worker.sessions.discard(self.session.id)
        if self.opened and self.worker.alive:
            self.opened = False
            await self._call("close")

    async def _call(self, method: str, *args: Any) -> None:
        import ray

        try:
            await asyncio.wait_for(getattr(self.worker.actor, method).remote(
                self.session.id, *args), CALL_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as err:  # the poll notices the loss
            log.debug("session %s: %s on worker %s failed: %s", self.session.id, method,
                      self.worker.name, err)


class ClusterFront(SignalServer):
    """`dvp serve TDIR --ray ADDRESS` once Ray is connected (module doc).

    target_dir: the target directory (the same path on every worker host); device:
    `auto` (GPUs and `dvp_worker` slots), `cuda` (GPUs only) or `cpu` (slots only);
    stage_factory: the workers' session stages (default: the real tracker and transfer);
    config.streamer.workers_per_gpu: workers per GPU (module doc); options.max_sessions:
    the front's cap on sessions at once (UNCAPPED: the workers' room).
    """

    def __init__(self, config: Config, options: ServeOptions, target_dir: str | Path,
                 device: str = "auto",
                 stage_factory: Callable[[Any, Config], SessionStages] | None = None) -> None:
        super().__init__(config, options)
        self.target_dir = str(Path(target_dir).resolve())
        if device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
        self.per_gpu = workers_per_gpu(config)
        self.device = device
        self.stage_factory = stage_factory
        self.workers: dict[str, WorkerRecord] = {}
        self.workers_lost = 0
        self.placement_ms: deque[float] = deque(maxlen=_PLACEMENTS)
        self._facts: dict[str, Any] | None = None
        self._count = 0
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._actor_class: Any = None

    # -- the front door's hooks --
    def _make_app(self) -> web.Application:
        app = super()._make_app()
        app.router.add_get("/metrics", self._metrics)
        return app

    def target_facts(self) -> dict[str, Any]:
        if self._facts is None:
            raise RuntimeError("no worker is ready yet")
        return self._facts

    def session_cap(self) -> int:
        """Sessions at once: the ready workers' capacity, at most `--max-sessions`."""
        room = sum(w.capacity for w in self.workers.values() if w.ready and w.alive)
        return min(self.options.max_sessions, room)

    def health(self) -> dict[str, Any]:
        return {**super().health(),
                "workers": sum(1 for w in self.workers.values() if w.ready and w.alive),
                "workers_starting": sum(1 for w in self.workers.values() if not w.ready)}

    def admit(self, session: Session) -> SessionMedia | None:
        ready = {w.name: w for w in self.workers.values() if w.ready and w.alive}
        name = pick_worker([WorkerLoad(w.name, len(w.sessions), w.capacity, w.order)
                            for w in ready.values()])
        if name is None:
            return None
        worker = ready[name]
        worker.sessions.add(session.id)
        log.info("session %s: placed on worker %s (%d/%d)", session.id, name,
                 len(worker.sessions), worker.capacity)
        return RemoteMedia(self, worker, session)

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"type": "error", "message": "missing or wrong token: "
                                      "ask /metrics?token=TOKEN"}, status=401)
        return web.Response(body=exposition(self), headers={"Content-Type": CONTENT_TYPE})

    def placed_on(self, sid: str) -> str | None:
        """The name of the worker session `sid` is placed on (None: not placed)."""
        for worker in self.workers.values():
            if sid in worker.sessions:
                return worker.name
        return None

    # -- running --
    async def start(self) -> str:
        url = await super().start()
        self._spawn(self._discover_loop())
        self._spawn(self._log_loop())
        return url

    async def close(self) -> None:
        """Close the sessions, stop the workers (their sessions first), stop listening."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await super().close()
        await asyncio.gather(*(self._stop_worker(w) for w in list(self.workers.values())))

    def _spawn(self, coro: Any) -> None:
        spawn(self._tasks, coro)

    # -- workers --
    async def _discover_loop(self) -> None:
        while not self._stopping:
            try:
                await self.discover()
            except Exception:  # a Ray hiccup never stops the front
                log.exception("looking for cluster nodes failed")
            await asyncio.sleep(DISCOVER_PERIOD)

    async def discover(self) -> None:
        """Start the missing workers of the alive nodes: `workers_per_gpu` per GPU, one per
        `dvp_worker` unit."""
        import ray

        nodes = await asyncio.get_running_loop().run_in_executor(None, ray.nodes)
        now = time.monotonic()
        for node in nodes:
            if not node.get("Alive") or self._stopping:
                continue
            node_id = str(node["NodeID"])
            if self._retry_at.get(node_id, 0.0) > now:
                continue
            slots = node_slots(node.get("Resources", {}), self.device, self.per_gpu)
            shares = sum(slots.values())
            for kind, count in slots.items():
                have = sum(1 for w in self.workers.values()
                           if w.node_id == node_id and w.kind == kind and w.alive)
                for _ in range(count - have):
                    taken = {w.share for w in self.workers.values()
                             if w.node_id == node_id and w.alive}
                    share = min(set(range(shares)) - taken)
                    self._start_worker(node_id, kind, node.get("NodeManagerAddress", "?"),
                                       (share, shares))

    def _start_worker(self, node_id: str, kind: str, address: str,
                      share: tuple[int, int]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from streamer.cluster.worker import ClusterWorker

        if self._actor_class is None:  # exported to the cluster once
            self._actor_class = ray.remote(ClusterWorker)
        name = f"w{self._count}"
        gpu_share = 1.0 / self.per_gpu if kind == "gpu" else 1.0
        placement: dict[str, Any] = {"num_gpus": gpu_share} if kind == "gpu" else \
            {"resources": {"dvp_worker": 1}}
        actor = self._actor_class.options(
            num_cpus=0, max_restarts=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            **placement).remote(name, self.target_dir, self.config,
                                "cuda" if kind == "gpu" else "cpu", self.stage_factory,
                                self.options.vmc, logging.getLogger().getEffectiveLevel(),
                                share, gpu_share)
        worker = WorkerRecord(name, actor, node_id, kind, self._count, share[0])
        self._count += 1
        self.workers[name] = worker
        log.info("worker %s: starting on %s (%s, cores share %d of %d)", name, address,
                 ("a GPU" if self.per_gpu == 1 else f"1/{self.per_gpu} of a GPU")
                 if kind == "gpu" else "a dvp_worker slot", share[0] + 1, share[1])
        self._spawn(self._run_worker(worker))

    async def _run_worker(self, worker: WorkerRecord) -> None:
        """Wait until the worker is ready, then poll it until it is lost or the front
        stops."""
        import ray

        try:
            worker.info = await worker.actor.info.remote()
        except ray.exceptions.RayError as err:
            log.error("worker %s could not start: %s", worker.name, first_line(err))
            await self._forget(worker, failed=True)
            return
        if self._facts is None:
            self._facts = worker.info["facts"]
        elif worker.info["facts"] != self._facts:
            log.error("worker %s serves another target (%s) than the others: stopped",
                      worker.name, worker.info["facts"]["target"])
            await self._forget(worker, failed=True)
            return
        worker.ready = True
        worker.started = time.monotonic()
        self._failures.pop(worker.node_id, None)
        log.info("worker %s: ready on %s (%s, %d cores, pid %s): %d session(s), loaded in "
                 "%.1f s", worker.name, worker.info["host"], worker.info["device"],
                 worker.info["cores"], worker.info["pid"], worker.capacity,
                 worker.info["ready_s"])
        while worker.alive and not self._stopping:
            try:
                reply = await asyncio.wait_for(worker.actor.poll.remote(POLL_WAIT),
                                               POLL_WAIT + WORKER_TIMEOUT)
            except (ray.exceptions.RayError, TimeoutError) as err:
                if not self._stopping:
                    await self.lose(worker, describe(err))
                return
            worker.metrics = reply["metrics"]
            for sid, kind, message in reply["events"]:
                session = self.sessions.get(sid)
                if session is None:
                    continue
                if kind == "end":
                    self._spawn(self.end_session(session))
                else:
                    await session.send(message)

    async def lose(self, worker: WorkerRecord, why: str) -> None:
        """A worker died or stopped answering: tell each of its clients and end their
        sessions; the worker is stopped for good and its node tried again later."""
        if not worker.alive:
            return
        worker.alive = False
        self.workers_lost += 1
        placed = [self.sessions[sid] for sid in list(worker.sessions) if sid in self.sessions]
        log.warning("worker %s lost (%s): ending its %d session(s)", worker.name, why,
                    len(placed))
        message = lost_message(worker, why)
        for session in placed:
            media = session.media
            if not (isinstance(media, RemoteMedia) and media.told):
                await session.error(message)
            session.close_code = WSCloseCode.INTERNAL_ERROR
            self._spawn(self.end_session(session))
        await self._forget(worker, failed=True)

    async def _forget(self, worker: WorkerRecord, failed: bool) -> None:
        import ray

        worker.alive = False
        self.workers.pop(worker.name, None)
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception as err:  # noqa: BLE001  (already gone)
            log.debug("worker %s: kill: %s", worker.name, err)
        if failed:
            n = self._failures.get(worker.node_id, 0)
            self._failures[worker.node_id] = n + 1
            self._retry_at[worker.node_id] = time.monotonic() + min(RETRY_MAX_S,
                                                                    RETRY_S * 2 ** n)

    async def _stop_worker(self, worker: WorkerRecord) -> None:
        import ray

        if worker.ready and worker.alive:
            try:
                await asyncio.wait_for(worker.actor.shutdown.remote(), CALL_TIMEOUT)
            except (ray.exceptions.RayError, TimeoutError) as err:
                log.debug("worker %s: shutdown failed: %s", worker.name, err)
        await self._forget(worker, failed=False)

    async def _log_loop(self) -> None:
        period = self.config.streamer.metrics_log_seconds
        if period <= 0:
            return
        while not self._stopping:
            await asyncio.sleep(period)
            for line in log_lines(self):
                log.info("%s", line)


def workers_per_gpu(config: Config) -> int:
    """`streamer.workers_per_gpu`, checked (DvpError below 1): the front's, and `dvp serve
    --ray`'s before it starts Ray."""
    value = config.streamer.workers_per_gpu
    if value < 1:
        raise DvpError(f"streamer.workers_per_gpu must be at least 1, got {value}")
    return value


def node_slots(resources: dict[str, float], device: str, per_gpu: int) -> dict[str, int]:
    """Workers a node with Ray `resources` gets: `gpu`: `per_gpu` per GPU (none with
    device `cpu`), `cpu`: one per unit of `dvp_worker` (none with device `cuda`)."""
    return {"gpu": int(resources.get("GPU", 0)) * per_gpu if device != "cpu" else 0,
            "cpu": int(resources.get("dvp_worker", 0)) if device != "cuda" else 0}


def lost_message(worker: WorkerRecord, why: str) -> str:
    """The `error` text a client of a lost worker gets."""
    return (f"the worker of this session ({worker.name}) was lost: {why}; connect again "
            "for a new session")


def describe(err: BaseException) -> str:
    """A short reason for a failed call to a worker."""
    import ray

    if isinstance(err, TimeoutError):
        return f"it did not answer within {POLL_WAIT + WORKER_TIMEOUT:g} s"
    if isinstance(err, ray.exceptions.ActorDiedError):
        return "its process ended"
    if isinstance(err, ray.exceptions.ActorUnavailableError):
        return "it cannot be reached"
    return first_line(err)


def first_line(err: BaseException) -> str:
    """The last informative line of a Ray error (they carry whole tracebacks)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (cause[-1] if cause else lines[0] if lines else type(err).__name__)[:300]
