"""A TensorFlow Lite model file run as torch modules: the graph is parsed with the `tflite`
flatbuffer package and every operator becomes a torch module, batched (the file's batch of 1
becomes any B), on any device and in float32 or float16.

Covers what MediaPipe's face models use: CONV_2D, DEPTHWISE_CONV_2D, PRELU, RELU, ADD, MUL,
MAX_POOL_2D, PAD, RESHAPE, CONCATENATION, STRIDED_SLICE, DEQUANTIZE (of float16 constants,
done once at load time), and MediaPipe's custom operators of
`face_landmark_with_attention.tflite` (Landmarks2TransformMatrix, TransformTensorBilinear,
TransformLandmarks, version 2, as in mediapipe/util/tflite/operations/). An operator outside
this list fails at load time with its name.

Layout: 4-D activations run as NCHW (torch's convolution layout); the model's input is given
as NCHW `(B, C, H, W)` and 4-D outputs come back in the file's NHWC order, so every output
has the file's shape with B in front. Operators whose meaning depends on the axis order
(RESHAPE, CONCATENATION, PAD, STRIDED_SLICE) translate it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tracker.errors import DvpError


class ModelFileError(DvpError):
    """A .tflite file that cannot be read or holds an operator this port lacks."""


@dataclass(frozen=True)
class TFLiteTensor:
    """One tensor of the file: name, shape (the file's, batch 1), numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class TFLiteOp:
    """One operator: `kind` (builtin name or 'CUSTOM:Name'), tensor indices, options."""

    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TFLiteGraph:
    """A parsed .tflite subgraph: tensors, constant data (float16 constants dequantized to
    float32), operators in execution order, input and output tensor indices."""

    tensors: list[TFLiteTensor]
    constants: dict[int, np.ndarray]
    ops: list[TFLiteOp]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def output_names(self) -> list[str]:
        return [self.tensors[i].name for i in self.outputs]


_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
_ACTIVATIONS = {0: None, 1: "relu", 3: "relu6"}


def _builtin_names() -> dict[int, str]:
    from tflite.BuiltinOperator import BuiltinOperator

    return {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}


def _options(op: Any, kind: str) -> dict[str, Any]:
    """The builtin options of `op` that the torch modules need, as a plain dict."""
    import tflite

    table = op.BuiltinOptions()
    if table is None:
        return {}

    def read(cls: type) -> Any:
        obj = cls()
        obj.Init(table.Bytes, table.Pos)
        return obj

    if kind == "CONV_2D":
        o = read(tflite.Conv2DOptions)
        return {"padding": o.Padding(), "stride": (o.StrideH(), o.StrideW()),
                "dilation": (o.DilationHFactor(), o.DilationWFactor()),
                "activation": o.FusedActivationFunction()}
    if kind == "DEPTHWISE_CONV_2D":
        o = read(tflite.DepthwiseConv2DOptions)
        return {"padding": o.Padding(), "stride": (o.StrideH(), o.StrideW()),
                "dilation": (o.DilationHFactor(), o.DilationWFactor()),
                "activation": o.FusedActivationFunction(), "multiplier": o.DepthMultiplier()}
    if kind == "MAX_POOL_2D":
        o = read(tflite.Pool2DOptions)
        return {"padding": o.Padding(), "stride": (o.StrideH(), o.StrideW()),
                "kernel": (o.FilterHeight(), o.FilterWidth()),
                "activation": o.FusedActivationFunction()}
    if kind in ("ADD", "MUL"):
        o = read(tflite.AddOptions if kind == "ADD" else tflite.MulOptions)
        return {"activation": o.FusedActivationFunction()}
    if kind == "CONCATENATION":
        o = read(tflite.ConcatenationOptions)
        return {"axis": o.Axis(), "activation": o.FusedActivationFunction()}
    if kind == "RESHAPE":
        o = read(tflite.ReshapeOptions)
        return {"new_shape": tuple(int(v) for v in o.NewShapeAsNumpy())} \
            if o.NewShapeLength() else {}
    if kind == "STRIDED_SLICE":
        o = read(tflite.StridedSliceOptions)
        return {"begin_mask": o.BeginMask(), "end_mask": o.EndMask(),
                "shrink_axis_mask": o.ShrinkAxisMask(), "ellipsis_mask": o.EllipsisMask(),
                "new_axis_mask": o.NewAxisMask()}
    return {}


def read_tflite(path: str | Path) -> TFLiteGraph:
    """Parse the first subgraph of a .tflite file (float models). Raises ModelFileError
    naming the file when it is missing or not a TFLite flatbuffer."""
    import tflite
    from flatbuffers import flexbuffers

    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read the model file {path}: {err.strerror}") from err
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ModelFileError(f"{path} is not a TensorFlow Lite model (no TFL3 identifier)")
    model = tflite.Model.GetRootAsModel(buf, 0)
    names = _builtin_names()
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if names.get(code) == "CUSTOM":
            codes.append(("CUSTOM:" + oc.CustomCode().decode(), oc.Version()))
        else:
            codes.append((names.get(code, str(code)), oc.Version()))
    g = model.Subgraphs(0)
    tensors, constants = [], {}
    for i in range(g.TensorsLength()):
        t = g.Tensors(i)
        dtype = _TYPES.get(t.Type())
        if dtype is None:
            raise ModelFileError(f"{path}: tensor {t.Name().decode()} has unsupported "
                                 f"type {t.Type()}")
        shape = tuple(int(v) for v in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        tensors.append(TFLiteTensor(t.Name().decode(), shape, np.dtype(dtype)))
        data = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() else 0
        if not isinstance(data, int) and data.size:
            constants[i] = np.frombuffer(data.tobytes(), dtype).reshape(shape).copy()
    ops = []
    for i in range(g.OperatorsLength()):
        op = g.Operators(i)
        kind, version = codes[op.OpcodeIndex()]
        ins = tuple(int(v) for v in op.InputsAsNumpy())
        outs = tuple(int(v) for v in op.OutputsAsNumpy())
        if kind == "DEQUANTIZE" and ins[0] in constants:
            constants[outs[0]] = constants[ins[0]].astype(np.float32)
            continue
        if kind.startswith("CUSTOM:"):
            raw = op.CustomOptionsAsNumpy()
            opts = dict(flexbuffers.Loads(raw.tobytes())) if not isinstance(raw, int) else {}
            opts["version"] = version
        else:
            opts = _options(op, kind)
        ops.append(TFLiteOp(kind, ins, outs, opts))
    return TFLiteGraph(tensors, constants, ops, tuple(int(v) for v in g.InputsAsNumpy()),
                       tuple(int(v) for v in g.OutputsAsNumpy()))


def fuse_depthwise(graph: TFLiteGraph) -> TFLiteGraph:
    """The same graph with each DEPTHWISE_CONV_2D (no activation, multiplier 1) whose only
    reader is a 1x1 stride-1 CONV_2D merged with it into one dense CONV_2D: weight
    W[o, y, x, i] = Wpw[o, i] * Wdw[y, x, i], bias bpw + Wpw @ bdw (exact algebra; more
    multiply-adds, half the kernels: what a GPU wants at small batch sizes)."""
    readers: dict[int, list[int]] = {}
    for k, op in enumerate(graph.ops):
        for t in op.inputs:
            readers.setdefault(t, []).append(k)
    tensors = list(graph.tensors)
    constants = dict(graph.constants)
    merged: dict[int, TFLiteOp] = {}  # pointwise op index -> the merged op
    dropped: set[int] = set()
    for k, op in enumerate(graph.ops):
        if op.kind != "DEPTHWISE_CONV_2D" or op.options["activation"] != 0 \
                or op.options["multiplier"] != 1 or op.outputs[0] in graph.outputs:
            continue
        users = readers.get(op.outputs[0], [])
        if len(users) != 1:
            continue
        pw = graph.ops[users[0]]
        if pw.kind != "CONV_2D" or pw.inputs[0] != op.outputs[0] \
                or tuple(pw.options["stride"]) != (1, 1) or pw.inputs[1] not in constants:
            continue
        w_pw = constants[pw.inputs[1]]  # [O, 1, 1, I]
        w_dw = constants.get(op.inputs[1])  # [1, kh, kw, I]
        if w_dw is None or w_pw.shape[1:3] != (1, 1):
            continue
        weight = (w_pw[:, 0, 0, None, None, :] * w_dw[0][None]).astype(np.float32)
        bias = np.zeros(w_pw.shape[0], np.float32)
        if len(pw.inputs) > 2 and pw.inputs[2] >= 0:
            bias += constants[pw.inputs[2]]
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            bias += w_pw[:, 0, 0, :] @ constants[op.inputs[2]]
        w_idx, b_idx = len(tensors), len(tensors) + 1
        tensors.append(TFLiteTensor(f"{pw.outputs[0]}/fused_weight", weight.shape,
                                    np.dtype(np.float32)))
        tensors.append(TFLiteTensor(f"{pw.outputs[0]}/fused_bias", bias.shape,
                                    np.dtype(np.float32)))
        constants[w_idx], constants[b_idx] = weight, bias
        opts = {**op.options, "activation": pw.options["activation"]}
        opts.pop("multiplier")
        merged[users[0]] = TFLiteOp("CONV_2D", (op.inputs[0], w_idx, b_idx), pw.outputs, opts)
        dropped.add(k)
    ops = [merged.get(k, op) for k, op in enumerate(graph.ops) if k not in dropped]
    return TFLiteGraph(tensors, constants, ops, graph.inputs, graph.outputs)


# ---- operators as torch modules -------------------------------------------------------------
def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite's SAME padding of one axis: (before, after), the extra pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _activate(x: torch.Tensor, activation: int) -> torch.Tensor:
    name = _ACTIVATIONS.get(activation, "unknown")
    if name is None:
        return x
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return F.hardtanh(x, 0.0, 6.0)
    raise ModelFileError(f"fused activation {activation} is not supported")


class Conv(nn.Module):
    """CONV_2D / DEPTHWISE_CONV_2D with TFLite's SAME/VALID padding and fused activation."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, in_shape: tuple[int, ...],
                 opts: dict[str, Any], depthwise: bool) -> None:
        super().__init__()
        if depthwise:  # [1, kh, kw, C*M] -> [C*M, 1, kh, kw]
            w = weight.transpose(3, 0, 1, 2)
            self.groups = int(in_shape[3])
        else:  # [O, kh, kw, I] -> [O, I, kh, kw]
            w = weight.transpose(0, 3, 1, 2)
            self.groups = 1
        self.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(w)),
                                   requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(torch.from_numpy(bias.copy()),
                                                           requires_grad=False)
        self.stride = tuple(opts["stride"])
        self.dilation = tuple(opts["dilation"])
        self.activation = opts["activation"]
        kh, kw = w.shape[2], w.shape[3]
        if opts["padding"] == 0:  # SAME
            ph = _same_padding(in_shape[1], kh, self.stride[0], self.dilation[0])
            pw = _same_padding(in_shape[2], kw, self.stride[1], self.dilation[1])
        else:
            ph = pw = (0, 0)
        if ph[0] == ph[1] and pw[0] == pw[1]:
            self.padding: tuple[int, int] = (ph[0], pw[0])
            self.pad: tuple[int, ...] | None = None
        else:
            self.padding = (0, 0)
            self.pad = (pw[0], pw[1], ph[0], ph[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        return _activate(y, self.activation)


class MaxPool(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], opts: dict[str, Any]) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(opts["kernel"]), tuple(opts["stride"])
        self.activation = opts["activation"]
        if opts["padding"] == 0:
            ph = _same_padding(in_shape[1], self.kernel[0], self.stride[0], 1)
            pw = _same_padding(in_shape[2], self.kernel[1], self.stride[1], 1)
            self.pad = (pw[0], pw[1], ph[0], ph[1]) if any(ph + pw) else None
        else:
            self.pad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:  # TFLite ignores padded cells: pad with -inf
            x = F.pad(x, self.pad, value=float("-inf"))
        return _activate(F.max_pool2d(x, self.kernel, self.stride), self.activation)


class PReLU(nn.Module):
    def __init__(self, alpha: np.ndarray, rank: int) -> None:
        super().__init__()
        a = torch.from_numpy(alpha.astype(np.float32).reshape(-1))
        self.rank = rank
        shape = (-1,) if rank == 4 else (1,) * (rank - 1) + (-1,)
        self.alpha = nn.Parameter(a.reshape(shape), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 4:  # per channel, NCHW
            return F.prelu(x, self.alpha)
        return torch.where(x >= 0, x, x * self.alpha)


class Relu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


def _to_layout(value: np.ndarray, rank: int) -> torch.Tensor:
    """A constant operand broadcast against a tensor of `rank` (NCHW when rank is 4)."""
    t = torch.from_numpy(value.astype(np.float32))
    if rank == 4 and t.dim() == 4:
        return t.permute(0, 3, 1, 2).contiguous()
    if rank == 4 and t.dim() >= 1 and t.shape[-1] > 1:  # per-channel constant
        return t.reshape(1, -1, 1, 1)
    return t


class Binary(nn.Module):
    """ADD or MUL of two tensors, or of a tensor and a constant, with fused activation."""

    def __init__(self, kind: str, const: np.ndarray | None, rank: int,
                 activation: int) -> None:
        super().__init__()
        self.mul = kind == "MUL"
        self.const = None if const is None else nn.Parameter(_to_layout(const, rank),
                                                             requires_grad=False)
        self.activation = activation

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        other = self.const if b is None else b
        assert other is not None
        y = a * other if self.mul else a + other
        return _activate(y, self.activation)


class Pad(nn.Module):
    def __init__(self, paddings: np.ndarray, rank: int) -> None:
        super().__init__()
        p = paddings.astype(int)
        if p[0].any():
            raise ModelFileError("PAD of the batch axis is not supported")
        self.pad: tuple[int, ...]
        if rank == 4:  # NHWC paddings -> F.pad on NCHW: (w, h, c)
            self.pad = tuple(int(v) for v in (p[2, 0], p[2, 1], p[1, 0], p[1, 1], p[3, 0],
                                              p[3, 1]))
        else:
            self.pad = tuple(int(v) for row in p[::-1][:-1] for v in row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


class Reshape(nn.Module):
    """RESHAPE in the file's (NHWC) element order; the batch axis stays B."""

    def __init__(self, in_rank: int, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_rank = in_rank
        self.out_shape = tuple(out_shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_rank == 4:
            x = x.permute(0, 2, 3, 1)
        y = x.reshape((x.shape[0],) + self.out_shape)
        if len(self.out_shape) == 3:
            y = y.permute(0, 3, 1, 2)
        return y


class Concat(nn.Module):
    def __init__(self, axis: int, rank: int, activation: int) -> None:
        super().__init__()
        axis = axis % rank
        if axis == 0:
            raise ModelFileError("CONCATENATION along the batch axis is not supported")
        self.axis = {1: 2, 2: 3, 3: 1}[axis] if rank == 4 else axis
        self.activation = activation

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return _activate(torch.cat(xs, self.axis), self.activation)


class StridedSlice(nn.Module):
    """STRIDED_SLICE with constant begin/end/strides (masks for begin/end; the batch axis
    is kept whole)."""

    def __init__(self, begin: np.ndarray, end: np.ndarray, strides: np.ndarray,
                 in_shape: tuple[int, ...], opts: dict[str, Any]) -> None:
        super().__init__()
        if opts["ellipsis_mask"] or opts["new_axis_mask"] or opts["shrink_axis_mask"]:
            raise ModelFileError("STRIDED_SLICE with ellipsis, new-axis or shrink masks is "
                                 "not supported")
        rank = len(in_shape)
        slices = [slice(None)]
        for ax in range(1, rank):
            b = None if opts["begin_mask"] >> ax & 1 else int(begin[ax])
            e = None if opts["end_mask"] >> ax & 1 else int(end[ax])
            slices.append(slice(b, e, int(strides[ax])))
        if rank == 4:  # NHWC -> NCHW
            slices = [slices[0], slices[3], slices[1], slices[2]]
        self.slices = tuple(slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.slices]


# ---- MediaPipe's custom operators (mediapipe/util/tflite/operations/, version 2) -----------
def _pair(a: float, b: float, device: torch.device) -> torch.Tensor:
    """The vector (a, b) float32 on `device`, made by kernels alone (no tensor from host
    data, so that it can be captured in a CUDA graph)."""
    return torch.arange(2, device=device, dtype=torch.float32) * (b - a) + a


def _rotation(r: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (B, 2, 2) [[cos, -sin], [sin, cos]] of angles r (B,)."""
    c, s = torch.cos(r), torch.sin(r)
    return torch.stack([c, -s, s, c], 1).view(-1, 2, 2)


class Landmarks2TransformMatrix(nn.Module):
    """Landmarks (B, N, 3) -> (B, 4, 4): the affine map from an output_width x output_height
    crop to the landmarks' space, around `subset_idxs` rotated so that the line from
    `left_rotation_idx` to `right_rotation_idx` is at `target_rotation_radians`, scaled by
    (scale_x, scale_y) (LandmarksToTransformMatrixV2). Batched matrix algebra: few kernels."""

    subset: torch.Tensor

    def __init__(self, opts: dict[str, Any]) -> None:
        super().__init__()
        self.left, self.right = int(opts["left_rotation_idx"]), int(opts["right_rotation_idx"])
        self.target = float(opts.get("target_rotation_radians", 0.0))
        self.register_buffer("subset", torch.as_tensor(list(opts["subset_idxs"]),
                                                       dtype=torch.long), persistent=False)
        self.out_w, self.out_h = int(opts["output_width"]), int(opts["output_height"])
        self.scale = (float(opts["scale_x"]) / self.out_w, float(opts["scale_y"]) / self.out_h)

    def forward(self, lm: torch.Tensor) -> torch.Tensor:
        lm = lm[..., :2].float()
        d = lm[:, self.right] - lm[:, self.left]  # B,2
        rot = _rotation(self.target - torch.atan2(d[:, 1], d[:, 0]))  # R(r)
        turned = torch.bmm(lm[:, self.subset], rot.transpose(1, 2))  # R(r) p, as rows
        lo, hi = turned.amin(1), turned.amax(1)  # B,2
        centre = torch.bmm(((lo + hi) * 0.5)[:, None], rot)[:, 0]  # R(-r) mid
        size = (hi - lo) * _pair(*self.scale, lm.device)  # (sx, sy) / out
        linear = rot.transpose(1, 2) * size[:, None, :]  # R(-r) @ diag(sx, sy)
        half = _pair(self.out_w / 2, self.out_h / 2, lm.device)
        shift = centre - torch.mv(linear.reshape(-1, 2), half).view(-1, 2)
        b = lm.shape[0]
        top = torch.cat([linear, torch.zeros(b, 2, 1, device=lm.device), shift[..., None]], 2)
        bottom = torch.eye(4, device=lm.device)[2:].expand(b, 2, 4)
        return torch.cat([top, bottom], 1)


class TransformTensorBilinear(nn.Module):
    """Features (B, C, H, W) and matrices (B, 4, 4) -> (B, C, out_h, out_w): output pixel
    (x, y) reads the input bilinearly at M @ (x + 0.5, y + 0.5) - 0.5, zero outside
    [0, W-1] x [0, H-1] (TransformTensorBilinearV2)."""

    def __init__(self, opts: dict[str, Any]) -> None:
        super().__init__()
        self.out_w, self.out_h = int(opts["output_width"]), int(opts["output_height"])

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        dev = x.device
        m = m.float()
        k = torch.arange(self.out_h * self.out_w, device=dev)
        base = torch.stack([(k % self.out_w).float() + 0.5, (k // self.out_w).float() + 0.5,
                            torch.ones_like(k, dtype=torch.float32)], 1)  # HW,3
        affine = torch.cat([m[:, :2, :2], m[:, :2, 3:]], 2)  # B,2,3
        pix = torch.matmul(base, affine.transpose(1, 2)) - 0.5  # B,HW,2 (x, y)
        top = _pair(w - 1.0, h - 1.0, dev)
        inside = ((pix >= 0) & (pix <= top)).all(-1)  # B,HW
        grid = (pix * (2.0 / top) - 1.0).view(-1, self.out_h, self.out_w, 2)
        y = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros",
                          align_corners=True)
        return y * inside.view(-1, 1, self.out_h, self.out_w).to(y.dtype)


class TransformLandmarks(nn.Module):
    """Points (B, N, 2|3) and matrices (B, 4, 4) -> the points' x, y mapped by the matrix's
    top two rows (z, if any, kept) (TransformLandmarksV2)."""

    def forward(self, pts: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        m = m.float()
        xy = torch.baddbmm(m[:, None, :2, 3], pts[..., :2].float(),
                           m[:, :2, :2].transpose(1, 2))
        if pts.shape[-1] > 2:
            xy = torch.cat([xy, pts[..., 2:].float()], -1)
        return xy.to(pts.dtype)


# ---- the graph as one module ------------------------------------------------------------------
class TFLiteNet(nn.Module):
    """A parsed TFLite graph run op by op in torch.

    forward(x) with x (B, C, H, W) float (the file's NHWC input, as NCHW) -> list of the
    file's outputs, each with the file's shape and B in front (B, ...), in the file's order.
    `half()` runs convolutions in float16; the custom operators' geometry stays float32.
    """

    def __init__(self, graph: TFLiteGraph, name: str = "model") -> None:
        super().__init__()
        self.name = name
        self.graph = graph
        self.layers = nn.ModuleList()
        self.plan: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        const = graph.constants
        shapes = {i: t.shape for i, t in enumerate(graph.tensors)}
        for op in graph.ops:
            layer, args = self._layer(op, const, shapes)
            self.plan.append((len(self.layers), args, op.outputs))
            self.layers.append(layer)
        self.inputs = graph.inputs
        self.outputs = graph.outputs
        self.output_rank = tuple(len(shapes[i]) for i in graph.outputs)
        # free each tensor after its last reader
        last: dict[int, int] = {}
        for k, (_, args, _) in enumerate(self.plan):
            for a in args:
                last[a] = k
        keep = set(self.outputs)
        self.release = [tuple(a for a in args if last.get(a) == k and a not in keep)
                        for k, (_, args, _) in enumerate(self.plan)]

    def _layer(self, op: TFLiteOp, const: dict[int, np.ndarray],
               shapes: dict[int, tuple[int, ...]]) -> tuple[nn.Module, tuple[int, ...]]:
        k, ins = op.kind, op.inputs
        rank = len(shapes[ins[0]])
        if k in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            bias = const.get(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
            return Conv(const[ins[1]], bias, shapes[ins[0]], op.options,
                        k == "DEPTHWISE_CONV_2D"), (ins[0],)
        if k == "MAX_POOL_2D":
            return MaxPool(shapes[ins[0]], op.options), (ins[0],)
        if k == "PRELU":
            return PReLU(const[ins[1]], rank), (ins[0],)
        if k == "RELU":
            return Relu(), (ins[0],)
        if k in ("ADD", "MUL"):
            a, b = ins
            if a in const:
                a, b = b, a
            if b in const:
                return Binary(k, const[b], rank, op.options["activation"]), (a,)
            return Binary(k, None, rank, op.options["activation"]), (a, b)
        if k == "PAD":
            return Pad(const[ins[1]], rank), (ins[0],)
        if k == "RESHAPE":
            return Reshape(rank, shapes[op.outputs[0]]), (ins[0],)
        if k == "CONCATENATION":
            return Concat(op.options["axis"], rank, op.options["activation"]), ins
        if k == "STRIDED_SLICE":
            return StridedSlice(const[ins[1]], const[ins[2]], const[ins[3]], shapes[ins[0]],
                                op.options), (ins[0],)
        if k == "CUSTOM:Landmarks2TransformMatrix" and op.options.get("version") == 2:
            return Landmarks2TransformMatrix(op.options), (ins[0],)
        if k == "CUSTOM:TransformTensorBilinear" and op.options.get("version") == 2:
            return TransformTensorBilinear(op.options), ins
        if k == "CUSTOM:TransformLandmarks" and op.options.get("version") == 2:
            return TransformLandmarks(), ins
        raise ModelFileError(f"{self.name}: operator {k} (version "
                             f"{op.options.get('version', 1)}) is not supported")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        env: dict[int, torch.Tensor] = {self.inputs[0]: x}
        for (idx, args, outs), release in zip(self.plan, self.release):
            env[outs[0]] = self.layers[idx](*(env[a] for a in args))
            for a in release:
                del env[a]
        result = []
        for i, rank in zip(self.outputs, self.output_rank):
            y = env[i]
            result.append(y.permute(0, 2, 3, 1) if rank == 4 else y)
        return result
