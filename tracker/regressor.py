"""A small MLP from normalised landmarks to a first guess of head rotation, expression and
identity: the cold start of the fit (first frame, or after the track was lost).

Input: the 468 mesh landmarks (pixels) turned into camera rays with the focal length and
principal point, rotated into a virtual camera looking straight at the face (so where the
face sits in the image does not matter), centred and scaled to unit RMS radius. Output: the
head rotation in that virtual camera (axis-angle, turned back into the real camera by
`predict`), the 45 free expression coefficients and the 100 identity coefficients. The
translation follows in closed form (tracker.fitting.initial_translation).

Training uses only the face model: random identity, expression, gaze, pose and camera,
projected, with pixel noise, a little 3D jitter (MediaPipe's points are not exactly ICT's)
and dropped points. It is seeded (same weights for the same settings and thread count),
takes well under a minute on two CPU cores, and the weights (about 0.4 MB) are cached in
`$DVP_HOME/regressor-v1/`, keyed by the face model and the training settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tracker.errors import DvpError
from tracker.face_model import FaceModel, gaze_to_eyelook
from tracker.files import save_npz
from tracker.fitting import N_MESH, LandmarkModel
from tracker.rotation import axis_angle_to_matrix, matrix_to_axis_angle_t

log = logging.getLogger(__name__)

CACHE_NAME = "regressor-v1"
FORMAT = 1
#: Identity modes the regressor guesses (the rest start at 0): 2D landmarks under unknown
#: pose, expression and depth say little about the finer modes; calibration fits all 100.
N_IDENTITY_GUESS = 10


class RegressorError(DvpError):
    """A regressor weights file that is damaged or of another format."""


@dataclass(frozen=True)
class RegressorSettings:
    """What the trained weights depend on (besides the face model)."""

    samples: int = 24000  # synthetic training faces
    epochs: int = 20
    seed: int = 0
    components: int = 64  # PCA of the input
    hidden: int = 128
    batch: int = 256
    lr: float = 3e-3


@dataclass(frozen=True)
class Guess:
    """The regressor's first guess for B frames (torch, on the input's device).

    rotation (B, 3, 3) camera-from-model; expression (B, 53) in [0, 1] with eyeLook at 0;
    identity (B, 100).
    """

    rotation: torch.Tensor
    expression: torch.Tensor
    identity: torch.Tensor


def _rotation_to(d: torch.Tensor) -> torch.Tensor:
    """Rotations [B, 3, 3] taking unit vectors d [B, 3] onto +z (the shortest arc)."""
    z = torch.zeros_like(d)
    z[:, 2] = 1.0
    axis = torch.linalg.cross(d, z)
    s = axis.norm(dim=-1, keepdim=True)
    c = (d * z).sum(-1, keepdim=True)
    angle = torch.atan2(s, c)
    rotvec = axis / s.clamp_min(1e-12) * angle
    return axis_angle_to_matrix(rotvec)


def features_from_rays(rays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, 936], virtual rotation [B, 3, 3]) of normalised image points [B, 468, 2]
    ((u - cx) / f, (v - cy) / f).

    The virtual camera looks along the mean ray; its points are centred and scaled to unit
    RMS radius.
    """
    b = rays.shape[0]
    r3 = torch.cat([rays, torch.ones_like(rays[..., :1])], -1)
    r3 = r3 / r3.norm(dim=-1, keepdim=True)
    d = r3.mean(1)
    d = d / d.norm(dim=-1, keepdim=True)
    rv = _rotation_to(d)  # B,3,3
    q = r3 @ rv.transpose(1, 2)
    xy = q[..., :2] / q[..., 2:].clamp_min(1e-3)
    xy = xy - xy.mean(1, keepdim=True)
    scale = (xy * xy).sum(-1).mean(-1).sqrt().clamp_min(1e-6)
    return (xy / scale[:, None, None]).reshape(b, -1), rv


