"""A minimal writer of TensorFlow Lite flatbuffers with the `tflite` package's generated builder functions: tensors
(int8 / int32 / float32, optional per-tensor or per-channel quantization and constant data) and builtin operators
with their options. It makes the test fixtures (tests/test_tflite.py) without TensorFlow, and `microtrain export`'s
files (graph_to_tflite)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np

_TYPES = {np.dtype(np.int8): 9, np.dtype(np.int32): 2, np.dtype(np.float32): 0, np.dtype(np.int64): 4}
ACT = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}


@dataclass
class _T:
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: np.ndarray | None
    zero: np.ndarray | None
    data: np.ndarray | None
    axis: int


@dataclass
class TFLiteWriter:
    tensors: list[_T] = field(default_factory=list)
    ops: list[tuple[str, list[int], list[int], dict[str, Any]]] = field(default_factory=list)

    def tensor(self, shape, dtype=np.int8, scale=None, zero=None, data=None, axis: int = 0) -> int:
        s = None if scale is None else np.atleast_1d(np.asarray(scale, np.float32))
        z = None if scale is None else np.broadcast_to(np.atleast_1d(np.asarray(0 if zero is None else zero,
                                                                                   np.int64)), s.shape).copy()
        d = None if data is None else np.ascontiguousarray(np.asarray(data, dtype).reshape(shape))
        self.tensors.append(_T(tuple(int(v) for v in shape), np.dtype(dtype), s, z, d, axis))
        return len(self.tensors) - 1

    def op(self, kind: str, inputs: list[int], outputs: list[int], **options: Any) -> None:
        self.ops.append((kind, list(inputs), list(outputs), options))

    def finish(self, inputs: list[int], outputs: list[int]) -> bytes:
        import tflite

        b = flatbuffers.Builder(1024)
        kinds = sorted({k for k, *_ in self.ops})
        # buffers: 0 is the empty sentinel
        buf_offs = []
        for data in [None] + [t.data for t in self.tensors if t.data is not None]:
            vec = b.CreateNumpyVector(np.frombuffer(data.tobytes(), np.uint8)) if data is not None else None
            tflite.BufferStart(b)
            if vec is not None:
                tflite.BufferAddData(b, vec)
            buf_offs.append(tflite.BufferEnd(b))
        t_offs, nbuf = [], 0
        for i, t in enumerate(self.tensors):
            name = b.CreateString(f"tensor_{i}")
            shape = b.CreateNumpyVector(np.asarray(t.shape, np.int32))
            q = None
            if t.scale is not None:
                sv = b.CreateNumpyVector(t.scale.astype(np.float32))
                zv = b.CreateNumpyVector(t.zero.astype(np.int64))
                tflite.QuantizationParametersStart(b)
                tflite.QuantizationParametersAddScale(b, sv)
                tflite.QuantizationParametersAddZeroPoint(b, zv)
                tflite.QuantizationParametersAddQuantizedDimension(b, t.axis)
                q = tflite.QuantizationParametersEnd(b)
            tflite.TensorStart(b)
            tflite.TensorAddShape(b, shape)
            tflite.TensorAddType(b, _TYPES[t.dtype])
            if t.data is not None:
                nbuf += 1
                tflite.TensorAddBuffer(b, nbuf)
            tflite.TensorAddName(b, name)
            if q is not None:
                tflite.TensorAddQuantization(b, q)
            t_offs.append(tflite.TensorEnd(b))
        op_offs = []
        for kind, ins, outs, opts in self.ops:
            otype, ooff = _options(b, kind, opts)
            iv = b.CreateNumpyVector(np.asarray(ins, np.int32))
            ov = b.CreateNumpyVector(np.asarray(outs, np.int32))
            tflite.OperatorStart(b)
            tflite.OperatorAddOpcodeIndex(b, kinds.index(kind))
            tflite.OperatorAddInputs(b, iv)
            tflite.OperatorAddOutputs(b, ov)
            if ooff is not None:
                tflite.OperatorAddBuiltinOptionsType(b, otype)
                tflite.OperatorAddBuiltinOptions(b, ooff)
            op_offs.append(tflite.OperatorEnd(b))

        def table_vector(offs: list[int]) -> int:
            b.StartVector(4, len(offs), 4)
            for o in reversed(offs):
                b.PrependUOffsetTRelative(o)
            return b.EndVector()

        tv, opv = table_vector(t_offs), table_vector(op_offs)
        inv = b.CreateNumpyVector(np.asarray(inputs, np.int32))
        outv = b.CreateNumpyVector(np.asarray(outputs, np.int32))
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tv)
        tflite.SubGraphAddOperators(b, opv)
        tflite.SubGraphAddInputs(b, inv)
        tflite.SubGraphAddOutputs(b, outv)
        sg = tflite.SubGraphEnd(b)
        codes = []
        for kind in kinds:
            code = getattr(tflite.BuiltinOperator, kind)
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, 1)
            codes.append(tflite.OperatorCodeEnd(b))
        cv, sgv, bv = table_vector(codes), table_vector([sg]), table_vector(buf_offs)
        desc = b.CreateString("microtrain test fixture")
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, cv)
        tflite.ModelAddSubgraphs(b, sgv)
        tflite.ModelAddDescription(b, desc)
        tflite.ModelAddBuffers(b, bv)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def _options(b: flatbuffers.Builder, kind: str, o: dict[str, Any]) -> tuple[int, int | None]:
    import tflite

    act = ACT[o.get("act", "NONE")]
    pad = tflite.Padding.SAME if o.get("padding", "SAME") == "SAME" else tflite.Padding.VALID
    bo = tflite.BuiltinOptions
    if kind == "CONV_2D":
        tflite.Conv2DOptionsStart(b)
        tflite.Conv2DOptionsAddPadding(b, pad)
        tflite.Conv2DOptionsAddStrideH(b, o.get("stride", 1))
        tflite.Conv2DOptionsAddStrideW(b, o.get("stride", 1))
        tflite.Conv2DOptionsAddDilationHFactor(b, 1)
        tflite.Conv2DOptionsAddDilationWFactor(b, 1)
        tflite.Conv2DOptionsAddFusedActivationFunction(b, act)
        return bo.Conv2DOptions, tflite.Conv2DOptionsEnd(b)
    if kind == "DEPTHWISE_CONV_2D":
        tflite.DepthwiseConv2DOptionsStart(b)
        tflite.DepthwiseConv2DOptionsAddPadding(b, pad)
        tflite.DepthwiseConv2DOptionsAddStrideH(b, o.get("stride", 1))
        tflite.DepthwiseConv2DOptionsAddStrideW(b, o.get("stride", 1))
        tflite.DepthwiseConv2DOptionsAddDepthMultiplier(b, o.get("multiplier", 1))
        tflite.DepthwiseConv2DOptionsAddDilationHFactor(b, 1)
        tflite.DepthwiseConv2DOptionsAddDilationWFactor(b, 1)
        tflite.DepthwiseConv2DOptionsAddFusedActivationFunction(b, act)
        return bo.DepthwiseConv2DOptions, tflite.DepthwiseConv2DOptionsEnd(b)
    if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
        tflite.Pool2DOptionsStart(b)
        tflite.Pool2DOptionsAddPadding(b, pad)
        tflite.Pool2DOptionsAddStrideH(b, o.get("stride", 1))
        tflite.Pool2DOptionsAddStrideW(b, o.get("stride", 1))
        tflite.Pool2DOptionsAddFilterHeight(b, o["filter"][0])
        tflite.Pool2DOptionsAddFilterWidth(b, o["filter"][1])
        tflite.Pool2DOptionsAddFusedActivationFunction(b, act)
        return bo.Pool2DOptions, tflite.Pool2DOptionsEnd(b)
    if kind == "ADD":
        tflite.AddOptionsStart(b)
        tflite.AddOptionsAddFusedActivationFunction(b, act)
        return bo.AddOptions, tflite.AddOptionsEnd(b)
    if kind == "FULLY_CONNECTED":
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, act)
        return bo.FullyConnectedOptions, tflite.FullyConnectedOptionsEnd(b)
    if kind == "SOFTMAX":
        tflite.SoftmaxOptionsStart(b)
        tflite.SoftmaxOptionsAddBeta(b, 1.0)
        return bo.SoftmaxOptions, tflite.SoftmaxOptionsEnd(b)
    if kind == "MEAN":
        tflite.ReducerOptionsStart(b)
        tflite.ReducerOptionsAddKeepDims(b, bool(o.get("keep_dims", False)))
        return bo.ReducerOptions, tflite.ReducerOptionsEnd(b)
    if kind == "RESHAPE":
        return 0, None
    if kind == "PAD":
        tflite.PadOptionsStart(b)
        return bo.PadOptions, tflite.PadOptionsEnd(b)
    return 0, None


def fused_activation(g, op) -> str:
    """The TFLite fused activation whose int8 clamp is the op's act_min / act_max (NONE when it has none)."""
    from microtrain.frontends.tflite import _act_range

    a = op.attrs
    want = {k: a[k] for k in ("act_min", "act_max") if k in a}
    if not want:
        return "NONE"
    y = g.tensors[op.outputs[0]]
    for name in ("RELU", "RELU6", "RELU_N1_TO_1"):
        if _act_range(ACT[name], float(y.scale), int(y.zero), op.name) == want:
            return name
    raise ValueError(f"{op.name}: the clamp [{a.get('act_min', -128)}, {a.get('act_max', 127)}] is no TFLite fused "
                     "activation")


