"""Glass-to-glass latency as a browser sees it: headless Chromium drives `dvp serve`'s page.

    python bench/browser_latency.py [--seconds N] [--fps F] [--loss P] [--tracking real|sway]

The page is the product's own (streamer/webrtc/web: its WebRTC set-up, its
`jitterBufferTarget = 0`); bench/browser_latency.js, injected before it runs, makes its
webcam a canvas stream showing frames of a real face video (shared/media/
franck_talking_200s.webm, looped) with the frame id stamped into the pixels, and reads the
stamp back from every frame of the remote video that is presented
(requestVideoFrameCallback): latency = the frame's presentation time (handed to the
compositor: the last moment a page can observe) minus the moment its source was drawn on
the canvas (one clock, the page's). The wait for the next screen refresh after that is
reported beside it (`present_to_display_ms`), not added.

One run measures, one after the other, each with its own server (bench/latency.py's server
child: DvpServer in a process of its own, as `dvp serve` runs it):

- `browser_echo`: the page against `dvp serve`'s echo configuration (`streamer.echo`: the
  server sends each received frame back through the same transport path, no model);
- `browser_model`: the page against the throwaway untrained `tiny` target (`--size`);
- `python_model` and `python_echo`: bench/latency.py's Python client (aiortc, the project's
  receivers) against the same two configurations (its frames: the same face video).

For each: frames, latency p50/p95/max (ms), fps, the longest gap between frames whose stamp
read back (a freeze), unreadable frames, and a per-hop budget (ms): encode and pacer
(browser), assemble, decode, model, encode back (server: bench/hops.py, and its `stats`),
jitter buffer (first packet to decodable) and decode (browser), and the rest of the p50
(capture, the network both ways, thread hand-overs, decoder to compositor); drawn to
received and received to presented (requestVideoFrameCallback); the browser's WebRTC
figures over the measured window (freezes, NACK, PLI, packets lost, resolution changes).
`--loss P` drops that fraction of RTP/RTCP packets in and out of the server in every run.
Prints JSON with the machine, Chromium's version and the device.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import chromium
from bench.latency import Server, build_target, load_source, run_clients, with_encoder
from bench.media import find_media

DEFAULT_SOURCE = find_media("franck_talking_200s.webm")
SCRIPT = Path(__file__).with_suffix(".js")


def jpegs(frames: list[np.ndarray]) -> list[str]:
    import cv2

    out = []
    for rgb in frames:
        ok, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        assert ok
        out.append(base64.b64encode(data.tobytes()).decode())
    return out


def _delta(after: dict[str, Any] | None, before: dict[str, Any] | None, key: str) -> float:
    if not after or key not in after:
        return 0.0
    return float(after[key]) - float((before or {}).get(key, 0.0))


def _ratio_ms(after: Any, before: Any, total: str, count: str) -> float | None:
    n = _delta(after, before, count)
    return round(1000.0 * _delta(after, before, total) / n, 2) if n > 0 else None


def browser_run(args: argparse.Namespace, url: str, frames_b64: list[str], size: tuple[int, int],
                profile: Path) -> dict[str, Any]:
    """Open the page in Chromium, feed it, measure for args.seconds after args.warmup."""
    from websockets.sync.client import connect

    proc, port = chromium.launch(profile, "about:blank")
    try:
        with connect(chromium.page_socket(port, "about:blank"), max_size=None,
                     open_timeout=10) as ws:
            devtools = chromium.DevTools(ws)
            devtools.call("Page.enable")
            devtools.call("Page.addScriptToEvaluateOnNewDocument", source=SCRIPT.read_text())
            devtools.call("Page.navigate", url=url + "?autostart=1")
            deadline = time.monotonic() + 30
            while not devtools.evaluate("!!(window.__bench && window.dvp)"):
                if time.monotonic() > deadline:
                    raise TimeoutError("the page did not load in 30 s")
                time.sleep(0.2)
            width, height = size
            loaded = devtools.evaluate(
                f"__bench.load({json.dumps(frames_b64)}, {width}, {height}, {args.fps})",
                timeout=120)
            devtools.evaluate("__bench.watch(); true")
            deadline = time.monotonic() + 120
            while devtools.evaluate("__bench.results.length") < 3:
                state = devtools.evaluate("({state: dvp.state, error: dvp.error})")
                if state["error"]:
                    raise RuntimeError(f"page error: {state['error']}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no stamped frame came back in 120 s: {state}")
                time.sleep(0.5)
            time.sleep(args.warmup)
            before = devtools.evaluate("__bench.stats()")
            start = devtools.evaluate("(__bench.results = [], __bench.unreadable = 0, "
                                      "__bench.stale = 0, "
                                      "{now: performance.now(), sent: __bench.sent})")
            time.sleep(args.seconds)
            after = devtools.evaluate("__bench.stats()")
            got = devtools.evaluate("({results: __bench.results, unreadable: "
                                    "__bench.unreadable, stale: __bench.stale, "
                                    "sent: __bench.sent, "
                                    "target: dvp.jitterBufferTarget, state: dvp.state, "
                                    "stats: dvp.lastStats})")
            devtools.evaluate("__bench.running = false; true")
    finally:
        chromium.stop(proc)
    return summarise(got, start, before, after, loaded, args.seconds)


def summarise(got: dict[str, Any], start: dict[str, Any], before: dict[str, Any],
              after: dict[str, Any], loaded: int, seconds: float) -> dict[str, Any]:
    rows = np.array([[np.nan if v is None else v for v in row] for row in got["results"]],
                    np.float64).reshape(-1, 6)
    drawn, receive, present, display = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    widths = sorted({int(w) for w in rows[:, 5]})
    out: dict[str, Any] = {"frames_drawn": int(got["sent"] - start["sent"]),
                           "frames_shown": len(rows), "unreadable_stamps": got["unreadable"],
                           "stale_stamps": got["stale"], "widths_shown": widths,
                           "face_frames_looped": loaded,
                           "jitter_buffer_target": got["target"], "page_state": got["state"],
                           "server_stats": got["stats"]}
    if len(rows) < 2:
        out["note"] = "fewer than two stamped frames came back"
        return out
    glass = present - drawn

    def pct(values: np.ndarray) -> dict[str, float] | None:
        values = values[np.isfinite(values)]
        if not values.size:
            return None
        return {"p50": round(float(np.percentile(values, 50)), 1),
                "p95": round(float(np.percentile(values, 95)), 1),
                "max": round(float(values.max()), 1)}

    out["latency_ms"] = pct(glass)  # glass to glass: drawn -> handed to the compositor
    out["drawn_to_receive_ms"] = pct(receive - drawn)
    out["receive_to_present_ms"] = pct(present - receive)
    # the wait for the screen after that (a vsync estimate; 0 where Chromium's estimate
    # lies before the presentation, as headless Chromium's can)
    out["present_to_display_ms"] = pct(np.maximum(display - present, 0.0))
    out["sustained_fps"] = round(float((len(rows) - 1) / ((present[-1] - present[0]) / 1e3)), 2)
    out["longest_gap_ms"] = round(float(np.diff(present).max()), 1)
    inbound_a, inbound_b = (after or {}).get("inbound"), (before or {}).get("inbound")
    outbound_a, outbound_b = (after or {}).get("outbound"), (before or {}).get("outbound")
    out["browser"] = {
        "encode_ms": _ratio_ms(outbound_a, outbound_b, "totalEncodeTime", "framesEncoded"),
        "pacer_ms": _ratio_ms(outbound_a, outbound_b, "totalPacketSendDelay", "packetsSent"),
        "jitter_buffer_ms": _ratio_ms(inbound_a, inbound_b, "jitterBufferDelay",
                                      "jitterBufferEmittedCount"),
        "decode_ms": _ratio_ms(inbound_a, inbound_b, "totalDecodeTime", "framesDecoded"),
        "processing_ms": _ratio_ms(inbound_a, inbound_b, "totalProcessingDelay",
                                   "framesDecoded"),
        "freezes": int(_delta(inbound_a, inbound_b, "freezeCount")),
        "freezes_s": round(_delta(inbound_a, inbound_b, "totalFreezesDuration"), 3),
        "frames_dropped": int(_delta(inbound_a, inbound_b, "framesDropped")),
        "packets_lost": int(_delta(inbound_a, inbound_b, "packetsLost")),
        "nack_sent": int(_delta(inbound_a, inbound_b, "nackCount")),
        "pli_sent": int(_delta(inbound_a, inbound_b, "pliCount")),
        "nack_received": int(_delta(outbound_a, outbound_b, "nackCount")),
        "pli_received": int(_delta(outbound_a, outbound_b, "pliCount")),
        "rtt_ms": (after or {}).get("rtt_ms"),
        "sent": {k: (outbound_a or {}).get(k) for k in (
            "frameWidth", "frameHeight", "encoderImplementation", "qualityLimitationReason",
            "qualityLimitationResolutionChanges")},
        "received": {k: (inbound_a or {}).get(k) for k in ("frameWidth", "frameHeight",
                                                             "decoderImplementation")},
    }
    return out


def browser_budget(run: dict[str, Any], server: dict[str, Any], model_ms: float | None
                   ) -> dict[str, Any]:
    """Per hop, ms: the browser's own figures where it has them, the server's from
    bench/hops.py; `capture_send_and_queues` is the rest of the p50."""
    b = run.get("browser", {})
    hops = {
        "encode": b.get("encode_ms"),
        "pacer": b.get("pacer_ms"),
        "assemble": server.get("assemble_ms"),
        "decode": server.get("decode_ms"),
        "model": model_ms,
        "encode_back": server.get("encode_ms"),
        "jitter_buffer_back": b.get("jitter_buffer_ms"),
        "decode_back": b.get("decode_ms"),
    }
    total = (run.get("latency_ms") or {}).get("p50")
    measured = sum(v for v in hops.values() if v is not None)
    rest = round(total - measured, 2) if total is not None else None
    return {**hops, "capture_send_and_queues": rest, "total_p50": total}


def measure_browser(args: argparse.Namespace, target: str, echo: bool, frames_b64: list[str],
                    size: tuple[int, int], tmp: Path) -> dict[str, Any]:
    server = Server(args, target, echo, 1)
    try:
        server.figures()
        profile = tmp / ("profile-echo" if echo else "profile-model")
        profile.mkdir()
        run = browser_run(args, server.url.split("?")[0], frames_b64, size, profile)
        ended = server.figures()
    finally:
        server.close()
    far = ended.get("hops") or {}
    stats = run.pop("server_stats", None) or {}
    # model: the server's decoded frame -> output frame p50 (its `stats` message to the page)
    model = 0.0 if echo else (stats.get("server_ms") or {}).get("p50")
    run["budget_ms"] = browser_budget(run, far, model)
    run["server"] = {**server.info, "stage_ms": stats.get("stage_ms"),
                     "server_ms": stats.get("server_ms")}
    run["server_transport"] = far
    if ended.get("loss"):
        run["loss"] = ended["loss"]
    return run


def python_run(args: argparse.Namespace, target: str, echo: bool) -> dict[str, Any]:
    """bench/latency.py's Python client (a process of its own) against a server child."""
    server = Server(args, target, echo, 1)
    try:
        server.figures()
        run = run_clients(server.url, args, 1, args.seconds + args.warmup)[0]
        return with_encoder(run, server.figures(), echo=echo)
    finally:
        server.close()


