"""Inverse rendering of a target video: one albedo UV texture and per-frame SH lighting.

`fit_photometric(model, params, frames)` finds the albedo texture (`(A, 2A, 3)`, the layout
of `renderer.conditioning`) and the per-frame lighting (`(T, 9, 3)`, `renderer.sh`) that
make the conditioning's colour rendering (albedo x SH irradiance) match the real frames on
the skin. The geometry comes from the tracked `params` (camera of the S x S frames) and is
held fixed.

Method (torch, CPU feasible for small inputs):

1. **Skin pixels**: pixels whose visible surface is ICT's `face` or `head_neck` (textured),
   away from the silhouette (the mask eroded by `erode_px`); eyes, mouth interior and teeth
   are never used.
2. **Key frames** (`key_frames`, evenly spaced): the albedo is first splatted
   (bilinear, texel mean of colour / irradiance under ambient light), then refined jointly
   with the key frames' lighting by Adam on a Huber loss, with regularisers: albedo
   smoothness (total variation), a pull of the albedo toward its mean skin colour (which
   fills texels never seen), and a lighting prior (bands 1-2 toward the key frames' mean,
   toward 0, and toward grey: coloured light is left to the constant term, since colour
   in the directional bands trades off against the albedo). The albedo is a coarse plus a fine texture, so large areas converge fast.
3. **Gauge**: albedo x light has a per-channel scale ambiguity; it is fixed by making the
   key frames' mean constant term white with irradiance 1 (`L_00 = 1 / 0.886227` per
   channel), so the albedo carries the colour.
4. **Every frame's lighting**: with the albedo fixed, the lighting of each frame is linear
   least squares, solved in closed form with a ridge prior toward the key frames' mean
   and Huber reweighting (IRLS), all frames of a chunk in one batched solve
   (`solve_lights`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from renderer.conditioning import (
    ALBEDO_TILES,
    Camera,
    ConditioningRenderer,
    RendererError,
    sample_texture,
)
from renderer.sh import AMBIENT_L00, irradiance_basis
from tracker.face_model import FaceModel
from tracker.params import FaceParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhotometricFit:
    """Result of `fit_photometric`.

    albedo: `(A, 2A, 3)` float32 in [0, 1], the UV albedo texture (conditioning layout).
    sh: `(T, 9, 3)` float32, per-frame lighting (FaceParams.sh convention).
    coverage: `(A, 2A)` bool, texels seen on skin pixels of the key frames.
    loss: Adam loss per step; rmse: `(T,)` RMS colour error on each frame's skin pixels
    (NaN for a frame without any); seconds: wall time of `keys` (the key frames' skin
    pixels), `steps` (the joint refinement) and `lighting` (every frame's lighting).
    """

    albedo: np.ndarray
    sh: np.ndarray
    coverage: np.ndarray
    loss: list[float]
    rmse: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    def albedo_uint8(self) -> np.ndarray:
        """The albedo as `(A, 2A, 3)` uint8 (for albedo.png)."""
        return (np.clip(self.albedo, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class _Rows:
    """Skin pixels of some frames: frame (in the chunk's selection), uv, basis, colour."""

    frame: torch.Tensor
    uv: torch.Tensor
    basis: torch.Tensor
    colour: torch.Tensor


def skin_rows(renderer: ConditioningRenderer, params: FaceParams, frames: Sequence[np.ndarray],
              sel: np.ndarray, erode_px: int) -> _Rows:
    """The skin pixels of frames `sel` (see the module doc), with their target colours."""
    cam = Camera.of(params)
    surf = renderer.surface(params.identity, params.expression[sel], params.rotation[sel],
                            params.translation[sel], params.gaze[sel], cam, dense=False)
    s = renderer.size
    b = len(sel)
    skin = torch.zeros(b * s * s, dtype=torch.bool, device=renderer.device)
    idx = surf.frame * (s * s) + surf.pixel
    skin[idx] = surf.textured & surf.ok[surf.frame]
    skin = skin.reshape(b, 1, s, s)
    if erode_px > 0:  # drop pixels within erode_px of anything that is not skin
        k = 2 * erode_px + 1
        skin = ~(F.max_pool2d((~skin).float(), k, stride=1, padding=erode_px) > 0)
    keep = skin.reshape(-1)[idx]
    rows = torch.nonzero(keep).squeeze(1)
    target = torch.as_tensor(np.stack([np.asarray(frames[int(i)]) for i in sel]),
                             device=renderer.device)
    if target.shape[1:] != (s, s, 3):
        raise RendererError(f"frames must be (S, S, 3) with S = {s}, got "
                            f"{tuple(target.shape[1:])}")
    target = (target.float() / 255.0 if target.dtype == torch.uint8 else target.float())
    colour = target.reshape(-1, 3)[idx[rows]]
    return _Rows(frame=surf.frame[rows], uv=surf.uv[rows],
                 basis=irradiance_basis(surf.normal[rows]), colour=colour)


def _splat(rows: _Rows, value: torch.Tensor, weight: torch.Tensor, size: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear splat of `value` (N, 3) with `weight` (N,) into `(A, 2A)` texels: returns
    (sum of w * value `[3, A, 2A]`, sum of w `[A, 2A]`)."""
    h, w = size, ALBEDO_TILES * size
    tx = rows.uv[:, 0] * size - 0.5
    ty = (1.0 - rows.uv[:, 1]) * size - 0.5
    x0, y0 = torch.floor(tx), torch.floor(ty)
    acc = torch.zeros(3, h * w, device=value.device)
    wsum = torch.zeros(h * w, device=value.device)
    for dx in (0, 1):
        for dy in (0, 1):
            wx = (tx - x0) if dx else (1.0 - (tx - x0))
            wy = (ty - y0) if dy else (1.0 - (ty - y0))
            xi = (x0 + dx).clamp(0, w - 1).long()
            yi = (y0 + dy).clamp(0, h - 1).long()
            ww = wx * wy * weight
            flat = yi * w + xi
            acc.index_add_(1, flat, (value * ww[:, None]).t())
            wsum.index_add_(0, flat, ww)
    return acc.reshape(3, h, w), wsum.reshape(h, w)


def gauge_sh(sh_raw: torch.Tensor) -> torch.Tensor:
    """Lighting `[K, 9, 3]` scaled per channel so that the mean constant term over the K
    frames is AMBIENT_L00 (albedo x light has a per-channel scale ambiguity: this fixes
    it, so the albedo carries the colour)."""
    mean_dc = sh_raw[:, 0, :].mean(0).clamp_min(1e-4)  # 3
    return sh_raw * (AMBIENT_L00 / mean_dc)


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def fit_photometric(
    model: FaceModel,
    params: FaceParams,
    frames: Sequence[np.ndarray] | np.ndarray,
    albedo_size: int = 256,
    steps: int = 200,
    key_frames: int = 32,
    device: torch.device | str = "cpu",
    erode_px: int | None = None,
    batch_pixels: int = 1 << 16,
    lr: float = 0.02,
    smooth_weight: float = 2e-3,
    mean_weight: float = 1e-3,
    light_weight: float = 1e-3,
    huber: float = 0.05,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> PhotometricFit:
    """Fit the albedo texture and per-frame lighting of a target (see the module doc).

    frames: `(T, S, S, 3)` uint8 (or float in [0, 1]) RGB, or a sequence of such frames
    indexable by frame number; `params` has T frames with the S x S camera.
    """
    t_all = params.frames
    if len(frames) != t_all:
        raise RendererError(f"{len(frames)} frames but params have {t_all}")
    if t_all == 0:
        raise RendererError("no frames to fit")
    first = np.asarray(frames[0])
    if first.ndim != 3 or first.shape[0] != first.shape[1] or first.shape[2] != 3:
        raise RendererError(f"frames must be (S, S, 3), got {first.shape}")
    if albedo_size <= 0:
        raise RendererError(f"albedo_size must be positive, got {albedo_size}")
    size = first.shape[0]
    dev = torch.device(device)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    erode = max(1, round(2 * size / 256)) if erode_px is None else int(erode_px)
    renderer = ConditioningRenderer(model, None, size, dev)
    valid = np.nonzero(params.valid)[0]
    pool = valid if len(valid) else np.arange(t_all)
    keys = pool[np.unique(np.linspace(0, len(pool) - 1, min(key_frames, len(pool))).round()
                          .astype(np.int64))]
    rows = _cat_rows([skin_rows(renderer, params, frames, keys[i:i + renderer.batch], erode)
                      for i in range(0, len(keys), renderer.batch)], renderer.batch)
    n = rows.colour.shape[0]
    a_size = int(albedo_size)
    if n == 0:
        raise RendererError("no skin pixels visible in the key frames: check the params")
    log.info("photometric fit: %d key frames, %d skin pixels", len(keys), n)
    seconds["keys"] = time.perf_counter() - started
    started = time.perf_counter()
    # 1. splat under ambient light
    irr0 = rows.basis[:, 0:1] * AMBIENT_L00  # = 1
    acc, wsum = _splat(rows, rows.colour / irr0, torch.ones(n, device=dev), a_size)
    coverage = wsum > 1e-3
    skin_mean = rows.colour.median(0).values  # 3
    init = torch.where(coverage, acc / wsum.clamp_min(1e-6), skin_mean[:, None, None])
    # 2. joint refinement on the key frames
    coarse_size = (max(1, a_size // 8), max(1, ALBEDO_TILES * a_size // 8))
    coarse = F.interpolate(init[None], size=coarse_size, mode="area").clone()
    fine = (init[None] - F.interpolate(coarse, size=init.shape[1:], mode="bilinear",
                                       align_corners=False)).clone()
    coarse.requires_grad_(True)
    fine.requires_grad_(True)
    sh_raw = torch.zeros((len(keys), 9, 3), device=dev)
    sh_raw[:, 0, :] = AMBIENT_L00
    sh_raw.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [coarse], "lr": lr},
                            {"params": [fine], "lr": lr},
                            {"params": [sh_raw], "lr": lr * AMBIENT_L00}])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    losses: list[float] = []
    cov_f = coverage.float()[None, None]
    for step in range(steps):
        pick = (torch.randint(0, n, (min(batch_pixels, n),), generator=gen).to(dev)
                if n > batch_pixels else torch.arange(n, device=dev))
        tex = _texture(coarse, fine, init.shape[1:])
        sh = gauge_sh(sh_raw)
        irr = (rows.basis[pick, :, None] * sh[rows.frame[pick]]).sum(1).clamp_min(0.0)
        pred = sample_texture(tex, rows.uv[pick]) * irr
        data = _huber(pred - rows.colour[pick], huber).mean() / huber
        tv = ((tex[..., 1:, :] - tex[..., :-1, :]).abs().mean()
              + (tex[..., :, 1:] - tex[..., :, :-1]).abs().mean())
        mean_pull = (((tex - skin_mean[None, :, None, None]) ** 2) * (1.0 - 0.9 * cov_f)).mean()
        bands = sh[:, 1:, :]
        light = (((bands - bands.mean(0, keepdim=True)) ** 2).mean() + 0.1 * (bands ** 2).mean()
                 + ((bands - bands.mean(2, keepdim=True)) ** 2).mean())
        loss = data + smooth_weight * tv / 1e-2 + mean_weight * mean_pull / 1e-3 \
            + light_weight * light / 1e-2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps)
    with torch.no_grad():
        tex = _texture(coarse, fine, init.shape[1:]).clamp(0.0, 1.0)
        prior = gauge_sh(sh_raw).mean(0)  # 9,3
    seconds["steps"] = time.perf_counter() - started
    started = time.perf_counter()
    # 3. every frame's lighting, albedo fixed: a chunk of frames at a time, all solved at once
    # (the results stay on the device until the end)
    lights: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, t_all, renderer.batch):
        sel = np.arange(start, min(start + renderer.batch, t_all))
        chunk = skin_rows(renderer, params, frames, sel, erode)
        lights.append(solve_lights(chunk.frame, chunk.basis, sample_texture(tex, chunk.uv),
                                   chunk.colour, len(sel), prior, light_weight, huber))
    sh_all = torch.cat([sh for sh, _ in lights]).cpu().numpy().astype(np.float32)
    rmse = torch.cat([err for _, err in lights]).cpu().numpy().astype(np.float32)
    albedo_np = tex[0].permute(1, 2, 0).contiguous().cpu().numpy().astype(np.float32)
    seconds["lighting"] = time.perf_counter() - started
    return PhotometricFit(albedo=albedo_np, sh=sh_all, coverage=coverage.cpu().numpy(),
                          loss=losses, rmse=rmse, seconds=seconds)


def _texture(coarse: torch.Tensor, fine: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return F.interpolate(coarse, size=shape, mode="bilinear", align_corners=False) + fine


def _cat_rows(parts: list[_Rows], batch: int) -> _Rows:
    """Concatenate chunks of `batch` consecutive frames; frame numbers become global."""
    frame = torch.cat([p.frame + i * batch for i, p in enumerate(parts)])
    return _Rows(frame=frame, uv=torch.cat([p.uv for p in parts]),
                 basis=torch.cat([p.basis for p in parts]),
                 colour=torch.cat([p.colour for p in parts]))


def solve_lights(frame: torch.Tensor, basis: torch.Tensor, albedo: torch.Tensor,
                 colour: torch.Tensor, frames: int, prior: torch.Tensor, weight: float,
                 huber: float, iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Lighting `(frames, 9, 3)` of each frame by ridge least squares toward `prior` `(9, 3)`
    with Huber reweighting, and each frame's RMS colour error `(frames,)`, from the skin
    pixels of `frames` frames: `frame` (N,) long (which frame, 0..frames-1), `basis` (N, 9)
    SH irradiance basis, `albedo` and `colour` (N, 3). A frame of fewer than 9 pixels gets
    the prior and NaN. All frames at once: each frame's pixels padded to the largest count
    (weight 0), one batched solve per channel and iteration; the GPU is waited for once
    (for the largest count)."""
    dev = basis.device
    order = torch.argsort(frame, stable=True)
    counts = torch.bincount(frame, minlength=frames)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(frame), device=dev) - first[frame[order]]
    width = max(1, int(counts.max())) if len(frame) else 1
    slot = frame[order] * width + rank  # each pixel's place in the padded [frames, width]

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(frames * width, *x.shape[1:])
        out[slot] = x[order]
        return out.reshape(frames, width, *x.shape[1:])

    b, a, c = padded(basis), padded(albedo), padded(colour)  # F,W,9 / F,W,3 / F,W,3
    mask = padded(torch.ones(len(frame), device=dev))[..., None]  # F,W,1
    n = counts.clamp_min(1).to(basis.dtype)[:, None, None]  # F,1,1
    ridge = torch.full((9,), weight, device=dev)
    ridge[0] = weight * 0.01  # the constant term is well determined
    sh = prior.expand(frames, 9, 3).clone()
    w = mask.expand(frames, width, 3)
    for _ in range(iterations):
        for ch in range(3):
            d = b * a[..., ch:ch + 1]  # F,W,9
            dw = d * w[..., ch:ch + 1]
            lhs = d.transpose(1, 2) @ dw / n + torch.diag(ridge)
            rhs = (dw.transpose(1, 2) @ c[..., ch:ch + 1]).squeeze(-1) / n[:, 0] \
                + ridge * prior[:, ch]
            # solve_ex: the same solve without its error check, which waits for the GPU
            # (lhs is symmetric positive definite: the ridge keeps it invertible)
            sh[:, :, ch] = torch.linalg.solve_ex(lhs.double(), rhs.double())[0].float()
        resid = a * (b @ sh).clamp_min(0.0) - c
        w = torch.where(resid.abs() <= huber, torch.ones_like(resid),
                        huber / resid.abs().clamp_min(1e-9)) * mask
    resid = (a * (b @ sh).clamp_min(0.0) - c) * mask
    rmse = (resid.pow(2).sum((1, 2)) / (3 * n[:, 0, 0])).sqrt()
    few = counts < 9
    sh = torch.where(few[:, None, None], prior.expand_as(sh), sh)
    return sh, torch.where(few, torch.full_like(rmse, float("nan")), rmse)