def graph_to_tflite(g) -> bytes:
    """A forward int8 graph (conv2d, add, global avgpool, windowed max / average pools, imported FULLY_CONNECTED
    layers (conv2d with `fc`), a linear head) as a TFLite flatbuffer: the same weights and quantization parameters,
    NHWC. An int8 head is an int8 FULLY_CONNECTED; a float32 head (float32 weights [K, C] and bias [K], as training
    and the device hold it) is a DEQUANTIZE of the int8 features followed by a float32 FULLY_CONNECTED, and the
    model's output is then float32 logits [1, K]. A padding TF's SAME does not reproduce becomes PAD + VALID. The file
    computes under TFLite's fixed-point rule whatever rule `g` has (a zoo model's float32-multiplier rounding differs
    from it by at most one step per requantization)."""
    from microtrain.frontends.tflite import _same_pads
    from microtrain.ir.ops import conv_pads

    w = TFLiteWriter()
    idx: dict[str, int] = {}

    def act(name: str) -> int:
        t = g.tensors[name]
        shape = (1, t.shape[1], t.shape[2], t.shape[0]) if len(t.shape) == 3 else (1, *t.shape)
        idx[name] = w.tensor(shape, np.int8, scale=float(t.scale), zero=int(t.zero))
        return idx[name]

    act(g.inputs[0])
    for op in g.ops:
        a = op.attrs
        fused = fused_activation(g, op)
        if op.kind == "conv2d":
            xt, wt, bt, yt = (g.tensors[n] for n in (*op.inputs, op.outputs[0]))
            if len(op.inputs) != 3:
                raise ValueError(f"{op.name}: a training graph's split weight cannot be exported")
            if a.get("fc"):  # an imported FULLY_CONNECTED: back to one, flattening its input in NHWC order
                wfc = wt.data.transpose(0, 2, 3, 1).reshape(wt.shape[0], -1)
                wi = w.tensor(wfc.shape, np.int8, scale=wt.scale, zero=0, data=wfc)
                bi = w.tensor(bt.shape, np.int32, scale=(np.float64(xt.scale) * wt.scale).astype(np.float32), zero=0,
                              data=bt.data)
                idx[op.outputs[0]] = w.tensor((1, yt.shape[0]), np.int8, scale=float(yt.scale), zero=int(yt.zero))
                w.op("FULLY_CONNECTED", [idx[op.inputs[0]], wi, bi], [idx[op.outputs[0]]], act=fused)
                continue
            dw = a["groups"] > 1
            if dw and not a["groups"] == xt.shape[0] == wt.shape[0]:
                raise ValueError(f"{op.name}: grouped convolution")
            wdata = wt.data.transpose(1, 2, 3, 0) if dw else wt.data.transpose(0, 2, 3, 1)
            wi = w.tensor(wdata.shape, np.int8, scale=wt.scale, zero=0, data=wdata, axis=3 if dw else 0)
            bi = w.tensor(bt.shape, np.int32, scale=(np.float64(xt.scale) * wt.scale).astype(np.float32), zero=0,
                          data=bt.data)
            k, s = wt.shape[2], a["stride"]
            t, b, left, r = conv_pads(a)
            h, wd = xt.shape[1:]

            x_in = idx[op.inputs[0]]
            if t == b == left == r == 0:
                padding = "VALID"
            elif (*_same_pads(h, k, s), *_same_pads(wd, k, s)) == (t, b, left, r):
                padding = "SAME"
            else:
                pads = w.tensor((4, 2), np.int32, data=np.array([[0, 0], [t, b], [left, r], [0, 0]]))
                x_pad = w.tensor((1, h + t + b, wd + left + r, xt.shape[0]), np.int8, scale=float(xt.scale),
                                 zero=int(xt.zero))
                w.op("PAD", [x_in, pads], [x_pad])
                x_in, padding = x_pad, "VALID"
            w.op("DEPTHWISE_CONV_2D" if dw else "CONV_2D", [x_in, wi, bi], [act(op.outputs[0])], stride=s,
                 padding=padding, act=fused)
        elif op.kind == "add":
            w.op("ADD", [idx[n] for n in op.inputs], [act(op.outputs[0])], act=fused)
        elif op.kind == "avgpool":
            xt, yt = g.tensors[op.inputs[0]], g.tensors[op.outputs[0]]
            c, h, wd = xt.shape
            y4 = w.tensor((1, 1, 1, c), np.int8, scale=float(yt.scale), zero=int(yt.zero))
            if op.attrs.get("mean"):
                axes = w.tensor((2,), np.int32, data=np.array([1, 2]))
                w.op("MEAN", [idx[op.inputs[0]], axes], [y4], keep_dims=True)
            else:
                w.op("AVERAGE_POOL_2D", [idx[op.inputs[0]]], [y4], filter=(h, wd), padding="VALID", stride=1,
                     act=fused)
            sh = w.tensor((2,), np.int32, data=np.array([1, c]))
            w.op("RESHAPE", [y4, sh], [act(op.outputs[0])])
        elif op.kind in ("maxpool2d", "avgpool2d"):
            from microtrain.ir.ops import pool_pads

            c, h, wd = g.tensors[op.inputs[0]].shape
            kh, kw, s = a["pool_h"], a["pool_w"], a["stride"]
            pads = pool_pads(a)
            if pads == (0, 0, 0, 0):
                padding = "VALID"
            elif pads == (*_same_pads(h, kh, s), *_same_pads(wd, kw, s)):
                padding = "SAME"
            else:
                raise ValueError(f"{op.name}: padding {list(pads)} is neither SAME nor VALID")
            w.op("MAX_POOL_2D" if op.kind == "maxpool2d" else "AVERAGE_POOL_2D", [idx[op.inputs[0]]],
                 [act(op.outputs[0])], filter=(kh, kw), stride=s, padding=padding, act=fused)
        elif op.kind in ("reshape", "flatten"):  # TFLite's FULLY_CONNECTED reads a vector or flattens a map itself
            idx[op.outputs[0]] = idx[op.inputs[0]]
        elif op.kind == "linear" and g.tensors[op.inputs[1]].dtype == "int8":
            xt, wt, bt = (g.tensors[n] for n in op.inputs)
            wi = w.tensor(wt.shape, np.int8, scale=wt.scale, zero=0, data=wt.data)
            bi = w.tensor(bt.shape, np.int32, scale=(np.float64(xt.scale) * wt.scale).astype(np.float32), zero=0,
                          data=bt.data)
            w.op("FULLY_CONNECTED", [idx[op.inputs[0]], wi, bi], [act(op.outputs[0])], act=fused)
        elif op.kind == "linear" and g.tensors[op.inputs[1]].dtype == "float32":
            # the float32 head as the device holds it: DEQUANTIZE of the int8 features, a float FULLY_CONNECTED
            xt, wt, bt = (g.tensors[n] for n in op.inputs)
            if bt.dtype != "float32" or fused != "NONE":
                raise ValueError(f"{op.name}: a float32 head needs a float32 bias and no fused activation")
            k, c = wt.shape
            feats = w.tensor((1, c), np.float32)
            w.op("DEQUANTIZE", [idx[op.inputs[0]]], [feats])
            wi = w.tensor((k, c), np.float32, data=wt.data)
            bi = w.tensor((k,), np.float32, data=bt.data)
            idx[op.outputs[0]] = w.tensor((1, k), np.float32)
            w.op("FULLY_CONNECTED", [feats, wi, bi], [idx[op.outputs[0]]], act="NONE")
        else:
            raise ValueError(f"{op.name}: op {op.kind} has no TFLite export")
    return w.finish([idx[g.inputs[0]]], [idx[g.outputs[0]]])
