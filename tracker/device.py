"""The one place that turns a user's device choice into a torch device, and counts the CPU
cores this process may use."""

from __future__ import annotations

import os

import torch

from tracker.choices import report_choice


def pick_device(name: str = "auto") -> torch.device:
    """Return the torch device for `name` ('auto', 'cpu', 'cuda' or 'cuda:N').

    'auto' is CUDA when a GPU is visible, else the CPU. Asking for CUDA on a machine without
    one is an error naming the request, never a silent fall back to the CPU.
    """
    if name == "auto":
        if torch.cuda.is_available():
            report_choice("device", "cuda", torch.cuda.get_device_name(0))
            return torch.device("cuda")
        report_choice("device", "cpu", "no CUDA GPU visible to torch, everything runs on the "
                      "CPU, slowly" if torch.version.cuda else "this torch is a CPU build: "
                      "install a CUDA build of torch to use a GPU")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{name}' was asked for but no CUDA GPU is available")
        return torch.device(name)
    raise ValueError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a cluster worker is pinned to its
    share of its host, `taskset` narrows it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
