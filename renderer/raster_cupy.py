"""The GPU rasterizer: a CuPy RawModule with exactly the conventions of `raster_ref`.

Two kernels, batched over frames:

1. `dvp_raster_keys`, one thread per (frame, triangle): the triangle set-up and bounding box
   of `raster_ref`, then every pixel centre of the box is tested with the same edge
   functions and the key `(float32 bits of depth) << 32 | triangle id` is reduced into the
   pixel with a 64-bit `atomicMin` (nearest wins, then the lower id: deterministic).
2. `dvp_raster_resolve`, one thread per pixel: the winner's perspective-correct
   barycentrics and depth, recomputed with the same formulas.

Every float operation is the reference's, in the same order, compiled with `--fmad=false`
(no fused multiply-adds) and IEEE division, so for the same input the outputs match the
reference bit for bit in all but pathological cases.

Outputs are torch tensors allocated by torch's caching allocator on the input's device;
the kernels see them through DLPack (`cupy.from_dlpack`, zero-copy) and run on torch's
current stream, so no copies and no synchronisation are added. CuPy is imported lazily:
this module imports on a machine without it; `rasterize_cupy` then raises RasterError.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from renderer.raster_ref import (
    EMPTY_KEY,
    NEAR,
    Raster,
    RasterError,
    check_inputs,
    check_triangle_ids,
    empty_raster,
)

_BLOCK = 256

_SOURCE = r"""
#define DVP_FLT_MAX 3.402823466e+38f

__device__ __forceinline__ bool dvp_finite(float x) { return fabsf(x) <= DVP_FLT_MAX; }

// cross(q - p, xy - p), evaluated from the lower vertex id, negated for the other direction
__device__ __forceinline__ float dvp_edge(float pu, float pv, int pid, float qu, float qv,
                                          int qid, float x, float y) {
    if (pid < qid) {
        return (qu - pu) * (y - pv) - (qv - pv) * (x - pu);
    }
    return -((pu - qu) * (y - qv) - (pv - qv) * (x - qu));
}

struct DvpTri {
    float u0, v0, z0, u1, v1, z1, u2, v2, z2;
    int i0, i1, i2;
};

__device__ __forceinline__ DvpTri dvp_load(const float* __restrict__ verts,
                                           const int* __restrict__ tris, long long b, int f,
                                           int n_vert) {
    DvpTri t;
    t.i0 = tris[3 * (long long)f];
    t.i1 = tris[3 * (long long)f + 1];
    t.i2 = tris[3 * (long long)f + 2];
    const float* vb = verts + b * (long long)n_vert * 3;
    t.u0 = vb[3 * (long long)t.i0]; t.v0 = vb[3 * (long long)t.i0 + 1];
    t.z0 = vb[3 * (long long)t.i0 + 2];
    t.u1 = vb[3 * (long long)t.i1]; t.v1 = vb[3 * (long long)t.i1 + 1];
    t.z1 = vb[3 * (long long)t.i1 + 2];
    t.u2 = vb[3 * (long long)t.i2]; t.v2 = vb[3 * (long long)t.i2 + 1];
    t.z2 = vb[3 * (long long)t.i2 + 2];
    return t;
}

// coverage and perspective-correct weights at pixel centre (x, y), as raster_ref.pixel_weights
__device__ __forceinline__ bool dvp_weights(const DvpTri& t, bool area_positive, float x,
                                            float y, float* b0, float* b1, float* b2,
                                            float* depth) {
    float e0 = dvp_edge(t.u1, t.v1, t.i1, t.u2, t.v2, t.i2, x, y);
    float e1 = dvp_edge(t.u2, t.v2, t.i2, t.u0, t.v0, t.i0, x, y);
    float e2 = dvp_edge(t.u0, t.v0, t.i0, t.u1, t.v1, t.i1, x, y);
    float total = (e0 + e1) + e2;
    bool inside;
    if (area_positive) {
        inside = (e0 >= 0.0f) && (e1 >= 0.0f) && (e2 >= 0.0f) && (total > 0.0f);
    } else {
        inside = (e0 <= 0.0f) && (e1 <= 0.0f) && (e2 <= 0.0f) && (total < 0.0f);
    }
    if (!inside) return false;
    float q0 = (e0 / total) / t.z0;
    float q1 = (e1 / total) / t.z1;
    float q2 = (e2 / total) / t.z2;
    float qs = (q0 + q1) + q2;
    *b0 = q0 / qs;
    *b1 = q1 / qs;
    *b2 = q2 / qs;
    *depth = 1.0f / qs;
    return true;
}

