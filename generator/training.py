"""Training the rendering-to-video network: conditional GAN with an L1 term (pix2pix style).

Losses: the generator minimises `l1_weight * L1(fake, real) + BCE(D(c, fake), real)` and the
discriminator `(BCE(D(c, real), real) + BCE(D(c, fake), fake)) / 2`: the paper's (and
pix2pix's) log-likelihood GAN objective in its non-saturating form, on logits (binary cross
entropy with logits, numerically stable), rather than LSGAN, to stay with the paper; with
the L1 weight of 100 the adversarial term only sharpens. Options (GeneratorConfig, off by
default, see docs/generator.md for what was measured): the L1 weighed up on the face and
mouth (`generator.regions`), pix2pixHD's multi-scale discriminator (the BCE terms averaged
over scales) and its feature-matching term. Adam (betas 0.5, 0.999) for both networks, at
`GeneratorConfig.learning_rate(global batch)` (lr * sqrt(B / lr_batch)). On CUDA the
forward passes run under bf16 autocast with channels_last tensors.

Speed on a GPU: the data lives there (`generator.dataset.data_on_device`), each batch is
gathered there from an index tensor copied asynchronously, so the host never waits for the
GPU inside a step; with `train_graph` the whole step (gather, D update, G update, both fused
Adam steps) is one CUDA graph, captured after `GRAPH_WARMUP` eager steps (which train as
usual) and replayed per step.

Resume rule (DESIGN.md): a run continues from the newest checkpoint in its directory. At
the world size that wrote it, every state is restored (weights, optimisers, step, data
position, each rank's RNG states): on the CPU the continued run is bitwise the run that was
never stopped; on CUDA cuDNN's non-deterministic kernels keep it statistically, not bitwise,
the same. At another world size the RNGs are reseeded from (seed, step, rank) instead, and
with the default weak scaling the global batch changes with it: the data position is kept
in frames (batches taken x old batch / new batch) and the learning rate follows the rule.

Data order: a `DistributedSampler` (seed = config.seed, epoch by epoch) permutes the
held-in frames; rank r of N takes every N-th entry, and each step takes `global_batch / N`
of them per rank, so one step's global batch is the same set of frames at any N (the
single-process run uses the same sampler with N = 1). Batch statistics of BatchNorm are
per rank (as with any DDP run without SyncBatchNorm), and so are the running statistics
(DDP does not broadcast buffers; rank 0's are saved).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
from generator.discriminator import make_discriminator
from generator.distributed import World, from_env, join
from generator.errors import DataError
from generator.regions import pixel_weights
from generator.samples import sample_grid
from generator.target import write_png
from generator.unet import FRAME_CHANNELS, UNet

log = logging.getLogger(__name__)

#: Eager steps before the step is captured as a CUDA graph (cuDNN's algorithm search, the
#: optimiser states and DDP's buckets settle in them; DDP wants at least 11).
GRAPH_WARMUP = 3
GRAPH_WARMUP_DDP = 11
GRAPH_MODES = ("auto", "on", "off")


@dataclass
class TrainResult:
    """What a training run reached.

    step: the global step at the end. history: per step of this run, `step` and the global
    batch's mean `l1` (RGB in [-1, 1] units, unweighted), `gan` (generator adversarial
    loss) and `d` (discriminator loss). images_per_second: global throughput after the first
    step (which pays for warm-up). checkpoint: the last checkpoint written (rank 0), if any.
    graph: whether the steps ran as a captured CUDA graph. global_batch and processes: the
    run's global batch and number of processes.
    """

    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_second: float = 0.0
    checkpoint: Path | None = None
    graph: bool = False
    global_batch: int = 0
    processes: int = 1


class _DiscriminatorPair(nn.Module):
    """D on (real, fake) in one call, so DDP sees one forward (two separate BatchNorm passes,
    as in pix2pix); each is the per-scale lists of `features` (logits last)."""

    def __init__(self, d: nn.Module) -> None:
        super().__init__()
        self.d = d

    def forward(self, cond: torch.Tensor, real: torch.Tensor, fake: torch.Tensor
                ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        return self.d.features(cond, real), self.d.features(cond, fake)


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


def _gan(features: list[list[torch.Tensor]], real: bool) -> torch.Tensor:
    """BCE of every scale's logits, averaged over scales."""
    return sum(_bce(scale[-1], real) for scale in features) / len(features)  # type: ignore[return-value]


def _feature_matching(fake: list[list[torch.Tensor]],
                      real: list[list[torch.Tensor]]) -> torch.Tensor:
    """pix2pixHD's term: mean L1 between D's activations (logits excluded) of the generated
    and the real frame, summed over layers, averaged over scales; real ones detached."""
    total = sum(F.l1_loss(f.float(), r.detach().float())
                for fs, rs in zip(fake, real) for f, r in zip(fs[:-1], rs[:-1]))
    return total / len(fake)  # type: ignore[return-value]


