"""Vertex normals summed in a fixed order (tracker.geometry.vertex_normals)."""

from __future__ import annotations

import pytest
import torch

from tracker.geometry import face_incidence, vertex_normals


def grid_mesh(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A bumpy n x n grid: vertices [1, n*n, 3], triangles [2 (n-1)^2, 3]."""
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float32),
                            torch.arange(n, dtype=torch.float32), indexing="ij")
    z = 0.3 * torch.sin(xx) * torch.cos(0.7 * yy)
    vertices = torch.stack([xx, yy, z], -1).reshape(1, -1, 3)
    tris = []
    for r in range(n - 1):
        for c in range(n - 1):
            v = r * n + c
            tris += [[v, v + 1, v + n], [v + 1, v + n + 1, v + n]]
    return vertices, torch.tensor(tris)


def test_the_incidence_steps_pair_each_vertex_with_each_of_its_faces_once_in_order() -> None:
    vertices, tris = grid_mesh()
    steps = face_incidence(tris, vertices.shape[1])
    seen: dict[int, list[int]] = {}
    for rows, faces in steps:
        assert len(set(rows.tolist())) == len(rows)  # one face per vertex per step
        for v, f in zip(rows.tolist(), faces.tolist()):
            seen.setdefault(v, []).append(f)
    expected: dict[int, list[int]] = {}
    for f, tri in enumerate(tris.tolist()):
        for v in tri:
            expected.setdefault(v, []).append(f)
    assert seen == {v: sorted(fs) for v, fs in expected.items()}
    assert face_incidence(tris, vertices.shape[1]) is steps  # made once


def test_summing_by_steps_equals_summing_all_faces_at_once() -> None:
    vertices, tris = grid_mesh()
    a, b, c = (vertices.index_select(-2, tris[:, k]) for k in range(3))
    fn = torch.cross(b - a, c - a, dim=-1)
    stepwise = torch.zeros_like(vertices)
    for rows, faces in face_incidence(tris, vertices.shape[1]):
        stepwise.index_add_(-2, rows, fn.index_select(-2, faces))
    stepwise = stepwise / stepwise.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(stepwise, vertex_normals(vertices, tris), atol=1e-6, rtol=0)
    assert float(vertex_normals(vertices, tris)[0, 0, 2]) > 0.5  # +z, up out of the grid


@pytest.mark.gpu
def test_cuda_normals_are_the_same_every_run_and_match_the_cpu(face_model) -> None:  # type: ignore[no-untyped-def]
    tris = face_model._tensors(torch.device("cuda"))["triangles"]
    torch.manual_seed(0)
    vertices = torch.randn(16, int(tris.max()) + 1, 3, device="cuda")
    first = vertex_normals(vertices, tris)
    for _ in range(5):
        assert torch.equal(vertex_normals(vertices, tris), first)
    cpu = vertex_normals(vertices.cpu(), tris.cpu())
    torch.testing.assert_close(first.cpu(), cpu, atol=1e-4, rtol=0)
