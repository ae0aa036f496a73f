"""WebRTC: the live server (`dvp serve`), its web page, media tracks and a Python client."""
