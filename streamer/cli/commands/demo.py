"""`dvp demo [-o DIR] [--device D] [--serve]`: the embedded default, end to end.

Two synthetic actors, the target prepared and trained (`tiny` on the CPU, `paper` on a GPU),
the source reenacting it: `DIR/out.mp4` (source | conditioning | output) and
`DIR/report.json` (streamer.jobs.demo). A second run reuses what the first made. With `--serve`
the live server then runs on the demo's target (the code path of `dvp serve`).

Settings: `--demo-config FILE` (default configs/demo.yaml: its `demo` section and stage
sections), then `--config FILE` and `--set section.key=value` over it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from streamer.cli.config import Config

log = logging.getLogger(__name__)


def _add(p: argparse.ArgumentParser) -> None:
    from streamer.jobs.demo import DEMO_CONFIG

    p.add_argument("-o", "--output", default="demo", metavar="DIR",
                   help="output directory: new, empty, or made by an earlier 'dvp demo' "
                        "(its outputs are reused) (default: ./demo)")
    p.add_argument("--demo-config", default=str(DEMO_CONFIG), metavar="FILE",
                   help="the demo's settings (section 'demo': actors, frames, size, preset "
                        "and steps) and stage settings (default: configs/demo.yaml)")
    p.add_argument("--serve", action="store_true",
                   help="then serve the live web page on the demo's target (as 'dvp serve')")
    p.add_argument("--host", default="127.0.0.1",
                   help="with --serve: address to listen on (default 127.0.0.1; another "
                        "host needs --token)")
    p.add_argument("--port", type=int, default=8080,
                   help="with --serve: port (default 8080; 0: any free)")
    p.add_argument("--token", metavar="T",
                   help="with --serve: clients must connect to /ws?token=T")


def _demo(args: argparse.Namespace, config: Config) -> int:
    from streamer.cli.commands.live import _serve
    from streamer.cli.messages import command_device
    from streamer.jobs.demo import load_demo_config, run_demo
    from streamer.live.process import apply_process_settings

    config, settings = load_demo_config(args.demo_config, args.config, args.overrides)
    settings.check()
    device = command_device(args.device)
    apply_process_settings(config)
    out = Path(args.output)
    report = run_demo(out, config, settings, device)
    held = report["heldout"]
    log.info("held-out: %s", json.dumps(held))
    print(out / "out.mp4")
    print(out / "report.json", flush=True)
    if not args.serve:
        return 0
    serve_args = argparse.Namespace(
        target=str(out / report["outputs"]["target"]), host=args.host, port=args.port,
        cert=None, key=None, token=args.token, max_sessions=None, ice_server=[], vmc=None,
        ice_server_file=None, ice_address=[], allow_origin=[], device=args.device)
    return _serve(serve_args, config)


COMMANDS = {
    "demo": (("the whole system end to end on synthetic actors: prepare, train, reenact "
              "(out.mp4, report.json); --serve then runs the live server"), True, _add, _demo),
}
