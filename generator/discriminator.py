"""Conditional PatchGAN discriminators: pix2pix's 70 x 70 one, and pix2pixHD's multi-scale set.

Each judges an image together with the conditioning it should follow: the current frame's
nine conditioning channels (the last nine of the window) beside the RGB image.
`make_discriminator(ndf, scales)` gives the paper's single `PatchDiscriminator` for
`scales == 1` (its checkpoints stay as they were) and a `MultiScaleDiscriminator` otherwise.
Both return, per scale, the list of every block's activation with the logits last
(`features`), which the adversarial loss (logits) and pix2pixHD's feature-matching loss
(the rest) read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def features(self, conditioning: torch.Tensor,
                 image: torch.Tensor) -> list[list[torch.Tensor]]:
        """One scale: the four blocks' activations, then the logits (as `forward`'s)."""
        x = torch.cat([conditioning, image], dim=1)
        out = []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return [[*out, x]]

    def shape(self) -> dict[str, int]:
        """The hyper-parameters that fix the weight shapes (stored in checkpoints)."""
        return {"ndf": self.ndf}


class MultiScaleDiscriminator(nn.Module):
    """pix2pixHD's discriminator: `scales` PatchDiscriminators, the k-th on the pair
    downsampled k times by 3 x 3 average pooling of stride 2 (padding not counted).

    Coarser scales see more of the face at once (global structure); the finest sees
    texture. `features` returns one list per scale, finest first.
    """

    def __init__(self, ndf: int = 64, scales: int = 2) -> None:
        super().__init__()
        self.ndf, self.scales = ndf, scales
        self.nets = nn.ModuleList(PatchDiscriminator(ndf) for _ in range(scales))

    def features(self, conditioning: torch.Tensor,
                 image: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for k, net in enumerate(self.nets):
            if k:
                conditioning, image = (F.avg_pool2d(t, 3, 2, 1, count_include_pad=False)
                                       for t in (conditioning, image))
            out += net.features(conditioning, image)
        return out

    def forward(self, conditioning: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The finest scale's logits (the others through `features`)."""
        return self.nets[0](conditioning, image)

    def shape(self) -> dict[str, int]:
        return {"ndf": self.ndf, "scales": self.scales}


def make_discriminator(ndf: int, scales: int = 1) -> PatchDiscriminator | MultiScaleDiscriminator:
    """The paper's PatchDiscriminator for `scales == 1`, else a MultiScaleDiscriminator."""
    if scales < 1:
        raise ValueError(f"generator.d_scales must be at least 1, got {scales}")
    return PatchDiscriminator(ndf) if scales == 1 else MultiScaleDiscriminator(ndf, scales)
