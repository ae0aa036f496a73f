"""`dvp reenact` (offline, from a video file) and `dvp serve` (live, WebRTC)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path

from streamer.cli.config import Config
from streamer.cli.messages import add_strict, command_device, warn
from streamer.live.controls import MODES
from streamer.live.process import apply_process_settings
from tracker.errors import DvpError
from tracker.ranges import RANGE_SETTINGS

log = logging.getLogger(__name__)


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="TDIR", help="target directory (made by 'dvp prepare' "
                   "and trained by 'dvp train')")
    p.add_argument("--range", choices=RANGE_SETTINGS, default=None,
                   help="adapt: fit the source's motion into the target's observed range of "
                        "head poses, narrow expressions and gaze (scaled per axis, softly "
                        "limited at the target's extremes); raw: as tracked (default: "
                        "transfer.range, adapt)")


def _apply_range(args: argparse.Namespace, config: Config) -> Config:
    """`--range` (when given) over the config's transfer.range."""
    value = getattr(args, "range", None)
    if value is not None:
        config = replace(config, transfer=replace(config.transfer, range=value))
    return config


# ---- dvp reenact ---------------------------------------------------------------------------
def _add_reenact(p: argparse.ArgumentParser) -> None:
    _add_target(p)
    p.add_argument("--source", required=True, metavar="SRC",
                   help="video of the person who drives the target (its audio is kept)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.mp4", help="output video")
    p.add_argument("--mode", default="full", choices=MODES,
                   help="what is transferred: full (pose, expression, gaze, blinks), face "
                        "(expression only), gaze, dub (mouth and jaw), edit (default: full)")
    layout = p.add_mutually_exclusive_group()
    layout.add_argument("--side-by-side", action="store_true",
                        help="write source | conditioning | output side by side")
    layout.add_argument("--full-frame", action="store_true",
                        help="paste the portrait back into the target's own full video "
                             "(source_video of target.yaml, checked by its sha256)")
    p.add_argument("--report", type=Path, metavar="REPORT.json",
                   help="track the generated frames again and write how they compare with "
                        "the requested parameters (JSON: requested_in_range, "
                        "retracked_in_range, faces_found, rotation_error_deg_median, "
                        "jaw_open_corr, eye_blink_corr, range)")
    add_strict(p)


def _reenact(args: argparse.Namespace, config: Config) -> int:
    from streamer.jobs.reenact import reenact_video
    from streamer.jobs.retrack import RetrackReport, write_report
    from streamer.live.stages import LoadedTarget
    from streamer.video.io import probe

    source, output = Path(args.source), Path(args.output)
    config = _apply_range(args, config)
    probe(source)  # a missing or broken source fails before the target loads
    apply_process_settings(config)
    device = command_device(args.device)
    target = LoadedTarget(args.target, config, device)
    # on the CPU: the device stays the reenactment's (and no fit graph is captured there)
    report = RetrackReport(target, config) if args.report else None
    try:
        summary = reenact_video(target, source, output, config, mode=args.mode,
                                side_by_side=args.side_by_side, full_frame=args.full_frame,
                                report=report, strict=args.strict)
    finally:
        if report is not None:
            report.close()
    log.info("%s frames/s; per-stage ms per frame: %s", summary["frames_per_second"],
             summary["stage_ms"])
    if summary["warning"]:
        warn(summary["warning"])
    if args.report:
        write_report(args.report, summary["retrack"])
        log.info("re-tracking report: %s", summary["retrack"])
    print(output)
    return 0


# ---- dvp serve -----------------------------------------------------------------------------
def _add_serve(p: argparse.ArgumentParser) -> None:
    _add_target(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another host needs --token, "
                        "and browsers give the webcam only over TLS or on localhost)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free)")
    p.add_argument("--cert", type=Path, metavar="C", help="TLS certificate (PEM), with --key")
    p.add_argument("--key", type=Path, metavar="K", help="TLS private key (PEM), with --cert")
    p.add_argument("--token", metavar="T",
                   help="clients must connect to /ws?token=T (required off loopback)")
    p.add_argument("--max-sessions", type=int, metavar="N",
                   help="live sessions at once; more get 'busy' (default: streamer.max_sessions; "
                        "0 there: as many as the GPU holds at the target's size, at most 2 "
                        "per process (more per GPU: --ray local --workers-per-gpu K), 2 on "
                        "the CPU)")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for the peer connections, e.g. "
                        "stun:stun.example.org:3478 or turn:USER:PASS@turn.example.org:3478 "
                        "(repeatable; also from --ice-server-file and $DVP_ICE_SERVERS, which "
                        "keep TURN passwords out of the process list)")
    p.add_argument("--ice-server-file", type=Path, metavar="FILE",
                   help="STUN/TURN URLs, one per line ('#' starts a comment)")
    p.add_argument("--ice-address", action="append", default=[], metavar="ADDR",
                   help="gather ICE host candidates on this local address only (repeatable; "
                        "default: 127.0.0.1 when --host is loopback, else every interface)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages of this origin (scheme://host[:port]) open the WebSocket, "
                        "besides the server's own page (repeatable)")
    p.add_argument("--vmc", metavar="HOST:PORT",
                   help="also send each frame's blendshapes and head pose to a VMC-protocol "
                        "receiver (OSC over UDP), e.g. 127.0.0.1:39539")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="be the front door of a Ray cluster: each session runs on a worker "
                        "(one per GPU, one per 'dvp_worker' resource on CPU nodes) that holds "
                        "its peer connection; ADDRESS: the cluster's (HOST:6379 or auto), or "
                        "'local' to start one on this machine. --max-sessions then caps the "
                        "whole cluster; each worker runs streamer.max_sessions (0: as many "
                        "as its GPU holds)")
    p.add_argument("--workers-per-gpu", type=int, metavar="K",
                   help="with --ray: K worker processes share each GPU (each its own engine, "
                        "its own sessions, 1/K of the GPU and its share of the host's cores), "
                        "to spread the per-session CPU work (landmarks, fit, video decode and "
                        "encode) over K processes instead of one interpreter lock; with "
                        "--ray local --device cpu: K CPU workers (default: "
                        "streamer.workers_per_gpu, 1)")


