"""The one place that turns a user's device choice into a torch device."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    """Return the torch device for `name` ('auto', 'cpu', 'cuda' or 'cuda:N').

    'auto' is CUDA when a GPU is visible, else the CPU. Asking for CUDA on a machine without
    one is an error naming the request, never a silent fall back to the CPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' was asked for but no CUDA GPU is available")
        return torch.device(name)
    raise ValueError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
