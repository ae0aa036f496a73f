"""The live engine: a loaded target, per-session stages, the worker thread, controls."""