class _StepGraph:
    """A training step captured once as a CUDA graph and replayed per step.

    `step(positions)` must read only the device tensor `positions` and state that lives on
    the device (weights, optimiser states, the data store); the losses it returns are a
    static tensor, cloned per replay.
    """

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], batch: int,
                 device: torch.device, optimisers: list[torch.optim.Optimizer],
                 thread_local: bool) -> None:
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)  # the graph's backward allocates them in its pool
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        mode = "thread_local" if thread_local else "global"
        with torch.cuda.graph(self.graph, capture_error_mode=mode):
            self.losses = step(self.positions)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        self.positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.losses.clone()


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
        if config.train_graph not in GRAPH_MODES:
            raise DataError(f"unknown generator.train_graph '{config.train_graph}': use "
                            + ", ".join(GRAPH_MODES))
        self.world = world or from_env()
        self.device = join(self.world, device or torch.device("cpu"))
        self.config, self.data = config, data
        self.checkpoints, self.samples = Path(checkpoints), samples
        preset = config.preset_values()
        self.global_batch = config.global_batch(data.size, self.world.size)
        if self.global_batch % self.world.size:
            raise DataError(f"global batch {self.global_batch} does not split over "
                            f"{self.world.size} processes; set generator.batch_size to a multiple")
        self.batch = self.global_batch // self.world.size
        self.lr = config.learning_rate(self.global_batch)
        self.cuda = self.device.type == "cuda"
        self.fmt = torch.channels_last if self.cuda else torch.contiguous_format
        torch.manual_seed(config.seed)
        self.g = UNet(data.size, data.n_w, preset.ngf, preset.upsample,
                      preset.input_skip).to(self.device, memory_format=self.fmt)
        self.d = make_discriminator(preset.ndf, config.d_scales).to(self.device,
                                                                    memory_format=self.fmt)
        store = data_on_device(data, self.device, config.data_placement)
        self.graphed = self.cuda and store.type == "cuda" and (
            config.train_graph == "on" or (config.train_graph == "auto" and self.world.size == 1))
        betas = (config.beta1, config.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), self.lr, betas, fused=self.cuda,
                                      capturable=self.graphed)
        self.opt_d = torch.optim.Adam(self.d.parameters(), self.lr, betas, fused=self.cuda,
                                      capturable=self.graphed)
        self.step = 0
        epoch, position = self._resume()
        self.g_step: nn.Module = self.g
        self.d_step: nn.Module = _DiscriminatorPair(self.d)
        if self.world.size > 1:
            self._wrap_ddp()
        self.dataset = WindowDataset(data, np.arange(len(data.frames)), store)
        self.order = BatchOrder(data.holdout_start, self.batch, self.world.rank, self.world.size,
                                config.seed, epoch, position)
        self.mouth_box = (None if data.mouth_box is None else
                          torch.as_tensor(np.asarray(data.mouth_box, np.float32), device=store))
        self._graph: _StepGraph | None = None
        self._eager_steps = 0
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    def _wrap_ddp(self) -> None:
        """DDP on G and on the D pair: buffers not broadcast (BatchNorm statistics are per
        rank), `ddp_bucket_mb` buckets; built on a side stream when the step is captured."""
        ids = [self.device.index] if self.cuda else None
        kw = {"device_ids": ids, "broadcast_buffers": False,
              "bucket_cap_mb": self.config.ddp_bucket_mb}
        if self.graphed:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.g_step = DistributedDataParallel(self.g, **kw)
                self.d_step = DistributedDataParallel(self.d_step, **kw)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self.g_step = DistributedDataParallel(self.g, **kw)
            self.d_step = DistributedDataParallel(self.d_step, **kw)

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
        for opt, key in ((self.opt_g, "opt_g"), (self.opt_d, "opt_d")):
            opt.load_state_dict(state[key])
            self._settle_optimiser(opt)
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
        position = state["batch"]
        before = int(state["train"].get("global_batch", self.global_batch))
        if before != self.global_batch:  # the same frames of the epoch taken, in new batches
            position = position * before // self.global_batch
        return state["epoch"], position

    def _settle_optimiser(self, opt: torch.optim.Optimizer) -> None:
        """After loading a state: this run's learning rate, fused and capturable settings,
        and the step counters where those settings keep them (device or host)."""
        for group in opt.param_groups:
            group.update(lr=self.lr, fused=self.cuda, capturable=self.graphed,
                         foreach=None if self.cuda else group.get("foreach"))
            for p in group["params"]:
                st = opt.state.get(p)
                if st and "step" in st:
                    on_device = self.cuda or self.graphed
                    st["step"] = st["step"].to(p.device if on_device else "cpu",
                                               torch.float32)

    def _train_settings(self) -> dict[str, Any]:
        c = self.config
        return {"lr": c.lr, "betas": (c.beta1, c.beta2), "l1_weight": c.l1_weight,
                "global_batch": self.global_batch, "seed": c.seed, "preset": c.preset,
                "learning_rate": self.lr, "face_weight": c.face_weight,
                "mouth_weight": c.mouth_weight, "feature_matching": c.feature_matching}

    def _inputs(self, positions: np.ndarray | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch at `positions` on this device: windows `[B, 99, S, S]` (bf16 on CUDA,
        float32 on the CPU, channels_last on CUDA), real frames `[B, 3, S, S]` float32 in
        [-1, 1], masks `[B, 1, S, S]` of the current frame."""
        windows, frames, masks = self.dataset.raw(positions)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        if windows.dtype == torch.uint8:
            windows = windows.to(self.device, non_blocking=True).to(
                dtype, memory_format=self.fmt).div_(255.0)
        else:
            windows = windows.to(self.device, dtype, non_blocking=True).contiguous(
                memory_format=self.fmt)
        real = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        real = real.contiguous(memory_format=self.fmt).div_(127.5).sub_(1.0)
        return windows, real, masks.to(self.device, non_blocking=True)

    def _step(self, positions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One D update then one G update on the batch at `positions`; returns [l1, gan, d]
        (detached, on device). Capturable: on CUDA with the data on the device, `positions`
        is a device tensor and nothing here waits for the GPU."""
        c = self.config
        windows, real, masks = self._inputs(positions)
        cond = windows[:, -FRAME_CHANNELS:]  # B,9,S,S: the current frame
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.cuda, cache_enabled=False)
        with autocast:
            fake = self.g_step(windows)
            self.d.requires_grad_(True)
            feats_real, feats_fake = self.d_step(cond, real, fake.detach())
            loss_d = 0.5 * (_gan(feats_real, True) + _gan(feats_fake, False))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        self.d.requires_grad_(False)
        with autocast:
            feats = self.d.features(cond, fake)
            loss_gan = _gan(feats, True)
            diff = (fake.float() - real).abs()
            loss_l1 = diff.mean()
            weighted = loss_l1
            if c.face_weight or c.mouth_weight:
                w = pixel_weights(cond, masks, self.mouth_box, c.face_weight, c.mouth_weight)
                weighted = (diff * w).mean()
            loss_g = loss_gan + c.l1_weight * weighted
            if c.feature_matching:
                loss_g = loss_g + c.feature_matching * _feature_matching(feats, feats_real)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return torch.stack([loss_l1, loss_gan, loss_d]).detach()

    def _train_step(self) -> torch.Tensor:
        """The next batch's step: eager, or the captured graph once it is warm."""
        positions = self.order.next()
        if self._graph is not None:
            return self._graph(self.dataset.positions(positions))
        if not self.graphed:
            return self._step(positions)
        warmup = GRAPH_WARMUP_DDP if self.world.size > 1 else GRAPH_WARMUP
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):  # eager warm-up steps train as usual
            losses = self._step(self.dataset.positions(positions))
        main.wait_stream(side)
        self._eager_steps += 1
        if self._eager_steps >= warmup:
            self._graph = _StepGraph(self._step, self.batch, self.device,
                                     [self.opt_g, self.opt_d], self.world.size > 1)
            log.info("training step captured as a CUDA graph after %d eager steps", warmup)
        return losses

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

    def run(self, steps: int, progress: bool = True, log_every: int = 10,
            seconds: float | None = None) -> TrainResult:
        """Train up to global step `steps` (nothing when already there); return the result.

        seconds: wall-clock limit of this call (default: `max_minutes`); the run stops at
        the first log step past it, with a checkpoint.
        """
        result = TrainResult(step=self.step, global_batch=self.global_batch,
                             processes=self.world.size)
        writer, samples = None, self.samples if self.world.is_main else None
        if samples is not None:
            samples.mkdir(parents=True, exist_ok=True)
            writer = _summary_writer(samples)
        bar = tqdm(total=steps, initial=self.step, unit="step", desc="train",
                   disable=not progress or not self.world.is_main)
        pending: list[torch.Tensor] = []
        started, ended, start_step, timed_from = 0.0, 0.0, self.step, self.step
        limit = 60.0 * self.config.max_minutes if seconds is None else seconds
        deadline = time.perf_counter() + limit if limit > 0 else None
        self.g.train()
        self.d.train()
        last = False
        while self.step < steps and not last:
            capturing = self.graphed and self._graph is None
            pending.append(self._train_step())
            self.step += 1
            bar.update(1)
            if self.step == start_step + 1 or (capturing and self._graph is not None):
                pending[-1].cpu()  # the clock starts after warm-up (and capture)
                started, timed_from = time.perf_counter(), self.step
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
        timed = self.step - timed_from
        if timed > 0 and ended > started:
            result.images_per_second = timed * self.global_batch / (ended - started)
        result.step = self.step
        result.graph = self._graph is not None
        return result


def train(data: TrainingData, config: GeneratorConfig, checkpoints: Path, steps: int,
          samples: Path | None = None, device: torch.device | None = None,
          progress: bool = True) -> TrainResult:
    """Train (or resume) up to global step `steps`; see `Trainer` for the arguments."""
    return Trainer(data, config, checkpoints, samples, device).run(steps, progress)
