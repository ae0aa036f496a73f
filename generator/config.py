"""Settings of the generator stage (section `generator` of the YAML config)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from generator.errors import PresetError


@dataclass(frozen=True)
class Preset:
    """Network widths and training batch of a named preset.

    `ngf`/`ndf` are the first-level widths of the generator and discriminator (each level
    doubles, capped at 8x). `batch_256` / `batch_512` are batch sizes per process (per GPU)
    at 256 px and at 512 px, other sizes use `batch_256`: N processes train on N times the
    batch (weak scaling). `lr_batch` is the global batch at which `GeneratorConfig.lr` holds
    as given (the learning-rate rule, `GeneratorConfig.learning_rate`). `upsample` and
    `input_skip` are the generator's options (`generator.unet.UNet`).
    """

    ngf: int
    ndf: int
    batch_256: int
    batch_512: int
    steps: int
    lr_batch: int = 16
    upsample: str = "transpose"
    input_skip: bool = False


#: 'paper': the paper's widths (about 65 M generator parameters at 256 px, 80 M at 512 px),
#: batch 64 per GPU at 256 and 16 at 512 (an H100/H200 is about 11 % busy at batch 16: the
#: deep levels are tiny), learning rate 2e-4 at global batch 16, scaled by the square root
#: of the global batch. 'tiny': a CPU-sized network (>= 10 fps at 256 px on two CPU cores)
#: that still learns a target in a few hundred steps; resize-convolution upsampling (no
#: checkerboard) and the input skip (docs/generator.md has the measurements).
PRESETS: dict[str, Preset] = {
    "paper": Preset(ngf=64, ndf=64, batch_256=64, batch_512=16, steps=20000, lr_batch=16),
    "tiny": Preset(ngf=16, ndf=16, batch_256=4, batch_512=2, steps=300, lr_batch=4,
                   upsample="resize", input_skip=True),
}


def _switch(name: str, value: str, default: bool) -> bool:
    """'' -> default, 'on' -> True, 'off' -> False; anything else is a PresetError."""
    if value in ("", "on", "off"):
        return default if value == "" else value == "on"
    raise PresetError(f"{name} must be 'on', 'off' or '' (the preset's), got '{value}'")


@dataclass
class GeneratorConfig:
    """Generator settings; every field can be set with `--set generator.NAME=VALUE`."""

    #: Training preset: 'tiny' (CPU-sized) or 'paper' (the paper's network).
    preset: str = "tiny"
    #: Generator / discriminator first-level width; 0 takes the preset's.
    ngf: int = 0
    ndf: int = 0
    #: Global batch size (all processes together; each of N takes batch/N, so the run is
    #: the same at any N: strong scaling); 0 takes the preset's batch per process for the
    #: target's resolution times the number of processes (weak scaling).
    batch_size: int = 0
    #: Steps `dvp train` runs up to when `--steps` is not given; 0 takes the preset's.
    steps: int = 0
    #: Adam learning rate at the global batch `lr_batch` (0: the preset's, 16 for `paper`);
    #: a run with global batch B uses lr * sqrt(B / lr_batch) for both networks.
    lr: float = 2e-4
    lr_batch: int = 0
    #: Adam betas.
    beta1: float = 0.5
    beta2: float = 0.999
    #: Generator decoder upsampling 'transpose' or 'resize' ('': the preset's); see unet.py.
    upsample: str = ""
    #: The current frame's conditioning into the final convolution at full resolution 'on'
    #: / 'off' ('': the preset's); see unet.py.
    input_skip: str = ""
    #: Weight of the L1 term beside the conditional adversarial loss.
    l1_weight: float = 100.0
    #: Extra L1 weight on the face (the renderer's mask) and on the mouth (the part of the
    #: face whose correspondence lies in the mouth box): a pixel weighs 1 + face_weight
    #: (+ mouth_weight in the mouth); the weights are normalised to a mean of 1 per batch.
    face_weight: float = 0.0
    mouth_weight: float = 0.0
    #: Discriminators at 1, 1/2, 1/4 ... of the resolution (pix2pixHD's multi-scale
    #: discriminator); 1 is the paper's single 70 x 70 PatchGAN.
    d_scales: int = 1
    #: Weight of pix2pixHD's discriminator feature-matching loss (L1 between D's features
    #: of the real and the generated frame, every layer and scale); 0: none.
    feature_matching: float = 0.0
    #: The whole training step (gather, both updates) as one CUDA graph: 'auto' (on one GPU;
    #: eager under DDP), 'on' (under DDP too), 'off'. Nothing changes on the CPU.
    train_graph: str = "auto"
    #: DistributedDataParallel gradient bucket size, MB.
    ddp_bucket_mb: int = 100
    #: Wall-clock limit of one `dvp train` run in minutes (0: none); the run stops at the
    #: next log step past it, with a checkpoint and samples, and resumes from there.
    max_minutes: float = 0.0
    #: Steps between checkpoints and between sample grids.
    checkpoint_every: int = 500
    sample_every: int = 500
    #: Checkpoints kept in `TDIR/checkpoints/` (the newest ones).
    keep_checkpoints: int = 2
    #: Held-out frames shown in each sample grid.
    sample_frames: int = 4
    #: Seed of every random draw in training.
    seed: int = 0
    #: Where the cached training tensors live during training: 'auto' (on the GPU when they
    #: take under a quarter of its memory, else host memory), 'device' or 'host'.
    data_placement: str = "auto"
    #: Inference backend: 'auto', 'torch', 'tensorrt', 'onnx', 'cpu' (generator.runtime).
    backend: str = "auto"
    #: Largest batch a TensorRT engine is built for.
    engine_max_batch: int = 4

    def preset_values(self) -> Preset:
        """The preset named by `preset`, with this config's non-zero overrides applied
        (`batch_size` is global: see `global_batch`)."""
        if self.preset not in PRESETS:
            names = ", ".join(sorted(PRESETS))
            raise PresetError(f"unknown generator preset '{self.preset}': use {names}")
        base = PRESETS[self.preset]
        return Preset(
            ngf=self.ngf or base.ngf,
            ndf=self.ndf or base.ndf,
            batch_256=base.batch_256,
            batch_512=base.batch_512,
            steps=self.steps or base.steps,
            lr_batch=self.lr_batch or base.lr_batch,
            upsample=self.upsample or base.upsample,
            input_skip=_switch("generator.input_skip", self.input_skip, base.input_skip),
        )

    def global_batch(self, size: int, processes: int = 1) -> int:
        """Global batch size at resolution `size` px on `processes` processes: `batch_size`
        when set, else the preset's batch per process times `processes`."""
        if self.batch_size:
            return self.batch_size
        preset = self.preset_values()
        return processes * (preset.batch_512 if size >= 512 else preset.batch_256)

    def learning_rate(self, global_batch: int) -> float:
        """Adam's learning rate at `global_batch`: lr * sqrt(global_batch / lr_batch)."""
        return self.lr * math.sqrt(global_batch / self.preset_values().lr_batch)
