"""The rendering-to-video network of Deep Video Portraits: a U-Net on the space-time window.

Shape (Kim et al. 2018, section 5): the input is the window of N_w conditioning frames,
`[B, 9*N_w, S, S]` float in [0, 1]. The encoder has log2(S) blocks (8 at 256 px, one more at
512 px), each a 4x4 convolution of stride 2, normalisation and LeakyReLU(0.2), down to 1 x 1.
Each decoder block upsamples by a 4x4 transposed convolution of stride 2 (normalisation,
dropout 0.5 in the first three blocks while training, ReLU), then refines with a 3x3
convolution (normalisation, ReLU); its output is concatenated with the encoder features of
the same resolution (skip connection). A 3x3 convolution and tanh give RGB in [-1, 1].
Widths: `ngf * 2**level`, capped at `8 * ngf`. With `ngf = 64` this is 64.9 M parameters at
256 px and 79.8 M at 512 px.

Normalisation is BatchNorm, as in the paper (and pix2pix): in eval mode it is an affine map
that `fold_batchnorm` merges into the convolution before it, so the inference graphs (CUDA
graph, ONNX, TensorRT) pay nothing for it, where InstanceNorm would add two reductions per
layer at run time; InstanceNorm is also undefined on the 1 x 1 bottleneck, and it would
remove the frame-to-frame brightness that the conditioning does carry. The first encoder
block and the 1 x 1 bottleneck block have no normalisation (the first as in pix2pix; the
bottleneck because a batch of one has a single value per channel there).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

#: Channels per conditioning frame: colour RGB, correspondence XYZ, gaze RGB.
FRAME_CHANNELS = 9
#: Decoder blocks (innermost first) that use dropout while training.
DROPOUT_BLOCKS = 3


def levels_for(size: int) -> int:
    """Encoder blocks for an S x S input: log2(S), so the bottleneck is 1 x 1.

    Raises ValueError unless `size` is a power of two of at least 16.
    """
    if size < 16 or size & (size - 1):
        raise ValueError(f"generator size must be a power of two >= 16, got {size}")
    return int(math.log2(size))


def _down(cin: int, cout: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


#: Decoder upsampling: 'transpose' (the paper's 4x4 stride-2 transposed convolution) or
#: 'resize' (nearest-neighbour 2x, then a 3x3 convolution: Odena et al.'s resize-convolution,
#: which cannot draw the transposed convolution's checkerboard).
UPSAMPLING = ("transpose", "resize")


def _up(cin: int, cout: int, dropout: bool, upsample: str = "transpose") -> nn.Sequential:
    if upsample == "resize":
        layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv2d(cin, cout, 3, 1, 1, bias=False)]
    else:
        layers = [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)]
    layers.append(nn.BatchNorm2d(cout))
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers += [nn.ReLU(inplace=True),
               nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
               nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """The generator: window `[B, 9*n_w, S, S]` float32 in [0, 1] -> RGB `[B, 3, S, S]` in [-1, 1].

    `size` fixes the number of levels (log2(size)); the network only accepts S x S inputs.
    `upsample`: see UPSAMPLING. `input_skip`: the current frame's nine conditioning channels, at full resolution, go
    into the final convolution beside the decoder's features (the encoder's first block
    halves the resolution, so otherwise nothing at S x S sees the rendering's edges).
    """

    def __init__(self, size: int = 256, n_w: int = 11, ngf: int = 64,
                 upsample: str = "transpose", input_skip: bool = False) -> None:
        super().__init__()
        if upsample not in UPSAMPLING:
            raise ValueError(f"unknown upsampling '{upsample}': use {', '.join(UPSAMPLING)}")
        self.size = size
        self.n_w = n_w
        self.ngf = ngf
        self.upsample = upsample
        self.in_channels = FRAME_CHANNELS * n_w
        levels = levels_for(size)
        widths = [min(ngf * 2**i, ngf * 8) for i in range(levels)]
        self.down = nn.ModuleList(
            _down(self.in_channels if i == 0 else widths[i - 1], w, 0 < i < levels - 1)
            for i, w in enumerate(widths)
        )
        outs = widths[-2::-1] + [ngf]  # decoder block outputs, innermost first
        ins = [widths[-1]] + [o + widths[levels - 2 - j] for j, o in enumerate(outs[:-1])]
        self.up = nn.ModuleList(
            _up(cin, cout, j < DROPOUT_BLOCKS, upsample)
            for j, (cin, cout) in enumerate(zip(ins, outs))
        )
        self.input_skip = input_skip
        head_in = ngf + (FRAME_CHANNELS if input_skip else 0)
        self.head = nn.Sequential(nn.Conv2d(head_in, 3, 3, 1, 1), nn.Tanh())

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """window `[B, 9*n_w, S, S]` in [0, 1] -> image `[B, 3, S, S]` in [-1, 1]."""
        skips = []
        x = window
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck feeds the decoder directly
        for block in self.up:
            x = block(x)
            if skips:
                x = torch.cat([x, skips.pop()], dim=1)
        if self.input_skip:
            x = torch.cat([x, window[:, -FRAME_CHANNELS:].to(x.dtype)], dim=1)
        return self.head(x)

    def shape(self) -> dict[str, Any]:
        """The hyper-parameters that fix the weight shapes (stored in checkpoints); the
        options only where they differ from the paper's network, so its checkpoints read
        as before."""
        shape: dict[str, Any] = {"size": self.size, "n_w": self.n_w, "ngf": self.ngf}
        if self.upsample != "transpose":
            shape["upsample"] = self.upsample
        if self.input_skip:
            shape["input_skip"] = True
        return shape


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters of `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fold_batchnorm(model: UNet) -> UNet:
    """An eval-mode copy of `model` with every BatchNorm merged into the convolution before it.

    The copy computes the same function as `model.eval()` (to float rounding), without the
    BatchNorm layers; dropout layers stay (they are identities in eval mode).
    """
    folded = copy.deepcopy(model).eval()
    for seq in list(folded.down) + list(folded.up):
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d | nn.ConvTranspose2d):
                seq[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose2d))
                seq[i + 1] = nn.Identity()
    return folded
