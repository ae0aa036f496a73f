"""The system around the model, one subpackage per concern.

- `cli`: the `dvp` command line (`cli.main`), its commands (`cli.commands`) and the
  combined configuration (`cli.config`).
- `video`: video files in and out (`video.io`), the visible "synthetic" mark, the frame-id
  stamp used to measure latency.
- `jobs`: batch work over whole videos: tracking a video, `dvp reenact`, `dvp demo`.
- `live`: the live engine: a loaded target, per-session stages, the worker, controls.
- `webrtc`: the server (`dvp serve`), its web page, media tracks, the Python client.
- `vmc`: the VMC/OSC parameter feed for avatar software.
"""
