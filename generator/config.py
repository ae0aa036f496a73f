"""Settings of the generator stage (section `generator` of the YAML config)."""

from __future__ import annotations

from dataclasses import dataclass

from generator.errors import PresetError


@dataclass(frozen=True)
class Preset:
    """Network widths and training batch of a named preset.

    `ngf`/`ndf` are the first-level widths of the generator and discriminator (each level
    doubles, capped at 8x). `batch_256` / `batch_512` are global batch sizes (summed over all
    GPUs) at 256 px and at 512 px; other sizes use `batch_256`.
    """

    ngf: int
    ndf: int
    batch_256: int
    batch_512: int
    steps: int


#: 'paper': the paper's widths (about 65 M generator parameters at 256 px, 80 M at 512 px),
#: global batch 16 at 256 and 8 at 512. 'tiny': a CPU-sized network (>= 10 fps at 256 px on
#: two CPU cores) that still learns a target in a few hundred steps.
PRESETS: dict[str, Preset] = {
    "paper": Preset(ngf=64, ndf=64, batch_256=16, batch_512=8, steps=20000),
    "tiny": Preset(ngf=16, ndf=16, batch_256=4, batch_512=2, steps=300),
}


@dataclass
class GeneratorConfig:
    """Generator settings; every field can be set with `--set generator.NAME=VALUE`."""

    #: Training preset: 'tiny' (CPU-sized) or 'paper' (the paper's network).
    preset: str = "tiny"
    #: Generator / discriminator first-level width; 0 takes the preset's.
    ngf: int = 0
    ndf: int = 0
    #: Global batch size (all GPUs together; each of N GPUs takes batch/N); 0 takes the
    #: preset's for the target's resolution.
    batch_size: int = 0
    #: Steps `dvp train` runs up to when `--steps` is not given; 0 takes the preset's.
    steps: int = 0
    #: Adam learning rate and betas.
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    #: Weight of the L1 term beside the conditional adversarial loss.
    l1_weight: float = 100.0
    #: Steps between checkpoints and between sample grids.
    #: Wall-clock limit of one `dvp train` run in minutes (0: none); the run stops at the
    #: next log step past it, with a checkpoint and samples, and resumes from there.
    max_minutes: float = 0.0
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
        """The preset named by `preset`, with this config's non-zero overrides applied."""
        if self.preset not in PRESETS:
            names = ", ".join(sorted(PRESETS))
            raise PresetError(f"unknown generator preset '{self.preset}': use {names}")
        base = PRESETS[self.preset]
        return Preset(
            ngf=self.ngf or base.ngf,
            ndf=self.ndf or base.ndf,
            batch_256=self.batch_size or base.batch_256,
            batch_512=self.batch_size or base.batch_512,
            steps=self.steps or base.steps,
        )

    def global_batch(self, size: int) -> int:
        """Global batch size at resolution `size` px."""
        preset = self.preset_values()
        return preset.batch_512 if size >= 512 else preset.batch_256
