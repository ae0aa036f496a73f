"""The `dvp` command line, config loading, video I/O, the live pipeline and WebRTC server."""
