"""Sample grids of held-out frames: conditioning colour | network output | ground truth."""

from __future__ import annotations

import numpy as np
import torch

from generator.dataset import WindowDataset
from generator.unet import FRAME_CHANNELS, UNet


def to_uint8_image(image: torch.Tensor) -> torch.Tensor:
    """Network output `[B, 3, S, S]` in [-1, 1] -> `[B, S, S, 3]` uint8 RGB (same device)."""
    rgb = ((image.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def sample_grid(model: UNet, heldout: WindowDataset, positions: np.ndarray,
                device: torch.device) -> tuple[np.ndarray, float]:
    """A grid `[K*S, 3*S, 3]` uint8 of K held-out frames and their mean L1 (RGB in [0, 1]).

    Row k shows frame `positions[k]` of `heldout`: the current frame's colour rendering, the
    output of `model` (eval mode for the call, restored after), the ground truth.
    """
    was_training = model.training
    model.eval()
    windows, truth = heldout.batch(positions)
    out = model(windows.to(device)).float().cpu()
    model.train(was_training)
    windows, truth = windows.cpu(), truth.cpu()
    colour = windows[:, -FRAME_CHANNELS:-FRAME_CHANNELS + 3]  # K,3,S,S in [0,1]
    l1 = float((out - truth).abs().mean() / 2.0)  # [-1,1] -> [0,1] scale
    columns = [to_uint8_image(colour * 2.0 - 1.0), to_uint8_image(out), to_uint8_image(truth)]
    rows = torch.cat(columns, dim=2)  # K,S,3S,3
    return rows.reshape(-1, *rows.shape[2:]).numpy(), l1
