"""Inference runtimes: the CPU backend, exact errors for missing backends, and (GPU) parity."""

import re

import pytest
import torch

from generator.errors import BackendError
from generator.runtime import make_runtime, tensorrt_importable
from generator.samples import to_uint8_image
from generator.unet import UNet

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def calibrated(size=32, ngf=8, device=None):
    """A random U-Net whose BatchNorm statistics match its inputs (as after training)."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    net = UNet(size, 11, ngf).to(device)
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(4, 99, size, size, device=device))
    return net.eval()


def test_cpu_backend_matches_eager_fp32():
    net = calibrated()
    window = torch.rand(3, 99, 32, 32)
    out = make_runtime(net, "cpu", torch.device("cpu"))(window)
    assert out.shape == (3, 32, 32, 3) and out.dtype == torch.uint8
    with torch.no_grad():
        want = to_uint8_image(net(window))
    assert (out.int() - want.int()).abs().max() <= 1


def test_auto_on_the_cpu_is_the_cpu_backend():
    assert make_runtime(calibrated(), "auto", torch.device("cpu")).backend == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_torch_backend_without_cuda_is_an_error_naming_it():
    with pytest.raises(BackendError) as err:
        make_runtime(calibrated(), "torch", torch.device("cpu"))
    assert str(err.value) == "backend 'torch' needs a CUDA GPU, and none is available"


@pytest.mark.skipif(tensorrt_importable(), reason="checks the message where TensorRT is absent")
def test_tensorrt_backend_without_tensorrt_is_an_error_naming_it():
    with pytest.raises(BackendError) as err:
        make_runtime(calibrated(), "tensorrt")
    assert str(err.value) == ("backend 'tensorrt' is not available: the 'tensorrt' Python "
                              "package is not installed (pip install 'live-dvp[trt]')")


def test_unknown_backend():
    with pytest.raises(BackendError) as err:
        make_runtime(calibrated(), "vulkan")
    assert str(err.value) == ("unknown generator backend 'vulkan': use auto, torch, tensorrt, "
                              "onnx, cpu")


def test_onnx_backend_matches_eager_fp32(tmp_path):
    """The `onnx` backend (onnxruntime's CPU provider here) against the network, as the
    `cpu` backend is tested above."""
    from generator.export import export_onnx

    net = calibrated()
    export_onnx(net, tmp_path / "g.onnx")
    runtime = make_runtime(net, "onnx", torch.device("cpu"), onnx=tmp_path / "g.onnx")
    assert runtime.backend == "onnx"
    for batch in (1, 3):
        window = torch.rand(batch, 99, 32, 32)
        out = runtime(window)
        assert out.shape == (batch, 32, 32, 3) and out.dtype == torch.uint8
        with torch.no_grad():
            want = to_uint8_image(net(window))
        assert (out.int() - want.int()).abs().max() <= 1


def test_onnx_backend_without_an_export_is_an_error_naming_it(tmp_path):
    with pytest.raises(BackendError) as err:
        make_runtime(calibrated(), "onnx", torch.device("cpu"), onnx=tmp_path / "g.onnx")
    assert str(err.value) == (f"backend 'onnx' needs the ONNX export, and {tmp_path / 'g.onnx'} "
                              "does not exist: run 'dvp export TDIR --backend onnx'")


def test_onnx_backend_refuses_an_export_of_another_shape(tmp_path):
    from generator.export import export_onnx

    export_onnx(calibrated(size=64), tmp_path / "g.onnx")
    with pytest.raises(BackendError, match=re.escape(
            f"{tmp_path / 'g.onnx'} takes windows of shape ['batch', 99, 64, 64], not "
            "[B, 99, 32, 32]: export it again")):
        make_runtime(calibrated(), "onnx", torch.device("cpu"), onnx=tmp_path / "g.onnx")


def test_wrong_window_is_named():
    runtime = make_runtime(calibrated(), "cpu", torch.device("cpu"))
    with pytest.raises(ValueError, match=re.escape(
            "window must be [B, 99, 32, 32] float32 on cpu, got [1, 90, 32, 32] torch.float32 "
            "on cpu")):
        runtime(torch.rand(1, 90, 32, 32))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("size", [256, 512])
def test_torch_backend_cuda_graph_matches_eager_fp32(size):
    device = torch.device("cuda")
    net = calibrated(size=size, ngf=64, device=device)
    runtime = make_runtime(net, "torch", device)
    assert runtime.backend == "torch"
    torch.manual_seed(1)
    for batch in (1, 2, 1):
        window = torch.rand(batch, 99, size, size, device=device)
        out = runtime(window)
        with torch.no_grad():
            want = to_uint8_image(net(window))
        diff = (out.int() - want.int()).abs()
        assert out.shape == (batch, size, size, 3) and out.device.type == "cuda"
        assert diff.float().mean() < 1.0 and diff.max() <= 16, (diff.float().mean(), diff.max())
    assert sorted(runtime.graphs) == [1, 2]  # one capture per batch shape, replayed after


@pytest.mark.gpu
@needs_cuda
def test_torch_backend_returns_a_fresh_tensor_per_call():
    device = torch.device("cuda")
    runtime = make_runtime(calibrated(device=device), "torch", device)
    a = runtime(torch.zeros(1, 99, 32, 32, device=device))
    a_copy = a.clone()
    runtime(torch.ones(1, 99, 32, 32, device=device))
    assert torch.equal(a, a_copy)


@pytest.mark.gpu
@needs_cuda
def test_onnx_backend_on_cuda_matches_eager_fp32_or_names_the_missing_provider(tmp_path):
    import onnxruntime

    from generator.export import export_onnx

    device = torch.device("cuda")
    net = calibrated(size=64, ngf=16)
    export_onnx(net, tmp_path / "g.onnx")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendError, match="^backend 'onnx' on CUDA needs onnxruntime's "
                                               "CUDAExecutionProvider"):
            make_runtime(net, "onnx", device, onnx=tmp_path / "g.onnx")
        pytest.skip("onnxruntime here has no CUDA provider (the error above is its message)")
    runtime = make_runtime(net.to(device), "onnx", device, onnx=tmp_path / "g.onnx")
    for batch in (1, 2):
        window = torch.rand(batch, 99, 64, 64, device=device)
        out = runtime(window)
        with torch.no_grad():
            want = to_uint8_image(net(window))
        assert out.device.type == "cuda" and out.shape == (batch, 64, 64, 3)
        assert (out.int() - want.int()).abs().max() <= 1
