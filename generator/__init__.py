"""Rendering-to-video network: target directory, training, inference runtimes, export."""
