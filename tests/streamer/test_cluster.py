"""`dvp serve --ray`: a front door and workers on a Ray cluster.

One 3-node `ray.cluster_utils.Cluster` for the module (a head for the front, two nodes with
a `dvp_worker` slot each, the second joining after the front started), the tiny target,
real aiortc clients: sessions spread over the workers, the cap says `busy`, a killed
worker's client is told and a reconnect lands on the other worker, `/metrics` and the log
follow. And `dvp serve --ray local` as a user runs it: a cluster of its own, stopped on
SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamer.cli.config import load_config
from streamer.cluster.placement import WorkerLoad, pick_worker
from streamer.webrtc.client import ClientError, DvpClient, FrameSourceTrack
from tests.streamer.serving import RunningServer, serve_in_thread, stop_server
from tests.streamer.stand_ins import stand_in_stages
from tests.streamer.test_server import source_frame, wait_for

REPO = Path(__file__).resolve().parents[2]


def _pythonpath() -> str:
    """PYTHONPATH for a child process: the repository, then what this one was given (the
    GPU machine brings its missing packages through PYTHONPATH)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
TOKEN = "cluster-secret"
#: Sessions each worker's engine runs (streamer.max_sessions) and the front's cap.
PER_WORKER = 2
FRONT_CAP = 3
#: Object store per node of the test cluster (its minimum is 75 MiB).
STORE = 80 << 20


def test_placement_takes_the_least_loaded_worker_with_room() -> None:
    def load(name: str, sessions: int, capacity: int, order: int) -> WorkerLoad:
        return WorkerLoad(name, sessions, capacity, order)

    assert pick_worker([]) is None
    assert pick_worker([load("w0", 2, 2, 0), load("w1", 1, 1, 1)]) is None
    assert pick_worker([load("w0", 0, 2, 0), load("w1", 0, 2, 1)]) == "w0"
    assert pick_worker([load("w0", 1, 2, 0), load("w1", 0, 2, 1)]) == "w1"
    # shares, not counts: 2 of 8 is less loaded than 1 of 2
    assert pick_worker([load("w0", 1, 2, 0), load("w1", 2, 8, 1)]) == "w1"
    # equal shares: fewer sessions first
    assert pick_worker([load("w0", 2, 4, 0), load("w1", 1, 2, 1)]) == "w1"


def test_a_node_gets_k_workers_per_gpu_and_one_per_worker_slot() -> None:
    from streamer.cluster.front import node_slots

    node = {"CPU": 32.0, "GPU": 2.0, "dvp_worker": 1.0}
    assert node_slots(node, "auto", 1) == {"gpu": 2, "cpu": 1}
    assert node_slots(node, "auto", 3) == {"gpu": 6, "cpu": 1}
    assert node_slots(node, "cuda", 4) == {"gpu": 8, "cpu": 0}
    assert node_slots(node, "cpu", 4) == {"gpu": 0, "cpu": 1}
    assert node_slots({"CPU": 8.0}, "auto", 2) == {"gpu": 0, "cpu": 0}


PIN_CHECK = """
import os, threading
from streamer.cluster.worker import pin_to_share
threading.Thread(target=threading.Event().wait, args=(5,), daemon=True).start()
cores = sorted(os.sched_getaffinity(0))
half = len(cores) // 2
mine = pin_to_share(1, 2)
assert mine == cores[half:2 * half], (mine, cores)
threads = [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]
assert len(threads) >= 2 and all(t == mine for t in threads), threads
assert pin_to_share(0, 1) == mine
print("ok")
"""


