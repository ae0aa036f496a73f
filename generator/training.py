"""Training the rendering-to-video network: conditional GAN with an L1 term (pix2pix style).

Losses: the generator minimises `l1_weight * L1(fake, real) + BCE(D(c, fake), real)` and the
discriminator `(BCE(D(c, real), real) + BCE(D(c, fake), fake)) / 2`: the paper's (and
pix2pix's) log-likelihood GAN objective in its non-saturating form, on logits (binary cross
entropy with logits, numerically stable), rather than LSGAN, to stay with the paper; with
the L1 weight of 100 the adversarial term only sharpens. Adam (lr 2e-4, betas 0.5, 0.999)
for both. On CUDA the forward passes run under bf16 autocast with channels_last tensors.

Resume rule (DESIGN.md): a run continues from the newest checkpoint in its directory. At
the world size that wrote it, every state is restored (weights, optimisers, step, data
position, each rank's RNG states): on the CPU the continued run is bitwise the run that was
never stopped; on CUDA cuDNN's non-deterministic kernels keep it statistically, not bitwise,
the same. At another world size the RNGs are reseeded from (seed, step, rank) instead.

Data order: a `DistributedSampler` (seed = config.seed, epoch by epoch) permutes the
held-in frames; rank r of N takes every N-th entry, and each step takes `global_batch / N`
of them per rank, so one step's global batch is the same set of frames at any N (the
single-process run uses the same sampler with N = 1). Batch statistics of BatchNorm are
per rank (as with any DDP run without SyncBatchNorm).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from generator import checkpoint as ckpt
from generator.config import GeneratorConfig
from generator.dataset import BatchOrder, TrainingData, WindowDataset, data_on_device
from generator.discriminator import PatchDiscriminator
from generator.distributed import World, from_env, join
from generator.errors import DataError
from generator.samples import sample_grid
from generator.target import write_png
from generator.unet import FRAME_CHANNELS, UNet

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run reached.

    step: the global step at the end. history: per step of this run, `step` and the global
    batch's mean `l1` (RGB in [-1, 1] units, as optimised), `gan` (generator adversarial
    loss) and `d` (discriminator loss). images_per_second: global throughput after the first
    step (which pays for warm-up). checkpoint: the last checkpoint written (rank 0), if any.
    """

    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_second: float = 0.0
    checkpoint: Path | None = None


