"""The conditional PatchGAN discriminator (pix2pix's 70 x 70 receptive field).

It judges an image together with the conditioning it should follow: the current frame's
nine conditioning channels (the last nine of the window) beside the RGB image.
"""

from __future__ import annotations

import torch
from torch import nn

from generator.unet import FRAME_CHANNELS


class PatchDiscriminator(nn.Module):
    """(conditioning `[B, 9, S, S]` in [0, 1], image `[B, 3, S, S]` in [-1, 1]) -> logits.

    The logits map is `[B, 1, S/8 - 2, S/8 - 2]` (30 x 30 at 256 px): one real/fake logit per
    70 x 70 patch. Widths `ndf, 2ndf, 4ndf, 8ndf`; BatchNorm after all but the first
    convolution, LeakyReLU(0.2).
    """

    def __init__(self, ndf: int = 64) -> None:
        super().__init__()
        self.ndf = ndf
        layers: list[nn.Module] = [
            nn.Conv2d(FRAME_CHANNELS + 3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)
        ]
        widths = [ndf, 2 * ndf, 4 * ndf, 8 * ndf]
        for i in range(1, 4):
            stride = 2 if i < 3 else 1
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1, bias=False),
                       nn.BatchNorm2d(widths[i]), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[3], 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, conditioning: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Logits `[B, 1, h, w]` (real > 0) for `image` given the current frame's conditioning."""
        return self.net(torch.cat([conditioning, image], dim=1))

    def shape(self) -> dict[str, int]:
        """The hyper-parameters that fix the weight shapes (stored in checkpoints)."""
        return {"ndf": self.ndf}