def test_a_worker_pins_itself_to_its_share_of_the_cores() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores")
    out = subprocess.run([sys.executable, "-c", PIN_CHECK], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=False,
                         env=dict(os.environ, PYTHONPATH=_pythonpath()))
    assert out.stdout.strip() == "ok", out.stderr


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def served_locally(target_dir: Path, dvp_home: Path, logs: Path, device: str,
                   workers: int, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`dvp serve TDIR --ray local --device D --port 0 EXTRA...` in a child process, until
    its `workers` workers are ready: (the process, its address). Killed on the way out if it
    still runs."""
    env = dict(os.environ, PYTHONPATH=_pythonpath(), DVP_HOME=str(dvp_home))
    out, err = logs / "front.out", logs / "front.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer.cli.main", "serve", str(target_dir), "--ray",
             "local", "--device", device, "--port", "0", *extra], cwd=REPO, env=env, stdout=stdout,
            stderr=stderr, text=True)
    try:
        def url() -> str | None:
            lines = [ln.strip() for ln in out.read_text().splitlines()]
            return next((ln for ln in lines if re.fullmatch(r"http://\S+/", ln)), None)

        assert wait_for(lambda: url() is not None or proc.poll() is not None, 120)
        address = url()
        assert address is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+/", address), \
            (proc.poll(), err.read_text()[-3000:])
        assert wait_for(lambda: health(address)["workers"] >= workers, 300), \
            (health(address), err.read_text()[-3000:])
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url + "metrics", timeout=10) as reply:
        return str(reply.read().decode())


def health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "health", timeout=10) as reply:
        return dict(json.loads(reply.read()))


def test_serve_ray_local_starts_a_cluster_and_stops_it_on_sigterm(
        target_dir: Path, dvp_home: Path, tmp_path: Path) -> None:
    with served_locally(target_dir, dvp_home, tmp_path, "cpu", 1) as (proc, url):
        assert health(url) == {"status": "ok", "sessions": 0, "max_sessions": 2,
                               "workers": 1, "workers_starting": 0}
        cluster = descendants(proc.pid)
        assert len(cluster) >= 3, "no local Ray cluster under the front"  # gcs, raylet, worker
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert wait_for(lambda: not [p for p in cluster if running(p)], 30), \
        [p for p in cluster if running(p)]


def sessions_on_workers(url: str, count: int) -> tuple[list[str], list[str]]:
    """`count` aiortc clients (a frame back each), then /metrics while they run: (each
    worker's `dvp_sessions` sample, each worker's pid)."""
    async def go() -> tuple[list[str], list[str]]:
        ws = url.replace("http://", "ws://") + "ws"
        clients = [DvpClient(ws, FrameSourceTrack(source_frame, fps=15)) for _ in range(count)]
        try:
            for c in clients:
                await c.start()
            for c in clients:
                await c.next_frame(60)
            text = await asyncio.to_thread(metrics_text, url)
            return (re.findall(r'dvp_sessions\{worker="\w+"\} (\S+)', text),
                    re.findall(r'dvp_worker_info\{[^}]*pid="(\d+)"', text))
        finally:
            for c in clients:
                await c.close()

    return asyncio.run(go())


def test_serve_ray_local_workers_per_gpu_runs_that_many_worker_processes(
        target_dir: Path, dvp_home: Path, tmp_path: Path) -> None:
    # on a CPU-only cluster: K units of dvp_worker, K CPU workers (the GPU path: below)
    with served_locally(target_dir, dvp_home, tmp_path, "cpu", 2,
                        "--workers-per-gpu", "2") as (proc, url):
        assert health(url) == {"status": "ok", "sessions": 0, "max_sessions": 4,
                               "workers": 2, "workers_starting": 0}
        sessions, pids = sessions_on_workers(url, 2)
        assert sessions == ["1.0", "1.0"]  # one session on each worker
        assert len(set(pids)) == 2, pids  # two processes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    front_log = (tmp_path / "front.err").read_text()
    assert "started a local Ray cluster: 2 CPU worker(s)" in front_log


@pytest.mark.gpu
@pytest.mark.parametrize("per_gpu", [1, 2])
def test_serve_ray_local_runs_k_workers_per_gpu(target_dir: Path, dvp_home: Path,
                                                tmp_path: Path, per_gpu: int) -> None:
    import torch

    gpus = torch.cuda.device_count()
    with served_locally(target_dir, dvp_home, tmp_path, "cuda", gpus * per_gpu,
                        "--workers-per-gpu", str(per_gpu)) as (proc, url):
        devices = re.findall(r'dvp_worker_info\{device="([^"]+)"', metrics_text(url))
        # Ray packs the fractional GPUs: K workers on each GPU, each saying which
        assert len(devices) == gpus * per_gpu and len(set(devices)) == gpus, devices
        assert all(devices.count(d) == per_gpu for d in devices), devices
        if per_gpu > 1:
            assert all(d.endswith(f", {per_gpu} workers)") for d in devices), devices
        sessions, pids = sessions_on_workers(url, gpus * per_gpu)
        assert sessions == ["1.0"] * gpus * per_gpu  # one session on each worker
        assert len(set(pids)) == gpus * per_gpu, pids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_serve_ray_refuses_a_bad_target_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamer.cli.main import main

    assert main(["serve", str(tmp_path / "nothing"), "--ray", "local"]) == 1
    assert "is not a target directory: target.yaml is missing" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--ray", "local", "--set", "streamer.echo=true"]) == 1
    assert "streamer.echo (frames straight back, no model) is a configuration of a single " \
        "server: leave out --ray" in capsys.readouterr().err
    # --workers-per-gpu: only with --ray, at least 1 (from the flag or the config)
    assert main(["serve", str(tmp_path), "--workers-per-gpu", "2"]) == 1
    assert "--workers-per-gpu needs --ray (a single server is one process)" in \
        capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--ray", "local", "--workers-per-gpu", "0"]) == 1
    assert "--workers-per-gpu must be at least 1, got 0" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--ray", "local", "--set",
                 "streamer.workers_per_gpu=-1"]) == 1
    assert "streamer.workers_per_gpu must be at least 1, got -1" in capsys.readouterr().err
    import ray

    assert not ray.is_initialized()


# ---- the 3-node cluster --------------------------------------------------------------------
class Cluster:
    """The test cluster and its front (a ClusterFront on 127.0.0.1 in a thread)."""

    def __init__(self, ray_cluster: Any, front: RunningServer) -> None:
        self.ray_cluster = ray_cluster
        self.front = front

    @property
    def ws_url(self) -> str:
        return self.front.ws_url

    @property
    def server(self) -> Any:
        return self.front.server

    def health(self) -> dict[str, Any]:
        return dict(self.server.health())

    def ready_workers(self) -> list[str]:
        return sorted(w.name for w in self.server.workers.values() if w.ready and w.alive)

    def metrics(self, token: str | None = TOKEN) -> tuple[int, str]:
        """(HTTP status, body) of /metrics (a plain blocking GET: callable in a loop)."""
        url = self.front.url.split("?")[0] + "metrics" + (f"?token={token}" if token else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of /metrics (None: absent)."""
        status, text = self.metrics()
        assert status == 200
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
            if not match or match[1] != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(match[3])
        return None

    def placed(self, client: DvpClient) -> str | None:
        assert client.hello is not None
        return self.server.placed_on(client.hello["session"])


@pytest.fixture(scope="module")
def cluster(target_dir: Path, dvp_home: Path) -> Iterator[Cluster]:
    import ray
    from ray.cluster_utils import Cluster as RayCluster

    from streamer.cluster.front import ClusterFront
    from streamer.webrtc.server import ServeOptions

    # the workers import the stand-in stages of the tests; DVP_HOME is already set
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _pythonpath()
    ray_cluster = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": STORE})
    front = None
    try:
        ray_cluster.add_node(num_cpus=1, resources={"dvp_worker": 1},
                             object_store_memory=STORE)
        ray.init(address=ray_cluster.address, configure_logging=False)
        config = load_config(None, [f"streamer.max_sessions={PER_WORKER}",
                                    "streamer.metrics_log_seconds=1"])
        front = serve_in_thread(lambda: ClusterFront(
            config, ServeOptions(host="127.0.0.1", port=0, token=TOKEN,
                                 max_sessions=FRONT_CAP),
            target_dir, device="cpu", stage_factory=stand_in_stages))
        handle = Cluster(ray_cluster, front)
        assert wait_for(lambda: handle.ready_workers() == ["w0"], 180), handle.health()
        # a node that joins the running cluster gets a worker too
        ray_cluster.add_node(num_cpus=1, resources={"dvp_worker": 1},
                             object_store_memory=STORE)
        assert wait_for(lambda: handle.ready_workers() == ["w0", "w1"], 180), handle.health()
        yield handle
    finally:
        if front is not None:
            stop_server(front)
        ray.shutdown()
        ray_cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def client(cluster: Cluster, flip: bool = False, mode: str = "full") -> DvpClient:
    def make(i: int) -> Any:
        frame = source_frame(i)
        return frame[..., ::-1] if flip else frame

    return DvpClient(cluster.ws_url, FrameSourceTrack(make, fps=15), mode=mode, token=TOKEN)


async def expect_busy(cluster: Cluster) -> None:
    late = DvpClient(cluster.ws_url, None, token=TOKEN)
    try:
        with pytest.raises(ClientError, match="server busy"):
            await late.connect()
    finally:
        await late.close()


async def wait_until(condition: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return bool(condition())


def test_sessions_spread_over_workers_and_the_cap_says_busy(
        cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamer.cluster")
    status, _ = cluster.metrics(token=None)
    assert status == 401
    bearer = urllib.request.Request(cluster.front.url.split("?")[0] + "metrics",
                                    headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(bearer, timeout=10) as reply:
        assert reply.status == 200 and b'dvp_workers 2.0' in reply.read()

    async def go() -> dict[str, Any]:
        a, b, c = client(cluster), client(cluster, flip=True, mode="dub"), client(cluster)
        async with a, b, c:
            placed = [cluster.placed(x) for x in (a, b, c)]
            await expect_busy(cluster)
            for x in (a, b, c):
                for _ in range(3):
                    await x.next_frame(60)
            # controls are checked at the front and reach the session on its worker
            await a.control(expression_gain=0.5)
            await a.control(expression_gain=9)
            await b.send({"type": "bogus"})
            assert await wait_until(lambda: all(
                any(m["type"] == "stats" for m in x.messages) for x in (a, b, c)))
            assert await wait_until(lambda: len(a.params) > 2 and len(b.params) > 2)
            sessions = {w: cluster.metric("dvp_sessions", worker=w) for w in ("w0", "w1")}
            frames = {w: cluster.metric("dvp_frames_total", worker=w) for w in ("w0", "w1")}
            latency = {w: cluster.metric("dvp_latency_ms", worker=w, quantile="0.95")
                       for w in ("w0", "w1")}
        return {"placed": placed, "a": a, "b": b, "sessions": sessions, "frames": frames,
                "latency": latency}

    out = asyncio.run(go())
    assert out["placed"] == ["w0", "w1", "w0"]
    assert out["sessions"] == {"w0": 2.0, "w1": 1.0}
    assert all(n is not None and n > 0 for n in out["frames"].values()), out["frames"]
    assert all(ms is not None and 0 < ms < 10_000 for ms in out["latency"].values()), \
        out["latency"]
    a, b = out["a"], out["b"]
    replies = [m for m in a.messages if m["type"] in ("state", "error")]
    assert replies[0]["type"] == "state" and replies[0]["controls"]["expression_gain"] == 0.5
    assert replies[1] == {"type": "error", "message":
                          "control 'expression_gain' must lie in [0, 3], got 9"}
    assert {"type": "error", "message": "unknown message type 'bogus' (expected offer, "
            "control or ping)"} in b.messages
    assert {p["mode"] for p in b.params} == {"dub"}
    # each session reads its own source: their yaws differ in sign
    assert a.params[-1]["rotation"][1] > 0 > b.params[-1]["rotation"][1]
    stats = next(m for m in a.messages if m["type"] == "stats")
    assert stats["processed"] >= 1 and set(stats["stage_ms"]) >= {"render", "generator"}
    assert cluster.metric("dvp_busy_total") == 1.0
    assert cluster.metric("dvp_workers") == 2.0
    # placement times are recorded (their figures: bench/cluster.py)
    placement = cluster.metric("dvp_placement_ms", quantile="1")
    assert placement is not None and placement > 0 and a.placement_s is not None
    # closed: nothing left on the front or the workers
    assert wait_for(lambda: not cluster.server.sessions, 10)
    assert wait_for(lambda: all(w.metrics.get("sessions") == 0
                                for w in cluster.server.workers.values()), 10)
    assert cluster.metric("dvp_sessions", worker="w0") == 0.0
    # the same figures in the log, once a second here (once a minute by default)
    assert wait_for(lambda: any(re.search(r"worker w1 \([\d.]+, cpu\): 0/2 sessions, "
                                          r"[\d.]+ fps, \d+ frames", r.getMessage())
                                for r in caplog.records), 5)


def test_a_killed_worker_is_told_to_its_client_and_a_reconnect_lands_elsewhere(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # no new worker on the dead one's node during the test (the front would start one)
    monkeypatch.setattr("streamer.cluster.front.RETRY_S", 600.0)
    pids = {w.name: w.info["pid"] for w in cluster.server.workers.values()}

    async def go() -> dict[str, Any]:
        a, b = client(cluster), client(cluster, flip=True)
        await a.start()
        await b.start()
        try:
            assert [cluster.placed(a), cluster.placed(b)] == ["w0", "w1"]
            await a.next_frame(60)
            await b.next_frame(60)
            killed = time.monotonic()
            os.kill(pids["w0"], signal.SIGKILL)
            assert await wait_until(lambda: a.error_at is not None, 10)
            assert a.error_at is not None
            told_s = a.error_at - killed
            error = next(m for m in a.messages if m["type"] == "error")
            assert await wait_until(lambda: a.ws is not None and a.ws.closed, 5)
            close_code = a.ws.close_code if a.ws is not None else None
            # the other worker's session goes on
            while not b.frames.empty():
                b.frames.get_nowait()
            await b.next_frame(30)
            # a reconnect is placed on a worker that is alive
            again = client(cluster)
            async with again:
                await again.next_frame(60)
                placed_again = cluster.placed(again)
                # w1 now holds two sessions, its capacity: the cluster is full
                await expect_busy(cluster)
                sessions_w1 = cluster.metric("dvp_sessions", worker="w1")
                health = cluster.health()
        finally:
            await a.close()
            await b.close()
        return {"told_s": told_s, "error": error, "code": close_code,
                "placed_again": placed_again, "sessions_w1": sessions_w1,
                "health": health}

    out = asyncio.run(go())
    assert out["told_s"] < 2.0, out["told_s"]
    assert out["error"] == {"type": "error", "message": "the worker of this session (w0) was "
                            "lost: its process ended; connect again for a new session"}
    assert out["code"] == 1011
    assert out["placed_again"] == "w1"
    assert out["sessions_w1"] == 2.0
    assert out["health"]["sessions"] == 2 and out["health"]["max_sessions"] == 2
    assert cluster.metric("dvp_workers_lost_total") == 1.0
    assert cluster.metric("dvp_sessions", worker="w0") is None
    assert cluster.metric("dvp_workers") == 1.0
