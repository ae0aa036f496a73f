"""Video files in and out, the visible "synthetic" mark and the latency stamp."""
