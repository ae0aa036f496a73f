"""The CUDA kernel's source, compiled as C++ for the CPU (no FMA contraction), gives exactly
the reference's outputs: a check of the kernel's logic on machines without a GPU. The GPU
itself is checked by test_gpu.py (`pytest -m gpu`)."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from renderer.conditioning import Camera, ConditioningRenderer
from renderer.raster_cupy import _SOURCE
from renderer.raster_ref import EMPTY_KEY, rasterize_reference
from tracker.rotation import axis_angle_to_matrix

_SHIM = r"""
#include <cmath>
#include <cstring>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct Dim { unsigned x; };
static Dim blockIdx, threadIdx, blockDim;
static inline float dvp_fabsf(float x) { return std::fabs(x); }
#define fabsf dvp_fabsf
static inline unsigned int __float_as_uint(float f) {
    unsigned int u; std::memcpy(&u, &f, 4); return u;
}
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p; if (v < old) *p = v; return old;
}
"""
_RUNNER = r"""
extern "C" void run(const float* v, const int* t, unsigned long long* keys, int* tri,
                    float* bary, float* depth, int nb, int nv, int nt, int h, int w, int cull,
                    float near_z) {
    blockDim.x = 1;
    for (long long g = 0; g < (long long)nb * nt; ++g) {
        blockIdx.x = (unsigned)g; threadIdx.x = 0;
        dvp_raster_keys(v, t, keys, nb, nv, nt, h, w, cull, near_z);
    }
    for (long long g = 0; g < (long long)nb * h * w; ++g) {
        blockIdx.x = (unsigned)g; threadIdx.x = 0;
        dvp_raster_resolve(v, t, keys, tri, bary, depth, nb, nv, h, w);
    }
}
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernel source for the CPU")
    root = tmp_path_factory.mktemp("kernel")
    (root / "k.cpp").write_text(_SHIM + _SOURCE + _RUNNER)
    subprocess.run([cxx, "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
                    "-o", str(root / "k.so"), str(root / "k.cpp")], check=True)
    lib = ctypes.CDLL(str(root / "k.so"))

    def run(screen, tris, h, w, cull=True, near=1e-2):
        v = np.ascontiguousarray(screen.numpy(), np.float32)
        t = np.ascontiguousarray(tris.numpy(), np.int32)
        b, nv, nt = v.shape[0], v.shape[1], t.shape[0]
        keys = np.full((b, h, w), EMPTY_KEY, np.int64)
        tri = np.empty((b, h, w), np.int32)
        bary = np.empty((b, h, w, 3), np.float32)
        depth = np.empty((b, h, w), np.float32)
        p = ctypes.c_void_p
        lib.run(v.ctypes.data_as(p), t.ctypes.data_as(p), keys.ctypes.data_as(p),
                tri.ctypes.data_as(p), bary.ctypes.data_as(p), depth.ctypes.data_as(p),
                b, nv, nt, h, w, int(cull), ctypes.c_float(near))
        return tri, bary, depth
    return run


def _check(kernel, screen, tris, h, w, cull=True):
    ref = rasterize_reference(screen, tris, h, w, cull_back=cull)
    tri, bary, depth = kernel(screen, tris, h, w, cull)
    assert np.array_equal(ref.triangle.numpy(), tri)
    assert np.array_equal(ref.bary.numpy(), bary)
    assert np.array_equal(ref.depth.numpy(), depth)


@pytest.mark.parametrize("case", ["front", "back", "square", "ties", "perspective", "bad"])
def test_kernel_source_equals_reference_on_hand_made_triangles(kernel, case):
    tri = torch.tensor([[0, 1, 2]])
    cases = {
        "front": ([[[1.0, 1.0, 10.0], [1.0, 7.0, 10.0], [7.0, 1.0, 10.0]]], tri, 8, 8, True),
        "back": ([[[1.0, 1.0, 10.0], [7.0, 1.0, 10.0], [1.0, 7.0, 10.0]]], tri, 8, 8, False),
        "square": ([[[0.0, 0.0, 5.0], [0.0, 8.0, 5.0], [8.0, 8.0, 5.0], [8.0, 0.0, 5.0]]],
                   torch.tensor([[0, 1, 2], [0, 2, 3]]), 8, 8, True),
        "ties": ([[[1.0, 1.0, 10.0], [1.0, 7.0, 10.0], [7.0, 1.0, 10.0]] * 2],
                 torch.tensor([[3, 4, 5], [0, 1, 2]]), 8, 8, True),
        "perspective": ([[[-3.3, 2.1, 20.0], [5.7, 60.2, 40.0], [61.9, 11.4, 30.0]]], tri,
                        64, 48, True),
        "bad": ([[[1.0, 1.0, 10.0], [1.0, float("nan"), 10.0], [7.0, 1.0, 10.0]],
                 [[-1e30, -1e30, 10.0], [-1e30, 1e30, 10.0], [1e30, -1e30, 10.0]],
                 [[1.0, 1.0, -10.0], [1.0, 7.0, -10.0], [7.0, 1.0, -10.0]]], tri, 16, 16,
                True),
    }
    verts, tris, h, w, cull = cases[case]
    _check(kernel, torch.tensor(verts, dtype=torch.float32), tris, h, w, cull)


def test_kernel_source_equals_reference_on_a_face(kernel, face_model):
    size = 96
    r = ConditioningRenderer(face_model, None, size, "cpu")
    from tracker.params import FaceParams
    p = FaceParams.empty(2, face_model.expression_names, (size, size), 2.0 * size)
    rot = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.6, 0.1]])
    f, cx, cy = Camera.of(p).scaled_to(size)
    v = r.vertices(p.identity, p.expression, p.gaze)
    x = v @ axis_angle_to_matrix(rot).transpose(-1, -2) + torch.tensor([0.0, -1.0, 50.0])
    screen = torch.stack([f * x[..., 0] / x[..., 2] + cx, f * x[..., 1] / x[..., 2] + cy,
                          x[..., 2]], -1).contiguous()
    _check(kernel, screen, r._tris, size, size, True)
    _check(kernel, screen, r._tris, size, size, False)