class _DiscriminatorPair(nn.Module):
    """D on (real, fake) in one call, so DDP sees one forward (two separate BatchNorm passes,
    as in pix2pix)."""

    def __init__(self, d: PatchDiscriminator) -> None:
        super().__init__()
        self.d = d

    def forward(self, cond: torch.Tensor, real: torch.Tensor,
                fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d(cond, real), self.d(cond, fake)


def _summary_writer(directory: Path) -> Any | None:
    """A TensorBoard SummaryWriter into `directory`, or None (warned) without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        log.warning("no TensorBoard events (%s); sample grids are still written", err)
        return None
    return SummaryWriter(log_dir=str(directory))


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


class Trainer:
    """One training run of one target; `run(steps)` trains up to global step `steps`.

    data: the target's TrainingData. config: GeneratorConfig (preset, optimiser, cadence).
    checkpoints: directory of checkpoints (resumed from when it holds one). samples:
    directory for PNG grids and TensorBoard events (None: neither). device: this process's
    device (default: the CPU) before distribution (`cuda` becomes `cuda:LOCAL_RANK` under torchrun).
    """

    def __init__(self, data: TrainingData, config: GeneratorConfig, checkpoints: Path,
                 samples: Path | None = None, device: torch.device | None = None,
                 world: World | None = None) -> None:
        self.world = world or from_env()
        self.device = join(self.world, device or torch.device("cpu"))
        self.config, self.data = config, data
        self.checkpoints, self.samples = Path(checkpoints), samples
        preset = config.preset_values()
        self.global_batch = config.global_batch(data.size)
        if self.global_batch % self.world.size:
            raise DataError(f"global batch {self.global_batch} does not split over "
                            f"{self.world.size} processes; set generator.batch_size to a multiple")
        self.batch = self.global_batch // self.world.size
        self.cuda = self.device.type == "cuda"
        fmt = torch.channels_last if self.cuda else torch.contiguous_format
        torch.manual_seed(config.seed)
        self.g = UNet(data.size, data.n_w, preset.ngf).to(self.device, memory_format=fmt)
        self.d = PatchDiscriminator(preset.ndf).to(self.device, memory_format=fmt)
        betas = (config.beta1, config.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), config.lr, betas, fused=self.cuda)
        self.opt_d = torch.optim.Adam(self.d.parameters(), config.lr, betas, fused=self.cuda)
        self.step = 0
        epoch, position = self._resume()
        self.g_step: nn.Module = self.g
        self.d_step: nn.Module = _DiscriminatorPair(self.d)
        if self.world.size > 1:
            ids = [self.device.index] if self.cuda else None
            self.g_step = DistributedDataParallel(self.g, device_ids=ids)
            self.d_step = DistributedDataParallel(self.d_step, device_ids=ids)
        store = data_on_device(data, self.device, config.data_placement)
        self.dataset = WindowDataset(data, np.arange(len(data.frames)), store)
        self.order = BatchOrder(data.holdout_start, self.batch, self.world.rank, self.world.size,
                                config.seed, epoch, position)
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    def _shapes(self) -> dict[str, dict[str, int]]:
        return {"generator": self.g.shape(), "discriminator": self.d.shape()}

    def _resume(self) -> tuple[int, int]:
        """Load the newest checkpoint if any; return the data position (epoch, batch)."""
        path = ckpt.latest_checkpoint(self.checkpoints)
        if path is None:
            ckpt.seed_all(self.config.seed, 0, self.world.rank)
            return 0, 0
        state = ckpt.load_checkpoint(path)
        for name, shape in self._shapes().items():
            ckpt.check_shape(path, name, state[name]["shape"], shape)
        self.g.load_state_dict(state["generator"]["state"])
        self.d.load_state_dict(state["discriminator"]["state"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step = state["step"]
        if state["train"] != self._train_settings():
            log.warning("resuming %s with other training settings: %s -> %s", path,
                        state["train"], self._train_settings())
        if state["world_size"] == self.world.size:
            ckpt.set_rng_state(state["rng"][self.world.rank])
            log.info("resumed exactly from %s (step %d)", path, self.step)
        else:
            ckpt.seed_all(self.config.seed, self.step, self.world.rank)
            log.info("resumed from %s (step %d) at world size %d (was %d): RNG reseeded",
                     path, self.step, self.world.size, state["world_size"])
        return state["epoch"], state["batch"]

    def _train_settings(self) -> dict[str, Any]:
        c = self.config
        return {"lr": c.lr, "betas": (c.beta1, c.beta2), "l1_weight": c.l1_weight,
                "global_batch": self.global_batch, "seed": c.seed, "preset": c.preset}

    def _train_step(self) -> torch.Tensor:
        """One D update then one G update; returns [l1, gan, d] (detached, on device)."""
        windows, real = self.dataset.batch(self.order.next())
        fmt = torch.channels_last if self.cuda else torch.contiguous_format
        windows = windows.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        real = real.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        cond = windows[:, -FRAME_CHANNELS:]  # B,9,S,S: the current frame
        with torch.autocast("cuda", torch.bfloat16, enabled=self.cuda):
            fake = self.g_step(windows)
            self.d.requires_grad_(True)
            logits_real, logits_fake = self.d_step(cond, real, fake.detach())
            loss_d = 0.5 * (_bce(logits_real, True) + _bce(logits_fake, False))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        self.d.requires_grad_(False)
        with torch.autocast("cuda", torch.bfloat16, enabled=self.cuda):
            loss_gan = _bce(self.d(cond, fake), True)
            loss_l1 = (fake.float() - real).abs().mean()
            loss_g = loss_gan + self.config.l1_weight * loss_l1
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return torch.stack([loss_l1, loss_gan, loss_d]).detach()

    def _global_mean(self, losses: torch.Tensor) -> torch.Tensor:
        if self.world.size > 1:
            dist.all_reduce(losses)
            losses /= self.world.size
        return losses.cpu()

    def _out_of_time(self, deadline: float) -> bool:
        """Whether any rank has passed the wall-clock deadline (collective)."""
        flag = torch.tensor([float(time.perf_counter() > deadline)], device=self.device)
        return bool(self._global_mean(flag)[0] > 0)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective: every rank must call it)."""
        rngs = [ckpt.rng_state()]
        if self.world.size > 1:
            rngs = [None] * self.world.size
            dist.all_gather_object(rngs, ckpt.rng_state())
        if not self.world.is_main:
            return None
        shapes = self._shapes()
        state = {
            "step": self.step, "epoch": self.order.epoch, "batch": self.order.position,
            "world_size": self.world.size, "rng": rngs, "train": self._train_settings(),
            "generator": {"shape": shapes["generator"], "state": self.g.state_dict()},
            "discriminator": {"shape": shapes["discriminator"], "state": self.d.state_dict()},
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
        }
        return ckpt.save_checkpoint(self.checkpoints, state, keep=self.config.keep_checkpoints)

    def _write_samples(self, writer: Any, directory: Path) -> None:
        heldout = self.data.heldout_indices
        count = min(self.config.sample_frames, len(heldout))
        picks = heldout[np.linspace(0, len(heldout) - 1, count).round().astype(int)]
        grid, l1 = sample_grid(self.g, self.dataset, picks, self.device)
        write_png(directory / f"step-{self.step:08d}.png", grid)
        if writer is not None:
            writer.add_image("heldout/grid", grid, self.step, dataformats="HWC")
            writer.add_scalar("heldout/l1", l1, self.step)

    def run(self, steps: int, progress: bool = True, log_every: int = 10) -> TrainResult:
        """Train up to global step `steps` (nothing when already there); return the result."""
        result = TrainResult(step=self.step)
        writer, samples = None, self.samples if self.world.is_main else None
        if samples is not None:
            samples.mkdir(parents=True, exist_ok=True)
            writer = _summary_writer(samples)
        bar = tqdm(total=steps, initial=self.step, unit="step", desc="train",
                   disable=not progress or not self.world.is_main)
        pending: list[torch.Tensor] = []
        started, ended, start_step = 0.0, 0.0, self.step
        minutes = self.config.max_minutes
        deadline = time.perf_counter() + 60.0 * minutes if minutes > 0 else None
        self.g.train()
        self.d.train()
        last = False
        while self.step < steps and not last:
            pending.append(self._train_step())
            self.step += 1
            bar.update(1)
            if self.step == start_step + 1:
                pending[-1].cpu()  # wait for the warm-up step before starting the clock
                started = time.perf_counter()
            last = self.step == steps or (
                deadline is not None and self.step % log_every == 0
                and self._out_of_time(deadline))
            if len(pending) == log_every or last:
                losses = self._global_mean(torch.stack(pending)).tolist()
                first = self.step - len(pending) + 1
                for k, (l1, gan, d) in enumerate(losses):
                    result.history.append({"step": first + k, "l1": l1, "gan": gan, "d": d})
                    if writer is not None:
                        for name, value in (("l1", l1), ("gan", gan), ("d", d)):
                            writer.add_scalar(f"loss/{name}", value, first + k)
                bar.set_postfix(l1=f"{losses[-1][0]:.4f}", d=f"{losses[-1][2]:.3f}")
                pending = []
                ended = time.perf_counter()
            if samples is not None and (self.step % self.config.sample_every == 0 or last):
                self._write_samples(writer, samples)
            if self.step % self.config.checkpoint_every == 0 or last:
                result.checkpoint = self.save() or result.checkpoint
        bar.close()
        if writer is not None:
            writer.close()
        timed = self.step - start_step - 1
        if timed > 0:
            result.images_per_second = timed * self.global_batch / (ended - started)
        result.step = self.step
        return result


def train(data: TrainingData, config: GeneratorConfig, checkpoints: Path, steps: int,
          samples: Path | None = None, device: torch.device | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume) up to global step `steps`; see `Trainer` for the arguments."""
    return Trainer(data, config, checkpoints, samples, device).run(steps, progress)