def chromium_version() -> str | None:
    if chromium.CHROMIUM is None:
        return None
    done = subprocess.run([chromium.CHROMIUM, "--version"], check=False, capture_output=True,
                          text=True, timeout=30)
    return done.stdout.strip() or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds ignored first")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="face video")
    parser.add_argument("--width", type=int, default=360, help="canvas (webcam) width")
    parser.add_argument("--size", type=int, default=256, help="throwaway target's S")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="tiny",
                        help="throwaway target's network (untrained; default tiny)")
    parser.add_argument("--target", help="target directory (default: a throwaway one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tracking", choices=("real", "sway"), default="real")
    parser.add_argument("--loss", type=float, default=0.0, metavar="P",
                        help="fraction of RTP/RTCP packets the server drops in and out")
    parser.add_argument("--runs", default="browser_echo,browser_model,python_model,python_echo",
                        help="which runs, comma-separated")
    args = parser.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    known = {"browser_echo", "browser_model", "python_model", "python_echo"}
    if not set(runs) <= known:
        parser.error(f"--runs: unknown {sorted(set(runs) - known)}; known: {sorted(known)}")
    if chromium.CHROMIUM is None and any(r.startswith("browser") for r in runs):
        raise SystemExit("browser bench: Chromium is not installed (apt-get install chromium)")
    frames = load_source(Path(args.source), 90, args.width)
    size = (frames[0].shape[1], frames[0].shape[0])
    frames_b64 = jpegs(frames)
    result: dict[str, Any] = {
        "benchmark": "browser_latency",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "chromium": chromium_version(),
        "seconds": args.seconds, "warmup": args.warmup, "fps": args.fps, "loss": args.loss,
        "source": {"video": Path(args.source).name, "width": size[0], "height": size[1]},
        "target": args.target or f"throwaway untrained {args.preset} target at "
                                 f"{args.size} px",
        "tracking": args.tracking,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        target = args.target or str(build_target(tmp_path / "target", args.size,
                                                 args.preset))
        for name in runs:
            echo = name.endswith("echo")
            print(f"browser bench: {name} ...", file=sys.stderr, flush=True)
            if name.startswith("browser"):
                result[name] = measure_browser(args, target, echo, frames_b64, size, tmp_path)
            else:
                result[name] = python_run(args, target, echo)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