extern "C" __global__ void dvp_raster_keys(
    const float* __restrict__ verts, const int* __restrict__ tris,
    unsigned long long* __restrict__ keys, int n_batch, int n_vert, int n_tri, int height,
    int width, int cull_back, float near_z) {
    long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= (long long)n_batch * n_tri) return;
    long long b = gid / n_tri;
    int f = (int)(gid - b * n_tri);
    DvpTri t = dvp_load(verts, tris, b, f, n_vert);
    if (!(dvp_finite(t.u0) && dvp_finite(t.u1) && dvp_finite(t.u2) && dvp_finite(t.v0)
          && dvp_finite(t.v1) && dvp_finite(t.v2) && dvp_finite(t.z0) && dvp_finite(t.z1)
          && dvp_finite(t.z2))) return;
    if (!(t.z0 > near_z && t.z1 > near_z && t.z2 > near_z)) return;
    float area2 = (t.u1 - t.u0) * (t.v2 - t.v0) - (t.u2 - t.u0) * (t.v1 - t.v0);
    if (area2 == 0.0f) return;
    if (cull_back && area2 > 0.0f) return;
    bool area_positive = area2 > 0.0f;
    float umin = fminf(fminf(t.u0, t.u1), t.u2), umax = fmaxf(fmaxf(t.u0, t.u1), t.u2);
    float vmin = fminf(fminf(t.v0, t.v1), t.v2), vmax = fmaxf(fmaxf(t.v0, t.v1), t.v2);
    int jlo = (int)fminf(fmaxf(ceilf(umin - 0.5f), 0.0f), (float)width);
    int jhi = (int)fminf(fmaxf(floorf(umax - 0.5f), -1.0f), (float)(width - 1));
    int ilo = (int)fminf(fmaxf(ceilf(vmin - 0.5f), 0.0f), (float)height);
    int ihi = (int)fminf(fmaxf(floorf(vmax - 0.5f), -1.0f), (float)(height - 1));
    unsigned long long* kb = keys + b * (long long)height * width;
    for (int i = ilo; i <= ihi; ++i) {
        float y = (float)i + 0.5f;
        for (int j = jlo; j <= jhi; ++j) {
            float x = (float)j + 0.5f;
            float b0, b1, b2, depth;
            if (!dvp_weights(t, area_positive, x, y, &b0, &b1, &b2, &depth)) continue;
            unsigned long long key =
                ((unsigned long long)__float_as_uint(depth) << 32) | (unsigned int)f;
            atomicMin(kb + (long long)i * width + j, key);
        }
    }
}

