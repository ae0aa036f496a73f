"""Inference runtimes (DESIGN.md): `runtime(window) -> frame`.

window: `[B, 9*N_w, S, S]` float32 in [0, 1] on the runtime's device; frame: `[B, S, S, 3]`
uint8 RGB on that device (a fresh tensor per call). Backends:

- `cpu`: fp32 on the CPU, BatchNorm folded, channels_last, inference mode.
- `torch`: CUDA, fp16, BatchNorm folded, channels_last, the whole call (cast, network,
  conversion to uint8) captured once per batch size as a CUDA graph and replayed.
- `tensorrt`: CUDA, an FP16 engine built from the ONNX export (`generator.export`), run
  through TensorRT's Python API with torch-owned buffers. Written for users with TensorRT;
  it has not run on this project's machines.
- `onnx`: the ONNX export (fp32) through onnxruntime: its CPU provider on the CPU, its CUDA
  provider on CUDA (onnxruntime-gpu; without it, on CUDA, an error names the provider).
- `auto`: on CUDA `tensorrt` when it imports and an engine is given, else `torch`; on the
  CPU `cpu`. (`onnx` is never chosen by `auto`: the other backends are faster where they run.)

A backend that is asked for and cannot run raises BackendError naming it; nothing falls
back silently.

Exported files go stale when training goes on: `dvp export` records the SHA-256 of the
checkpoint it exported in `engine/engine.json` (TensorRT) and `engine/onnx.json` (ONNX), and
`load_runtime` uses an exported file only when that record names the checkpoint it loads: a
requested `tensorrt` or `onnx` backend with a stale (or unrecorded) file is a BackendError
saying to export again; `auto` leaves a stale engine out with a warning and runs `torch`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from generator.checkpoint import load_generator, require_checkpoint
from generator.errors import BackendError, TargetError
from generator.samples import to_uint8_image
from generator.target import TargetDir, file_sha256
from generator.unet import UNet, fold_batchnorm
from tracker.choices import report_choice

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "tensorrt", "onnx", "cpu")
#: The TensorRT engine of a target directory (written by `dvp export --backend tensorrt`).
ENGINE_FILE = "engine/generator.plan"
#: The ONNX export of a target directory (written by `dvp export`).
ONNX_FILE = "engine/generator.onnx"
#: Per exported kind: its file and the JSON record beside it (which names its checkpoint).
EXPORTS = {"tensorrt": (ENGINE_FILE, "engine/engine.json"),
           "onnx": (ONNX_FILE, "engine/onnx.json")}


class Runtime(Protocol):
    """A callable generator: window `[B, 9*N_w, S, S]` float32 -> `[B, S, S, 3]` uint8."""

    backend: str
    device: torch.device

    def __call__(self, window: torch.Tensor) -> torch.Tensor: ...


def tensorrt_importable() -> bool:
    """True when the `tensorrt` Python package can be imported."""
    return importlib.util.find_spec("tensorrt") is not None


def _check_window(window: torch.Tensor, channels: int, size: int, device: torch.device) -> None:
    if (window.ndim != 4 or tuple(window.shape[1:]) != (channels, size, size)
            or window.dtype != torch.float32 or window.device.type != device.type):
        raise ValueError(
            f"window must be [B, {channels}, {size}, {size}] float32 on {device}, got "
            f"{list(window.shape)} {window.dtype} on {window.device}")


class CpuRuntime:
    """fp32 on the CPU (BatchNorm folded, channels_last)."""

    backend = "cpu"

    def __init__(self, model: UNet) -> None:
        self.device = torch.device("cpu")
        self.model = fold_batchnorm(model).to(self.device, memory_format=torch.channels_last)
        self.channels, self.size = model.in_channels, model.size

    @torch.inference_mode()
    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        _check_window(window, self.channels, self.size, self.device)
        x = window.contiguous(memory_format=torch.channels_last)
        return to_uint8_image(self.model(x))


class TorchRuntime:
    """fp16 channels_last on CUDA, replayed as one CUDA graph per batch size."""

    backend = "torch"

    def __init__(self, model: UNet, device: torch.device) -> None:
        self.device = device
        self.model = fold_batchnorm(model).to(device, torch.float16,
                                              memory_format=torch.channels_last)
        self.channels, self.size = model.in_channels, model.size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _forward(self, window: torch.Tensor) -> torch.Tensor:
        x = window.to(torch.float16, memory_format=torch.channels_last)
        return to_uint8_image(self.model(x))

    @torch.inference_mode()
    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = torch.zeros(batch, self.channels, self.size, self.size, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN picks its kernels outside the capture
                self._forward(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self._forward(static_in)
        log.info("captured a CUDA graph for batch %d at %d px", batch, self.size)
        return graph, static_in, static_out

    @torch.inference_mode()
    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        _check_window(window, self.channels, self.size, self.device)
        batch = window.shape[0]
        if batch not in self.graphs:
            self.graphs[batch] = self._capture(batch)
        graph, static_in, static_out = self.graphs[batch]
        static_in.copy_(window)
        graph.replay()
        return static_out.clone()


class TensorRTRuntime:
    """A serialized TensorRT engine (FP16, fp32 input and output) run on torch buffers."""

    backend = "tensorrt"

    def __init__(self, engine_path: Path, device: torch.device, channels: int, size: int) -> None:
        import tensorrt as trt

        self.device, self.channels, self.size = device, channels, size
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = trt.Runtime(self.trt_logger)  # must outlive the engine
        self.engine = self.trt_runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BackendError(f"backend 'tensorrt' could not load the engine {engine_path} "
                               "(built by another TensorRT version or for another GPU? run "
                               "'dvp export TDIR --backend tensorrt' again)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input, self.output = inputs[0], next(n for n in names if n not in inputs)

    @torch.inference_mode()
    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        _check_window(window, self.channels, self.size, self.device)
        window = window.contiguous()
        self.context.set_input_shape(self.input, tuple(window.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)),
                          dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(self.input, window.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError("backend 'tensorrt' failed to run the engine")
        return to_uint8_image(out)


class OnnxRuntime:
    """The ONNX export through onnxruntime: the CPU provider on the CPU, the CUDA provider
    (with I/O bound to torch's buffers, no host copies) on CUDA."""

    backend = "onnx"

    def __init__(self, onnx_path: Path, device: torch.device, channels: int, size: int) -> None:
        import onnxruntime

        self.device, self.channels, self.size = device, channels, size
        available = onnxruntime.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendError(
                    "backend 'onnx' on CUDA needs onnxruntime's CUDAExecutionProvider, and "
                    f"this onnxruntime has {', '.join(available)} (pip install "
                    "onnxruntime-gpu, or run it with --device cpu)")
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), providers=providers)
        except Exception as err:  # noqa: BLE001  (onnxruntime raises its own kinds)
            raise BackendError(f"backend 'onnx' could not load {onnx_path}: {err}") from None
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        if list(inp.shape[1:]) != [channels, size, size]:
            raise BackendError(f"{onnx_path} takes windows of shape {inp.shape}, not "
                               f"[B, {channels}, {size}, {size}]: export it again")
        self.input, self.output = inp.name, out.name

    @torch.inference_mode()
    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        _check_window(window, self.channels, self.size, self.device)
        window = window.contiguous()
        if self.device.type != "cuda":
            (image,) = self.session.run([self.output], {self.input: window.numpy()})
            return to_uint8_image(torch.from_numpy(image))
        index = self.device.index or 0
        image_t = torch.empty(window.shape[0], 3, self.size, self.size, device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(self.input, "cuda", index, np.float32, tuple(window.shape),
                           window.data_ptr())
        binding.bind_output(self.output, "cuda", index, np.float32, tuple(image_t.shape),
                            image_t.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the window is written
        self.session.run_with_iobinding(binding)
        return to_uint8_image(image_t)


def make_runtime(model: UNet, backend: str = "auto", device: torch.device | None = None,
                 engine: Path | None = None, onnx: Path | None = None) -> Runtime:
    """A runtime of `model` (an eval-mode copy; `model` is left as it is) on `device`
    (default: CUDA if present).

    engine: the TensorRT engine file (needed by `tensorrt`; lets `auto` choose it).
    onnx: the ONNX export (needed by `onnx`). These files are taken as they are: checking
    that they were exported from `model` is `load_runtime`'s work.
    Raises BackendError when the backend is unknown or cannot run here.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown generator backend '{backend}': use "
                           + ", ".join(BACKENDS))
    cuda = torch.cuda.is_available()
    device = device or torch.device("cuda" if cuda else "cpu")
    if backend == "auto":
        if device.type != "cuda":
            backend, why = "cpu", (f"fp32 on {device}; 'torch' (fp16, CUDA graphs) and "
                                   "'tensorrt' need a CUDA device")
        elif tensorrt_importable() and engine is not None and engine.is_file():
            backend, why = "tensorrt", f"FP16 engine {engine}"
        elif not tensorrt_importable():
            backend, why = "torch", ("fp16 CUDA graphs; 'tensorrt' not used: TensorRT "
                                     "absent (pip install 'live-dvp[trt]', then 'dvp "
                                     "export TDIR --backend tensorrt')")
        else:
            backend, why = "torch", ("fp16 CUDA graphs; 'tensorrt' not used: no engine "
                                     "(run 'dvp export TDIR --backend tensorrt')")
        report_choice("generator runtime", backend, why)
    if backend == "cpu":
        if device.type != "cpu":
            raise BackendError(f"backend 'cpu' runs on the CPU, not on {device}")
        return CpuRuntime(model)
    if backend == "onnx":
        if onnx is None or not onnx.is_file():
            raise BackendError(f"backend 'onnx' needs the ONNX export, and {onnx} does not "
                               "exist: run 'dvp export TDIR --backend onnx'")
        return OnnxRuntime(onnx, device, model.in_channels, model.size)
    if backend == "tensorrt" and not tensorrt_importable():
        raise BackendError("backend 'tensorrt' is not available: the 'tensorrt' Python "
                           "package is not installed (pip install 'live-dvp[trt]')")
    if not cuda or device.type != "cuda":
        raise BackendError(f"backend '{backend}' needs a CUDA GPU, and none is available"
                           if not cuda else f"backend '{backend}' runs on CUDA, not on {device}")
    if backend == "torch":
        return TorchRuntime(model, device)
    if engine is None or not engine.is_file():
        raise BackendError(f"backend 'tensorrt' needs an engine file, and {engine} does not "
                           "exist: run 'dvp export TDIR --backend tensorrt'")
    return TensorRTRuntime(engine, device, model.in_channels, model.size)


def export_record(checkpoint: Path) -> dict[str, str]:
    """What `dvp export` records of the checkpoint it exports: `name` and `sha256`."""
    return {"name": checkpoint.name, "sha256": file_sha256(checkpoint)}


def stale_export(root: Path, kind: str, checkpoint: Path, digest: str) -> str | None:
    """Why the exported file of `kind` ('tensorrt' or 'onnx') in target `root` must not run
    `checkpoint` (whose SHA-256 is `digest`), or None when its record names that checkpoint
    (or when there is no such file)."""
    name, record_name = EXPORTS[kind]
    path, record = root / name, root / record_name
    if not path.is_file():
        return None
    again = f"run 'dvp export {root} --backend {kind}' again"
    try:
        recorded = json.loads(record.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return (f"{path} does not record the checkpoint it was exported from ({record} has "
                f"no 'checkpoint'), so it may run an older network than {checkpoint.name}: "
                f"{again}")
    if recorded["sha256"] != digest:
        return (f"{path} was exported from {recorded.get('name', 'another checkpoint')} "
                f"(sha256 {recorded['sha256'][:12]}), not from the latest checkpoint "
                f"{checkpoint.name} (sha256 {digest[:12]}): {again}")
    return None


def load_runtime(target: TargetDir, backend: str = "auto",
                 device: torch.device | None = None) -> Runtime:
    """The runtime of a target's newest checkpoint, with its TensorRT engine or ONNX export
    when exported from that very checkpoint (see the module doc on stale exports).

    Raises CheckpointError when the target has no checkpoint, TargetError when its network
    does not fit the target's resolution and window, BackendError as `make_runtime` and for
    a requested backend whose exported file is stale.
    """
    cuda = torch.cuda.is_available()
    device = device or torch.device("cuda" if cuda else "cpu")
    root = target.root
    path = require_checkpoint(root / "checkpoints")
    model = load_generator(path, device)
    size, n_w = target.info.resolution, target.info.window
    if (model.size, model.n_w) != (size, n_w):
        raise TargetError(f"{path} holds a generator for {model.size} px and a window of "
                          f"{model.n_w}, but the target is {size} px with a window of {n_w}")
    files: dict[str, Path | None] = {}
    digest = ""
    for kind, (name, _) in EXPORTS.items():
        file = root / name
        wanted = backend == kind or (backend == "auto" and kind == "tensorrt"
                                     and device.type == "cuda" and tensorrt_importable())
        if not wanted or not file.is_file():
            files[kind] = file if backend == kind else None
            continue
        digest = digest or file_sha256(path)
        why = stale_export(root, kind, path, digest)
        if why is not None and backend == kind:
            raise BackendError(f"backend '{kind}' refuses a stale export: {why}")
        if why is not None:
            log.warning("generator backend 'auto' leaves out a stale engine and runs 'torch': "
                        "%s", why)
        files[kind] = None if why is not None else file
    runtime = make_runtime(model, backend, device, engine=files["tensorrt"], onnx=files["onnx"])
    log.info("generator %s on %s (backend %s)", path.name, device, runtime.backend)
    return runtime
