"""The front's figures: `/metrics` in Prometheus' text format and the same numbers in the
log once a minute (`streamer.metrics_log_seconds`).

Per worker (label `worker`, the front's name for it: `w0`, `w1`, ...), from the worker's
last poll (streamer.cluster.worker.ClusterWorker.metrics):

| family | type | what |
| --- | --- | --- |
| `dvp_sessions` | gauge | sessions placed on the worker (open, or connected and not yet offered) |
| `dvp_capacity` | gauge | sessions the worker's engine runs at once |
| `dvp_frames_total` | counter | reenacted frames handed to the video senders since the worker started |
| `dvp_fps` | gauge | output frames per second, summed over the worker's sessions |
| `dvp_latency_ms` | gauge, label `quantile` 0.5 / 0.95 | server-side ms, a decoded frame handed to the engine -> its output handed to the video sender (each session's last 300 frames) |
| `dvp_errors_total` | counter | frames that failed and sessions that could not start |
| `dvp_worker_info` | gauge (1) | labels `host`, `device`, `pid` (of its process) |

For the whole front: `dvp_workers` (ready workers), `dvp_workers_starting`,
`dvp_workers_lost_total` (workers that died or stopped answering), `dvp_busy_total`
(connections answered `busy`), `dvp_placement_ms` (gauge, `quantile` 0.5 / 0.95 / 1: ms
from an offer reaching the front to its answer going out, last 1,000 sessions).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from streamer.cluster.front import ClusterFront

#: The content type of `/metrics` (Prometheus' text format).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FrontCollector(Collector):
    """Reads the front's workers and counters at each scrape."""

    def __init__(self, front: ClusterFront) -> None:
        self.front = front

    def collect(self) -> Iterator[Metric]:
        front = self.front
        workers = [w for w in front.workers.values() if w.ready]
        sessions = GaugeMetricFamily("dvp_sessions", "sessions placed on the worker",
                                     labels=["worker"])
        capacity = GaugeMetricFamily("dvp_capacity", "sessions the worker runs at once",
                                     labels=["worker"])
        frames = CounterMetricFamily("dvp_frames", "reenacted frames sent by the worker",
                                     labels=["worker"])
        fps = GaugeMetricFamily("dvp_fps", "output frames per second of the worker",
                                labels=["worker"])
        latency = GaugeMetricFamily(
            "dvp_latency_ms", "server-side ms, decoded frame to the video sender",
            labels=["worker", "quantile"])
        errors = CounterMetricFamily("dvp_errors", "failed frames and sessions",
                                     labels=["worker"])
        info = GaugeMetricFamily("dvp_worker_info", "where each worker runs",
                                 labels=["worker", "host", "device", "pid"])
        for w in workers:
            m = w.metrics
            sessions.add_metric([w.name], len(w.sessions))
            capacity.add_metric([w.name], w.capacity)
            frames.add_metric([w.name], m.get("frames_total", 0))
            fps.add_metric([w.name], m.get("fps", 0.0))
            for q, key in (("0.5", "p50"), ("0.95", "p95")):
                value = (m.get("latency_ms") or {}).get(key)
                latency.add_metric([w.name, q], float("nan") if value is None else value)
            errors.add_metric([w.name], m.get("errors_total", 0))
            info.add_metric([w.name, str(w.info.get("host", "")),
                             str(w.info.get("device", "")), str(w.info.get("pid", ""))], 1)
        yield from (sessions, capacity, frames, fps, latency, errors, info)
        yield GaugeMetricFamily("dvp_workers", "ready workers", value=len(workers))
        yield GaugeMetricFamily("dvp_workers_starting", "workers loading their target",
                                value=sum(1 for w in front.workers.values() if not w.ready))
        yield CounterMetricFamily("dvp_workers_lost", "workers that died or stopped answering",
                                  value=front.workers_lost)
        yield CounterMetricFamily("dvp_busy", "connections answered busy", value=front.busy)
        placement = GaugeMetricFamily("dvp_placement_ms", "offer at the front -> answer out",
                                      labels=["quantile"])
        for q, value in placement_quantiles(list(front.placement_ms)).items():
            placement.add_metric([q], value)
        yield placement


def placement_quantiles(ms: list[float]) -> dict[str, float]:
    """{"0.5", "0.95", "1"} of placement times in ms (NaN before any)."""
    if not ms:
        return {"0.5": float("nan"), "0.95": float("nan"), "1": float("nan")}
    a = np.asarray(ms, np.float64)
    return {"0.5": round(float(np.percentile(a, 50)), 2),
            "0.95": round(float(np.percentile(a, 95)), 2), "1": round(float(a.max()), 2)}


def exposition(front: ClusterFront) -> bytes:
    """The front's `/metrics` body."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FrontCollector(front))
    return generate_latest(registry)


def log_lines(front: ClusterFront) -> list[str]:
    """The same numbers as `/metrics`, one line per worker and one for the front."""
    lines = []
    for w in front.workers.values():
        if not w.ready:
            lines.append(f"worker {w.name}: starting on node {w.node_id[:8]}")
            continue
        m = w.metrics
        lat: dict[str, Any] = m.get("latency_ms") or {}
        lines.append(
            f"worker {w.name} ({w.info.get('host')}, {w.info.get('device')}): "
            f"{len(w.sessions)}/{w.capacity} sessions, {m.get('fps', 0.0):.1f} fps, "
            f"{m.get('frames_total', 0)} frames, latency p50 {lat.get('p50')} ms "
            f"p95 {lat.get('p95')} ms, {m.get('errors_total', 0)} errors")
    place = placement_quantiles(list(front.placement_ms))
    lines.append(f"front: {len(front.sessions)} sessions, "
                 f"{sum(1 for w in front.workers.values() if w.ready)} workers ready, "
                 f"{front.workers_lost} lost, {front.busy} busy answers, placement p50 "
                 f"{place['0.5']} ms p95 {place['0.95']} ms")
    return lines
