"""WebRTC: the live server (`dvp serve`), its web page, media tracks and a Python client.

Importing this package applies the project's changes to aiortc once (low-latency frame
assembly on every video receiver, the project's video encoders): see `aiortc_patch`.
"""

from streamer.webrtc import aiortc_patch

aiortc_patch.install()