class LandmarkRegressor(nn.Module):
    """PCA of the features, then an MLP; outputs standardised targets."""

    def __init__(self, n_in: int = 2 * N_MESH, n_out: int = 3 + 45 + N_IDENTITY_GUESS,
                 components: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("pca_mean", torch.zeros(n_in))
        self.register_buffer("pca_basis", torch.zeros(n_in, components))
        self.register_buffer("out_mean", torch.zeros(n_out))
        self.register_buffer("out_std", torch.ones(n_out))
        self.net = nn.Sequential(
            nn.Linear(components, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, n_out))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised targets [B, n_out] of features [B, n_in]."""
        return self.net((feats - self.pca_mean) @ self.pca_basis)

    def targets(self, feats: torch.Tensor) -> torch.Tensor:
        """Targets [B, n_out] in their own units: rotvec (3), free expression, identity."""
        return self(feats) * self.out_std + self.out_mean


class Regressor:
    """The trained regressor with the face model's index bookkeeping; `predict` it."""

    def __init__(self, net: LandmarkRegressor, free: np.ndarray, n_expression: int,
                 device: torch.device | str = "cpu", n_identity: int = 100) -> None:
        self.net = net.to(device).eval()
        self.n_identity = n_identity
        self.free = torch.as_tensor(free, device=device)
        self.n_free = len(free)
        self.n_expression = n_expression
        self.device = torch.device(device)

    def to(self, device: torch.device | str) -> Regressor:
        """This regressor on `device`: itself when it is there already, else a copy (the
        network is copied, never moved in place, so that trackers on other devices sharing
        this one keep theirs)."""
        if torch.device(device) == self.device:
            return self
        return Regressor(copy.deepcopy(self.net), self.free.cpu().numpy(), self.n_expression,
                         device, self.n_identity)

    @torch.no_grad()
    def predict(self, points: torch.Tensor, focal: torch.Tensor,
                principal: torch.Tensor) -> Guess:
        """First guess from landmarks [B, >=468, 2] (pixels), focal [B], principal [B, 2]."""
        dt = self.net.pca_mean.dtype
        pts = points[:, :N_MESH].to(self.device, dt)
        rays = (pts - principal.to(self.device, dt)[:, None]) / focal.to(self.device, dt).view(
            -1, 1, 1)
        feats, rv = features_from_rays(rays)
        out = self.net.targets(feats)
        rot_virtual = axis_angle_to_matrix(out[:, :3])
        rotation = rv.transpose(1, 2) @ rot_virtual
        expr = torch.zeros(pts.shape[0], self.n_expression, device=self.device, dtype=dt)
        expr[:, self.free] = out[:, 3:3 + self.n_free].clamp(0.0, 1.0)
        identity = torch.zeros(pts.shape[0], self.n_identity, device=self.device, dtype=dt)
        identity[:, :N_IDENTITY_GUESS] = out[:, 3 + self.n_free:]
        bad = ~torch.isfinite(out).all(-1)
        if bool(bad.any()):
            rotation[bad] = torch.eye(3, device=self.device, dtype=dt)
            expr[bad] = 0.0
            identity = identity.clone()
            identity[bad] = 0.0
        return Guess(rotation, expr, identity)


# ---- synthetic training data ---------------------------------------------------------------
def _euler(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Head rotation [n, 3, 3] = Ry(yaw) Rx(pitch) Rz(roll), angles [n] in radians."""
    zero = torch.zeros_like(yaw)
    return (axis_angle_to_matrix(torch.stack([zero, yaw, zero], -1))
            @ axis_angle_to_matrix(torch.stack([pitch, zero, zero], -1))
            @ axis_angle_to_matrix(torch.stack([zero, zero, roll], -1)))


def sample_expressions(n: int, names: list[str], gen: torch.Generator) -> torch.Tensor:
    """Random sparse expressions [n, 53] in [0, 1] (eyeLook columns left at 0): each
    coefficient active with probability 0.12 (jawOpen 0.4, blinks 0.2), left/right pairs
    often alike."""
    e = torch.zeros(n, len(names))
    prob = torch.full((len(names),), 0.12)
    for k, name in enumerate(names):
        if name == "jawOpen":
            prob[k] = 0.4
        elif name.startswith("eyeBlink"):
            prob[k] = 0.2
        elif name.startswith("eyeLook"):
            prob[k] = 0.0
    active = torch.rand(n, len(names), generator=gen) < prob
    e = torch.rand(n, len(names), generator=gen) * active
    for k, name in enumerate(names):  # left/right pairs alike half of the time
        if name.endswith("_L") and name[:-2] + "_R" in names:
            j = names.index(name[:-2] + "_R")
            same = torch.rand(n, generator=gen) < 0.5
            e[same, j] = e[same, k]
    return e


def sample_batch(lm: LandmarkModel, n: int, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, 936], targets [n, 3 + n_free + N_IDENTITY_GUESS]) of n random
    synthetic faces."""
    names = lm.expression_names
    ident = torch.randn(n, lm.identity.shape[0], generator=gen)
    expr = sample_expressions(n, names, gen)
    yaw = (torch.rand(n, generator=gen) - 0.5) * 0.8
    pitch = (torch.rand(n, generator=gen) - 0.5) * 0.6
    vergence = torch.rand(n, generator=gen) * 0.06
    gaze = torch.stack([torch.stack([yaw + vergence, pitch], -1),
                        torch.stack([yaw - vergence, pitch], -1)], 1)  # B,2,2
    expr[:, lm.eyelook] = gaze_to_eyelook(gaze)
    pts = lm.points(ident, expr, gaze)[:, :N_MESH]
    pts = pts + 0.08 * torch.randn(pts.shape, generator=gen)  # model mismatch, cm
    u = torch.rand(n, 3, generator=gen) * 2.0 - 1.0
    head = _euler(math.radians(70.0) * u[:, 0], math.radians(40.0) * u[:, 1],
                  math.radians(35.0) * u[:, 2])
    depth = torch.exp(math.log(25.0) + torch.rand(n, generator=gen) * math.log(200.0 / 25.0))
    off = (torch.rand(n, 2, generator=gen) * 2.0 - 1.0) * math.tan(math.radians(25.0))
    trans = torch.cat([off * depth[:, None], depth[:, None]], -1)
    cam = pts @ head.transpose(1, 2) + trans[:, None]
    rays = cam[..., :2] / cam[..., 2:].clamp_min(1.0)
    focal = 300.0 + torch.rand(n, generator=gen) * 1500.0
    noise_px = 0.2 + torch.rand(n, generator=gen) * 1.8
    rays = rays + torch.randn(rays.shape, generator=gen) * (noise_px / focal)[:, None, None]
    feats, rv = features_from_rays(rays)
    target_rot = matrix_to_axis_angle_t(rv @ head)
    return feats, torch.cat([target_rot, expr[:, lm.free], ident[:, :N_IDENTITY_GUESS]], -1)


def train(model: FaceModel | LandmarkModel, settings: RegressorSettings | None = None,
          progress: Callable[[int, int], None] | None = None
          ) -> tuple[LandmarkRegressor, dict[str, float]]:
    """Train on synthetic samples (CPU). Returns (network, report with 'seconds' and
    validation errors 'rotation_deg', 'expression_mae', 'identity_mae').

    progress(done, total): called after each optimiser step (total = epochs x steps per
    epoch) and once before the first (done 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: threads only add overhead (and noise)
    try:
        return _train(model, settings or RegressorSettings(), progress)
    finally:
        torch.set_num_threads(threads)


def _train(model: FaceModel | LandmarkModel, st: RegressorSettings,
           progress: Callable[[int, int], None] | None
           ) -> tuple[LandmarkRegressor, dict[str, float]]:
    lm = model if isinstance(model, LandmarkModel) else LandmarkModel(model)
    lm = lm.to("cpu", torch.float32)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(st.seed)
    torch.manual_seed(st.seed)
    with torch.no_grad():
        chunks = [sample_batch(lm, min(8000, st.samples - i), gen)
                  for i in range(0, st.samples, 8000)]
        x0 = torch.cat([c[0] for c in chunks])
        y0 = torch.cat([c[1] for c in chunks])
        val_x, val_y = sample_batch(lm, 2000, gen)
    net = LandmarkRegressor(x0.shape[1], y0.shape[1], st.components, st.hidden)
    mean = x0.mean(0)
    _, _, vt = torch.linalg.svd(x0[:8000] - mean, full_matrices=False)
    net.pca_mean.copy_(mean)
    net.pca_basis.copy_(vt[:st.components].T)
    net.out_mean.copy_(y0.mean(0))
    net.out_std.copy_(y0.std(0).clamp_min(1e-3))
    yn = (y0 - net.out_mean) / net.out_std
    weights = torch.ones(y0.shape[1])
    weights[:3] = 8.0  # rotation matters most to the fit
    opt = torch.optim.AdamW(net.parameters(), lr=st.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, st.samples // st.batch)
    total = st.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, st.lr, total_steps=total)
    if progress is not None:
        progress(0, total)
    for epoch in range(st.epochs):
        order = torch.randperm(x0.shape[0], generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * st.batch:(i + 1) * st.batch]
            xb = x0[idx]
            # dropped points: a random few percent of each face's points at its centre
            rate = torch.rand(len(idx), 1, generator=gen) * 0.1
            drop = torch.rand(len(idx), N_MESH, generator=gen) < rate
            xb = xb.view(len(idx), N_MESH, 2).masked_fill(drop[..., None], 0.0).view(len(idx), -1)
            loss = (((net(xb) - yn[idx]) ** 2) * weights).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress(epoch * steps_per_epoch + i + 1, total)
        log.debug("regressor epoch %d/%d loss %.4f", epoch + 1, st.epochs, float(loss.detach()))
    net.eval()
    with torch.no_grad():
        pred = net.targets(val_x)
    n_free = len(lm.free)
    rot_err = torch.rad2deg(matrix_to_axis_angle_t(
        axis_angle_to_matrix(pred[:, :3]) @ axis_angle_to_matrix(val_y[:, :3]).transpose(1, 2)).norm(dim=-1))
    report = {
        "seconds": time.perf_counter() - t0,
        "rotation_deg": float(rot_err.median()),
        "expression_mae": float((pred[:, 3:3 + n_free].clamp(0, 1)
                                 - val_y[:, 3:3 + n_free]).abs().mean()),
        "identity_mae": float((pred[:, 3 + n_free:] - val_y[:, 3 + n_free:]).abs().mean()),
        "identity_mae_prior": float(val_y[:, 3 + n_free:].abs().mean()),
    }
    return net, report


# ---- cache ---------------------------------------------------------------------------------
def _model_key(lm: LandmarkModel, settings: RegressorSettings) -> str:
    h = hashlib.sha256()
    for t in (lm.mean, lm.identity, lm.expression):
        h.update(t.detach().cpu().numpy().astype(np.float32).tobytes())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(str(FORMAT).encode())
    return h.hexdigest()[:16]


def cache_path(lm: LandmarkModel, settings: RegressorSettings, home: Path | None = None) -> Path:
    from tracker.assets import dvp_home

    return (home or dvp_home()) / CACHE_NAME / f"regressor-{_model_key(lm, settings)}.npz"


def save(net: LandmarkRegressor, path: Path) -> Path:
    """Write the weights as .npz (aside, then renamed)."""
    arrays = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    arrays["__format__"] = np.asarray(FORMAT)
    arrays["__shape__"] = np.asarray([net.pca_basis.shape[0], net.out_mean.shape[0],
                                      net.pca_basis.shape[1], net.net[0].out_features])
    return save_npz(path, arrays)


def load(path: Path) -> LandmarkRegressor:
    """Read weights written by `save`; RegressorError when damaged or of another format."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if int(arrays.pop("__format__", -1)) != FORMAT:
            raise RegressorError(f"{path}: regressor weights of another format; remove it")
        n_in, n_out, comps, hidden = (int(v) for v in arrays.pop("__shape__"))
        net = LandmarkRegressor(n_in, n_out, comps, hidden)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise RegressorError(f"{path}: damaged regressor weights ({err}); remove it") from err
    return net.eval()


def load_or_train(model: FaceModel | LandmarkModel, settings: RegressorSettings | None = None,
                  home: Path | None = None, device: torch.device | str = "cpu",
                  progress: bool = True) -> Regressor:
    """The cached regressor for this face model and settings; trained (and cached) when
    absent, with a progress bar unless `progress` is False (`dvp assets install` trains the
    default settings' one ahead of time). A damaged cache file is retrained over."""
    st = settings or RegressorSettings()
    lm = model if isinstance(model, LandmarkModel) else LandmarkModel(model)
    path = cache_path(lm, st, home)
    net = None
    if path.is_file():
        try:
            net = load(path)
        except RegressorError as err:
            log.warning("%s; training again", err)
    if net is None:
        log.warning("training the landmark regressor (%d samples, %d epochs; once, cached at "
                    "%s; 'dvp assets install' trains the default one ahead)", st.samples,
                    st.epochs, path)
        with tqdm(desc="regressor", unit="step", leave=False, disable=not progress) as bar:
            def note(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            net, report = train(lm, st, progress=note)
        log.info("regressor trained in %.1f s: %s", report["seconds"], report)
        try:
            save(net, path)
        except OSError as err:
            log.warning("could not cache the regressor at %s: %s", path, err)
    return Regressor(net, lm.free.cpu().numpy(), len(lm.expression_names), device,
                     int(lm.identity.shape[0]))


def settings_from_config(config: object) -> RegressorSettings:
    """RegressorSettings from a TrackerConfig's regressor_* fields."""
    return RegressorSettings(samples=int(getattr(config, "regressor_samples", 24000)),
                             epochs=int(getattr(config, "regressor_epochs", 20)),
                             seed=int(getattr(config, "regressor_seed", 0)))