def _serve(args: argparse.Namespace, config: Config) -> int:
    from streamer.live.engine import LiveEngine
    from streamer.live.stages import LoadedTarget, make_session_stages
    from streamer.vmc.feed import parse_address
    from streamer.webrtc.security import ice_server_urls
    from streamer.webrtc.server import DvpServer, ServeOptions

    if args.max_sessions is not None and args.max_sessions < 1:  # 0 is the config's "auto"
        raise DvpError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    requested = args.max_sessions or config.streamer.max_sessions  # 0: what the GPU holds
    try:
        ice_servers = ice_server_urls(args.ice_server, args.ice_server_file)
    except OSError as err:
        raise DvpError(f"--ice-server-file: cannot read {args.ice_server_file}: "
                       f"{err.strerror or err}") from None
    options = ServeOptions(
        host=args.host, port=args.port, cert=args.cert, key=args.key, token=args.token,
        max_sessions=requested or 1, ice_servers=ice_servers,
        vmc=parse_address(args.vmc) if args.vmc else None,
        allow_origins=list(args.allow_origin), ice_addresses=list(args.ice_address))
    options.check()  # bad options fail before the target loads
    config = _apply_range(args, config)
    config = _apply_workers_per_gpu(args, config)
    if getattr(args, "ray", None):  # `dvp demo --serve` has no --ray
        return _serve_cluster(args, config, options)
    apply_process_settings(config)
    target = LoadedTarget(args.target, config, command_device(args.device))
    if config.streamer.echo:  # the echo configuration: no stage, no engine
        server = DvpServer(target, config, options)
        return asyncio.run(_run_server(server))
    # make one session's stages now, so a missing or broken stage stops the server here
    probe = make_session_stages(target, config, monitor=False)
    try:
        # every CUDA graph of the engine is captured here, before any session runs
        engine = LiveEngine(target, config, requested or None)
        engine.report(probe)
    finally:
        probe.close()
    options.max_sessions = engine.max_sessions
    server = DvpServer(target, config, options, engine=engine)
    return asyncio.run(_run_server(server))


def _apply_workers_per_gpu(args: argparse.Namespace, config: Config) -> Config:
    """`--workers-per-gpu K` (when given) over streamer.workers_per_gpu; K < 1, or the flag
    without --ray, is an error."""
    value = getattr(args, "workers_per_gpu", None)
    if value is None:
        return config
    if value < 1:
        raise DvpError(f"--workers-per-gpu must be at least 1, got {value}")
    if not getattr(args, "ray", None):
        raise DvpError("--workers-per-gpu needs --ray (a single server is one process)")
    return replace(config, streamer=replace(config.streamer, workers_per_gpu=value))


def _serve_cluster(args: argparse.Namespace, config: Config, options: object) -> int:
    """`dvp serve TDIR --ray ADDRESS`: the front door; the workers on the cluster load the
    target (streamer.cluster)."""
    from generator.target import TargetDir
    from streamer.cluster.front import UNCAPPED, ClusterFront, workers_per_gpu
    from streamer.cluster.launch import connect
    from streamer.webrtc.server import ServeOptions

    assert isinstance(options, ServeOptions)
    if config.streamer.echo:
        raise DvpError("streamer.echo (frames straight back, no model) is a configuration of "
                       "a single server: leave out --ray")
    if options.ice_addresses:
        raise DvpError("--ice-address is for a single server: under --ray the front holds no "
                       "media and each worker offers its own host's addresses")
    per_gpu = workers_per_gpu(config)
    TargetDir(args.target)  # a bad target directory fails here, before Ray starts
    # workers joining, lost, and their figures once a minute show at the default level
    cluster_log = logging.getLogger("streamer.cluster")
    cluster_log.setLevel(min(cluster_log.getEffectiveLevel(), logging.INFO))
    options.max_sessions = args.max_sessions or UNCAPPED
    disconnect = connect(args.ray, args.device, per_gpu)
    try:
        front = ClusterFront(config, options, args.target, device=args.device)
        return asyncio.run(_run_server(front))
    finally:
        disconnect()


async def _run_server(server: object) -> int:
    from streamer.webrtc.server import SignalServer

    assert isinstance(server, SignalServer)
    url = await server.start()
    print(url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / not POSIX
            pass
    try:
        await stop.wait()
    finally:
        log.info("shutting down: closing %d session(s)", len(server.sessions))
        await server.close()
    return 0


COMMANDS = {
    "reenact": ("reenact a target with the face of a source video (offline)", True,
                _add_reenact, _reenact),
    "serve": ("serve the live web page: your webcam drives the target (WebRTC)", True,
              _add_serve, _serve),
}
