"""ONNX export checked against torch with onnxruntime; the TensorRT engine where it exists."""

import json

import numpy as np
import onnxruntime
import pytest
import torch

from generator.errors import BackendError
from generator.export import ONNX_TOLERANCE, export, export_onnx
from generator.runtime import make_runtime, tensorrt_importable
from generator.samples import to_uint8_image
from generator.unet import UNet


def trained_like(size=32):
    torch.manual_seed(0)
    net = UNet(size, 11, 8)
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(4, 99, size, size))
    return net.eval()


def test_onnx_matches_torch_within_tolerance(tmp_path):
    net = trained_like()
    diff = export_onnx(net, tmp_path / "g.onnx")
    assert diff <= ONNX_TOLERANCE == 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "g.onnx"),
                                           providers=["CPUExecutionProvider"])
    window = torch.rand(3, 99, 32, 32)  # another batch size: the batch axis is dynamic
    (got,) = session.run(["image"], {"window": window.numpy()})
    with torch.no_grad():
        want = net(window).numpy()
    assert np.abs(got - want).max() <= ONNX_TOLERANCE
    assert torch.equal(to_uint8_image(torch.from_numpy(got)), to_uint8_image(torch.from_numpy(want)))
    assert [p.name for p in tmp_path.iterdir()] == ["g.onnx"]  # no partial file left


def test_export_onnx_writes_its_report(tmp_path):
    path = export(trained_like(), tmp_path, "onnx")
    assert path == tmp_path / "generator.onnx"
    report = json.loads((tmp_path / "onnx.json").read_text())
    assert report["tolerance"] == ONNX_TOLERANCE and report["max_abs_diff_vs_torch"] <= 1e-4
    assert report["shape"] == {"size": 32, "n_w": 11, "ngf": 8}


def test_unknown_export_backend(tmp_path):
    with pytest.raises(BackendError, match="^unknown export backend 'coreml': use onnx or tensorrt$"):
        export(trained_like(), tmp_path, "coreml")


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_importable() or not torch.cuda.is_available(),
                    reason="needs the tensorrt package and a CUDA GPU")
def test_tensorrt_engine_matches_torch(tmp_path):
    device = torch.device("cuda")
    net = trained_like(64)
    engine = export(net, tmp_path, "tensorrt", max_batch=2)
    runtime = make_runtime(net.to(device), "tensorrt", device, engine)
    assert make_runtime(net, "auto", device, engine).backend == "tensorrt"
    window = torch.rand(2, 99, 64, 64, device=device)
    with torch.no_grad():
        want = to_uint8_image(net(window))
    diff = (runtime(window).int() - want.int()).abs()
    assert diff.float().mean() < 1.0 and diff.max() <= 16