extern "C" __global__ void dvp_raster_resolve(
    const float* __restrict__ verts, const int* __restrict__ tris,
    const unsigned long long* __restrict__ keys, int* __restrict__ tri_out,
    float* __restrict__ bary_out, float* __restrict__ depth_out, int n_batch, int n_vert,
    int height, int width) {
    long long pix = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long plane = (long long)height * width;
    if (pix >= (long long)n_batch * plane) return;
    unsigned long long key = keys[pix];
    if (key == 0x7FFFFFFFFFFFFFFFull) {
        tri_out[pix] = -1;
        bary_out[3 * pix] = 0.0f; bary_out[3 * pix + 1] = 0.0f; bary_out[3 * pix + 2] = 0.0f;
        depth_out[pix] = 0.0f;
        return;
    }
    int f = (int)(key & 0xFFFFFFFFull);
    long long b = pix / plane;
    long long rem = pix - b * plane;
    int i = (int)(rem / width);
    int j = (int)(rem - (long long)i * width);
    DvpTri t = dvp_load(verts, tris, b, f, n_vert);
    float area2 = (t.u1 - t.u0) * (t.v2 - t.v0) - (t.u2 - t.u0) * (t.v1 - t.v0);
    float b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, depth = 0.0f;
    dvp_weights(t, area2 > 0.0f, (float)j + 0.5f, (float)i + 0.5f, &b0, &b1, &b2, &depth);
    tri_out[pix] = f;
    bary_out[3 * pix] = b0; bary_out[3 * pix + 1] = b1; bary_out[3 * pix + 2] = b2;
    depth_out[pix] = depth;
}
"""

_MODULES: dict[int, Any] = {}


def cupy_available() -> bool:
    """Whether CuPy imports and sees a CUDA device."""
    try:
        import cupy
        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # noqa: BLE001 - ImportError, or a CUDA runtime without a device
        return False


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as err:
        raise RasterError("the 'cupy' rasterizer needs CuPy: pip install 'live-dvp[gpu]' "
                          f"(cupy-cuda12x or cupy-cuda13x) ({err})") from err
    return cupy


def _kernels(cupy: Any, device_index: int) -> tuple[Any, Any]:
    module = _MODULES.get(device_index)
    if module is None:
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=_SOURCE, options=("--fmad=false", "--std=c++11"))
            module.compile()
        _MODULES[device_index] = module
    return module.get_function("dvp_raster_keys"), module.get_function("dvp_raster_resolve")


def _blocks(n: int) -> int:
    return (n + _BLOCK - 1) // _BLOCK


def rasterize_cupy(screen: torch.Tensor, triangles: torch.Tensor, height: int, width: int,
                   cull_back: bool = True, near: float = NEAR,
                   trusted_triangles: bool = False) -> Raster:
    """Rasterize B frames on the GPU; same arguments, conventions and outputs as
    `raster_ref.rasterize_reference` (tensors on the input's CUDA device).

    The vertex ids of `triangles` are checked (a device synchronisation) unless
    `trusted_triangles` says the caller checked them once (per-target constants).
    """
    check_inputs(screen, triangles, height, width)
    if screen.device.type != "cuda":
        raise RasterError(f"the 'cupy' rasterizer needs CUDA tensors, got {screen.device}")
    height, width = int(height), int(width)
    batch, n_vert = int(screen.shape[0]), int(screen.shape[1])
    n_tri = int(triangles.shape[0])
    if batch == 0 or n_tri == 0:
        return empty_raster(batch, height, width, screen.device)
    if not trusted_triangles:
        check_triangle_ids(triangles, n_vert)
    cupy = _import_cupy()
    device = screen.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    verts = screen.detach().contiguous()
    tris = triangles.detach().to(torch.int32).contiguous()
    keys = torch.full((batch, height, width), EMPTY_KEY, dtype=torch.int64, device=device)
    out = empty_raster(batch, height, width, device)
    keys_kernel, resolve_kernel = _kernels(cupy, index)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, index)
    with cupy.cuda.Device(index), stream:
        c_verts = cupy.from_dlpack(verts)
        c_tris = cupy.from_dlpack(tris)
        c_keys = cupy.from_dlpack(keys)
        keys_kernel(
            (_blocks(batch * n_tri),), (_BLOCK,),
            (c_verts, c_tris, c_keys, np.int32(batch), np.int32(n_vert), np.int32(n_tri),
             np.int32(height), np.int32(width), np.int32(1 if cull_back else 0),
             np.float32(near)))
        resolve_kernel(
            (_blocks(batch * height * width),), (_BLOCK,),
            (c_verts, c_tris, c_keys, cupy.from_dlpack(out.triangle),
             cupy.from_dlpack(out.bary), cupy.from_dlpack(out.depth), np.int32(batch),
             np.int32(n_vert), np.int32(height), np.int32(width)))
    return out
