"""Export of the generator for inference: ONNX (checked with onnxruntime) and TensorRT.

The ONNX graph takes `window` `[B, 9*N_w, S, S]` float32 (B dynamic) and returns `image`
`[B, 3, S, S]` float32 in [-1, 1] (the network's tanh output; runtimes convert to uint8).
It is the BatchNorm-folded eval network, exported with torch's TorchScript-based exporter
(opset 17; the newer exporter needs `onnxscript`, which the project does not depend on).

Parity check: onnxruntime (CPU) and torch fp32 on the same seeded random window must agree
to `ONNX_TOLERANCE` = 1e-4 in max absolute difference on the [-1, 1] output: 1/80 of one
8-bit level, so both round to the same frame bar rare ties (measured: a few 1e-7).

The TensorRT engine (FP16, batch 1..engine_max_batch, optimised for 1) is built from that
ONNX file with TensorRT's Python API. It is written for users who have TensorRT (>= 10);
it has not run on this project's machines. Engines are specific to a GPU and a TensorRT
version, so `engine/engine.json` records both.

Both records (`onnx.json`, `engine.json`) name the checkpoint exported (`checkpoint`:
`name`, `sha256`): the runtimes refuse an export of another checkpoint (generator.runtime).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from generator.errors import BackendError
from generator.runtime import ENGINE_FILE, ONNX_FILE, export_record, tensorrt_importable
from generator.unet import UNet, fold_batchnorm

log = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17
ONNX_NAME = Path(ONNX_FILE).name
ENGINE_NAME = Path(ENGINE_FILE).name


def _replace_atomically(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    log.info("wrote %s", path)


def export_onnx(model: UNet, path: Path, seed: int = 0) -> float:
    """Write `model` as ONNX to `path` (aside, then renamed) and check it with onnxruntime.

    Returns the max absolute difference from torch fp32 on a seeded random window of batch
    2; raises BackendError when it exceeds ONNX_TOLERANCE (and writes nothing).
    """
    import onnxruntime

    net = fold_batchnorm(model.cpu()).float()
    example = torch.rand(2, model.in_channels, model.size, model.size,
                         generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["window"], output_names=["image"],
                          dynamic_axes={"window": {0: "batch"}, "image": {0: "batch"}})
    try:
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        (got,) = session.run(["image"], {"window": example.numpy()})
        with torch.inference_mode():
            want = net(example).numpy()
        diff = float(np.max(np.abs(got - want)))
        if diff > ONNX_TOLERANCE:
            raise BackendError(f"ONNX export differs from torch by {diff:.2e} (tolerance "
                               f"{ONNX_TOLERANCE:.0e}); nothing written")
        _replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("ONNX parity with torch: max abs difference %.2e", diff)
    return diff


def _write_record(path: Path, record: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(record, indent=2))
    _replace_atomically(tmp, path)


def build_tensorrt_engine(onnx_path: Path, engine_path: Path, max_batch: int = 4,
                          workspace_gib: float = 4.0,
                          checkpoint: dict[str, str] | None = None) -> Path:
    """Build an FP16 TensorRT engine from the ONNX file (batch 1..max_batch, best at 1).

    Writes `engine_path` (aside, then renamed) and `engine.json` beside it (TensorRT
    version, GPU, and `checkpoint`, the record of the checkpoint exported). Raises
    BackendError when TensorRT or CUDA is missing or the build fails.
    """
    if not tensorrt_importable():
        raise BackendError("backend 'tensorrt' is not available: the 'tensorrt' Python "
                           "package is not installed (pip install 'live-dvp[trt]')")
    if not torch.cuda.is_available():
        raise BackendError("backend 'tensorrt' needs a CUDA GPU, and none is available")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")
    shape = tuple(network.get_input(0).shape)[1:]
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape("window", (1, *shape), (1, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path}")
    record = engine_path.parent / "engine.json"
    record.unlink(missing_ok=True)  # no moment where an old record vouches for a new engine
    tmp = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.partial")
    tmp.write_bytes(bytes(serialized))
    _replace_atomically(tmp, engine_path)
    _write_record(record, {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
                           "precision": "fp16", "max_batch": max_batch, "onnx": onnx_path.name,
                           "checkpoint": checkpoint})
    return engine_path


def export(model: UNet, engine_dir: Path, backend: str, max_batch: int = 4,
           checkpoint: Path | None = None) -> Path:
    """`dvp export`: ONNX (checked) into `engine_dir`, and for 'tensorrt' the engine too.

    checkpoint: the file `model` was loaded from, recorded (name, SHA-256) in onnx.json and
    engine.json so that the runtimes can tell a stale export (None records none: such an
    export is refused by `generator.runtime.load_runtime`).
    Returns the path of the file the backend runs (generator.onnx or generator.plan).
    """
    if backend not in ("onnx", "tensorrt"):
        raise BackendError(f"unknown export backend '{backend}': use onnx or tensorrt")
    record = export_record(checkpoint) if checkpoint is not None else None
    onnx_path = engine_dir / ONNX_NAME
    (engine_dir / "onnx.json").unlink(missing_ok=True)
    diff = export_onnx(model, onnx_path)
    _write_record(engine_dir / "onnx.json", {
        "opset": ONNX_OPSET, "max_abs_diff_vs_torch": diff, "tolerance": ONNX_TOLERANCE,
        "shape": model.shape(), "checkpoint": record})
    if backend == "onnx":
        return onnx_path
    return build_tensorrt_engine(onnx_path, engine_dir / ENGINE_NAME, max_batch, checkpoint=record)
