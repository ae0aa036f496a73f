"""Spherical-harmonics lighting (DESIGN.md, "Lighting").

`FaceParams.sh` is `(T, 9, 3)`: for each RGB channel the 9 real SH coefficients L_lm
(bands 0-2) of the incident radiance, as a function of the unit normal in camera space
(OpenCV axes: x right, y down, z forward, away from the viewer). Coefficient order:

    k:   0     1     2     3     4      5      6            7      8
    Y:   1     y     z     x     xy     yz     3z^2 - 1     xz     x^2 - y^2
         (l, m) = (0,0) (1,-1) (1,0) (1,1) (2,-2) (2,-1) (2,0) (2,1) (2,2)

with the usual normalisation (Y_00 = 0.282095, ...). The irradiance is Ramamoorthi and
Hanrahan's `E(n) = sum_lm A_l L_lm Y_lm(n)` with `A_0 = pi, A_1 = 2 pi / 3, A_2 = pi / 4`,
and the rendered colour is `albedo * E` (image values in [0, 1]). So `L_00 = 1 / 0.886227`
alone gives irradiance 1 everywhere (FaceParams.empty's ambient white light), and a
directional light of intensity I from direction d (unit, pointing to the light) has
`L_lm = I Y_lm(d)`, whose irradiance approximates `I max(0, n . d)`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Normalisation constants of the real SH basis, in the order above.
_Y = (0.282095, 0.488603, 0.488603, 0.488603, 1.092548, 1.092548, 0.315392, 1.092548,
      0.546274)
#: Ramamoorthi-Hanrahan convolution constants A_l per coefficient.
_A = (math.pi,) + (2.0 * math.pi / 3.0,) * 3 + (math.pi / 4.0,) * 5
#: A_l * Y normalisation: the irradiance basis' constants.
IRRADIANCE_CONSTANTS = tuple(a * y for a, y in zip(_A, _Y))
#: L_00 of ambient light of irradiance 1.
AMBIENT_L00 = 1.0 / IRRADIANCE_CONSTANTS[0]


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """Real SH basis `Y_lm(n)` `[..., 9]` of unit normals `[..., 3]`."""
    x, y, z = normals.unbind(-1)
    one = torch.ones_like(x)
    terms = (one, y, z, x, x * y, y * z, 3.0 * z * z - 1.0, x * z, x * x - y * y)
    return torch.stack([c * t for c, t in zip(_Y, terms)], -1)


def irradiance_basis(normals: torch.Tensor) -> torch.Tensor:
    """`A_l Y_lm(n)` `[..., 9]`: irradiance = irradiance_basis(n) @ sh `[9, 3]`."""
    x, y, z = normals.unbind(-1)
    one = torch.ones_like(x)
    terms = (one, y, z, x, x * y, y * z, 3.0 * z * z - 1.0, x * z, x * x - y * y)
    return torch.stack([c * t for c, t in zip(IRRADIANCE_CONSTANTS, terms)], -1)


def irradiance(normals: torch.Tensor, sh: torch.Tensor) -> torch.Tensor:
    """RGB irradiance `[..., 3]` of unit normals `[..., 3]` under `sh` `[..., 9, 3]`
    (broadcast against the normals' leading axes)."""
    return (irradiance_basis(normals)[..., None] * sh).sum(-2)


def ambient_sh(level: float = 1.0, colour: tuple[float, float, float] = (1.0, 1.0, 1.0)
               ) -> np.ndarray:
    """`(9, 3)` coefficients of uniform light of irradiance `level * colour`."""
    sh = np.zeros((9, 3), np.float32)
    sh[0] = AMBIENT_L00 * level * np.asarray(colour, np.float32)
    return sh


def directional_sh(direction: np.ndarray, intensity: float | np.ndarray = 1.0) -> np.ndarray:
    """`(9, 3)` coefficients of a distant light toward `direction` (camera space, pointing
    from the surface to the light; normalised here) of RGB `intensity`."""
    d = np.asarray(direction, np.float64)
    d = d / np.linalg.norm(d)
    basis = sh_basis(torch.from_numpy(d)).numpy()  # 9
    rgb = np.broadcast_to(np.asarray(intensity, np.float64), (3,))
    return (basis[:, None] * rgb[None, :]).astype(np.float32)
