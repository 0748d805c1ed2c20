"""Batched execution of a training graph on torch CPU: the host trainer's step, with the device's semantics.

`precision="int8"` runs the graph exactly as the device does (integer-exact forward, float32 backward, int8
trainable weights updated with counter-hash stochastic rounding, int32 biases rounded to nearest).
`precision="fp32"` runs the float relaxation of the same graph: no rounding anywhere and float32 parameters
(in integer units, so QAS makes the update plain fp32 SGD on real weights) — the fp32 baseline.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from microtrain.autodiff.build import TrainConfig, build_training_graph, frozen_prefix
from microtrain.ir.graph import Graph, Op
from microtrain.ir.ops import conv_pads
from microtrain.ir.quant import Requant, add_fixed_point, add_ratios, mean_fixed_point, qas_divisor
from microtrain.ir.trainmeta import params as param_roles
from microtrain.runtime import kernels as K
from microtrain.runtime import pool_kernels as PK

M32 = 0xFFFFFFFF
# the frozen prefix runs in batches whose widest float32 activation is about this size (see GraphTrainStep.prefix)
PREFIX_CHUNK_BYTES = 4 << 20


@functools.lru_cache(maxsize=256)
def _index_hash(n: int) -> np.ndarray:
    """(i * 0x9E3779B1) mod 2**32 for i < n: the step-independent first term of sr_uniform (made once per size;
    read-only)."""
    h = np.arange(n, dtype=np.uint32)
    h *= np.uint32(0x9E3779B1)
    h.flags.writeable = False
    return h


def sr_uniform(seed: int, step: int, stream: int, n: int) -> torch.Tensor:
    """n uniforms in [0, 1) from a counter hash of (seed, step, stream, element index); identical in the C runtime.
    numpy's uint32 arithmetic is C's uint32_t arithmetic (wraps modulo 2**32 by definition), one vectorised pass per
    operation: about 6x faster than the same hash emulated in int64 torch ops (a fifth of a last:6 step's time)."""
    x = _index_hash(n) + np.uint32((step * 0x85EBCA77 + stream * 0xC2B2AE3D + seed * 0x27D4EB2F) & M32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    x >>= np.uint32(8)
    u = x.astype(np.float32)  # < 2**24: exact
    u *= np.float32(1.0 / (1 << 24))  # a power of two: exact
    return torch.from_numpy(u)


def quantize_per_channel(v: torch.Tensor) -> torch.Tensor:
    """The value a qint8 gradient holds: per sample and channel, s = max|v| / 127 (1 if all zero),
    q = clamp(rint(v / s), -127, 127), value = q * s (float32, the order the C runtime uses)."""
    flat = v.reshape(v.shape[0], v.shape[1], -1)
    s = flat.abs().amax(dim=2, keepdim=True) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(flat / s).clamp_(-127, 127) * s).reshape(v.shape)


def _pad_input(x: torch.Tensor, pads: tuple[int, int, int, int]) -> tuple[torch.Tensor, int]:
    """(x, p) for a symmetric conv padding p, else (x zero-padded (top, bottom, left, right), 0)."""
    t, b, left, r = pads
    if (t, left) == (b, r) and t == left:
        return x, t
    return F.pad(x, (left, r, t, b)), 0


def _bshape(t: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-channel vector broadcast over [N, C, ...] with `dims` total dims."""
    return t.view((1, -1) + (1,) * (dims - 2))


class GraphTrainStep:
    """Implements the trainer's TrainStep protocol by interpreting a training graph."""

    def __init__(self, graph: Graph, precision: str = "int8"):
        if precision not in ("int8", "fp32"):
            raise ValueError(precision)
        torch.set_flush_denormal(True)  # a diverging float run otherwise crawls through denormal arithmetic
        self.g = graph
        self.precision = precision
        self.exact = precision == "int8"
        self.cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                  for k, v in graph.meta["train"]["config"].items()})
        self.step_count = 0
        self.params: dict[str, torch.Tensor] = {}
        self.load_state_dict({n: t.data for n, t in graph.tensors.items() if t.data is not None})
        self.mult = {}
        self.fx: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # Requant.TFLITE: (q, shift) per conv
        self.tflite = graph.requant == Requant.TFLITE
        self.stream = {n: i for i, n in enumerate(sorted(graph.meta["train"]["state"]))}
        for op in graph.ops:
            if op.kind == "conv2d":
                x, w, y = graph.tensors[op.inputs[0]], graph.tensors[op.inputs[1]], graph.tensors[op.outputs[0]]
                self.mult[op.name] = K.requant_multiplier(x.scale, w.scale, y.scale)
                if self.tflite:
                    self.fx[op.name] = K.fixed_point(x.scale, w.scale, y.scale)
        self.forward_ops = [o for o in graph.ops if o.attrs.get("phase") == "forward"]
        self.frozen_ops, self.boundary = frozen_prefix(graph)
        self.op_named = {o.name: o for o in graph.ops}
        frozen = {o.name for o in self.frozen_ops}
        self.rest_ops = [o for o in graph.ops if o.name not in frozen]
        self.rest_forward_ops = [o for o in self.forward_ops if o.name not in frozen]
        widest = max((4 * math.prod(graph.tensors[n].shape) for o in self.frozen_ops for n in o.outputs), default=1)
        self.prefix_chunk = max(1, PREFIX_CHUNK_BYTES // widest)  # images per pass of the frozen prefix
        # speed only (int8 precision): float32 copies of conv weights/biases, remade when a parameter changes, and
        # the centered float32 activations (x - x.zero) of the current `run`, kept beside the int8 env values so
        # that each kernel reads its operand without converting it again
        self._fconv: dict[str, tuple[tuple, tuple, tuple, K.FloatConv]] = {}
        self._cx: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._qas: dict[tuple[str, int], torch.Tensor] = {}  # QAS divisors: constants of the graph's scales
        self._wfloat: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # int8 param -> its float32 (update)
        self.roles = param_roles(graph)  # meta["train"]["params"]: bias / weight slice / head / slot, and their op
        self.slots = {n: {} for n in self.roles}
        for r in self.roles.values():
            if r.is_slot:
                self.slots[r.slot_of][r.slot] = r.name

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The boundary tensors of the frozen prefix for a batch of images (cacheable: no trainable input).

        Runs `prefix_chunk` images at a time: each image's prefix is independent of the others (integer-exact
        forward, no batch statistic), so the values are the same, and the early layers' activations then stay small
        enough to be reused from the allocator and the caches instead of being faulted in fresh every step."""
        x = torch.as_tensor(x)
        k = self.prefix_chunk
        if x.shape[0] <= k:
            env = self.run(self.frozen_ops, self._env(x), train=True)
            return {n: env[n] for n in self.boundary}
        parts = [self.prefix(x[i:i + k]) for i in range(0, x.shape[0], k)]
        return {n: torch.cat([p[n] for p in parts]) for n in self.boundary}

    # ---- state ----------------------------------------------------------------------------------------------
    def _storage_dtype(self, name: str) -> torch.dtype:
        """fp32 precision keeps every tensor as float32 (integer units); int8 precision keeps the graph dtypes."""
        dtype = self.g.tensors[name].dtype
        if not self.exact or dtype == "float32":
            return torch.float32
        return {"int8": torch.int8, "int32": torch.int32}[dtype]

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for n, a in state.items():
            if n.startswith("__"):
                continue
            self.params[n] = torch.from_numpy(np.array(a)).to(self._storage_dtype(n))
        self.step_count = int(state.get("__step__", np.array(self.step_count)))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Trainable tensors and optimizer slots as stored (graph dtypes; all float32 in fp32 precision), plus the
        update counter: a checkpoint resumes exactly."""
        out = {n: self.params[n].numpy().copy() for n in self.g.meta["train"]["state"]}
        out["__step__"] = np.array(self.step_count, np.int64)
        return out

    def _weight(self, name: str) -> torch.Tensor:
        """A conv weight operand as the forward kernel wants it: int8 values (an fp32 shadow is read through rint)."""
        v = self.params[name]
        if self.exact and v.dtype == torch.float32:
            return torch.round(v).clamp(-128, 127).to(torch.int8)
        return v

    def _full_weight(self, op: Op) -> torch.Tensor:
        parts = [self._weight(n) for n in op.inputs[1:-1]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=op.attrs["split_axis"])

    def _float_weight(self, op: Op) -> torch.Tensor:
        """float32 of `_full_weight(op)`: the update's own float32 result where it made the current int8 value."""
        parts = []
        for n in op.inputs[1:-1]:
            hit = self._wfloat.get(n)
            v = self.params[n]
            parts.append(hit[1] if hit is not None and hit[0] is v and v._version == hit[2] else
                         self._weight(n).to(torch.float32))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=op.attrs["split_axis"])

    # ---- kernels --------------------------------------------------------------------------------------------
    def _conv2d(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        g, a = self.g, op.attrs
        xt, yt = g.tensors[op.inputs[0]], g.tensors[op.outputs[0]]
        x, b = env[op.inputs[0]], self.params[op.inputs[-1]]
        m = self.mult[op.name]
        pads = conv_pads(a)
        w = self._full_weight(op) if not (self.exact and not self.tflite) else None
        if self.exact and self.tflite:
            acc = K.conv_acc(x, xt.zero, w, a["stride"], pads, a["groups"])
            v = K.requantize_fx(acc, b, *self.fx[op.name], yt.zero)
        elif self.exact:
            fc = self._float_conv(op)
            if fc.exact:  # the float32 conv is exact: requantize in place, keep the centered output
                v = K.conv_acc_f32(self._centered(op.inputs[0], env), fc, a["stride"], pads, a["groups"])
                return self._requant_out(v, m, op, train)
            acc = K.conv_acc(x, xt.zero, self._full_weight(op), a["stride"], pads, a["groups"])
            v = torch.round((acc + _bshape(b, 4)).to(torch.float32) * _bshape(m, 4)) + yt.zero
        else:
            xp, p = _pad_input(x - xt.zero, pads)
            acc = F.conv2d(xp, w.to(torch.float32), None, a["stride"], p, 1, a["groups"])
            v = (acc + _bshape(b.to(torch.float32), 4)) * _bshape(m, 4) + yt.zero
        return self._clamp_out(v, op, train)

    def _float_conv(self, op: Op) -> K.FloatConv:
        """The conv's float32 weight and bias (kernels.FloatConv), the weight part made again only when one of its
        weight tensors was replaced or changed in place, the bias part when the bias was."""
        ws, b = tuple(self.params[n] for n in op.inputs[1:-1]), self.params[op.inputs[-1]]
        hit = self._fconv.get(op.name)
        wkey = tuple((id(t), t._version) for t in ws)
        if hit is None or hit[0] != wkey or any(a is not c for a, c in zip(hit[1], ws, strict=True)):
            fc = K.FloatConv(self._float_weight(op), b, self.g.tensors[op.inputs[0]].zero)
            self._fconv[op.name] = (wkey, ws, (b, b._version), fc)
            return fc
        fc = hit[3]
        if hit[2][0] is not b or hit[2][1] != b._version:
            fc.set_bias(b)
            self._fconv[op.name] = (wkey, ws, (b, b._version), fc)
        return fc

    def _centered(self, name: str, env: dict) -> torch.Tensor:
        """float32(env[name] - zero) (channels_last), made once per run from the int8 value it belongs to."""
        x = env[name]
        hit = self._cx.get(name)
        if hit is not None and hit[0] is x:
            return hit[1]
        c = K.centered(x, self.g.tensors[name].zero)
        self._cx[name] = (x, c)
        return c

    def _requant_out(self, v: torch.Tensor, m: torch.Tensor | None, op: Op, train: bool) -> list[torch.Tensor]:
        """`_clamp_out` of rint(v * m) + y.zero for the int8 rule, in place on v; keeps the centered output."""
        lo, hi = op.attrs.get("act_min", -128), op.attrs.get("act_max", 127)
        want = len(op.outputs) > 1 and train
        y, yc, keep = K.requant_f32(v, m, self.g.tensors[op.outputs[0]].zero, lo, hi, want)
        self._cx[op.outputs[0]] = (y, yc)
        return [y] if len(op.outputs) == 1 else [y, keep]

    def _clamp_out(self, v: torch.Tensor, op: Op, train: bool) -> list[torch.Tensor]:
        lo, hi = op.attrs.get("act_min", -128), op.attrs.get("act_max", 127)  # a fused activation's clamp
        y = v.clamp(lo, hi)
        y = y.to(torch.int8) if self.exact else y
        if len(op.outputs) == 1:
            return [y]
        return [y, (v >= lo) & (v <= hi) if train else None]

    def _add(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        at, bt, yt = (self.g.tensors[n] for n in (*op.inputs, op.outputs[0]))
        if self.exact and self.tflite:
            params = add_fixed_point(at.scale, bt.scale, yt.scale)
            return self._clamp_out(K.add_tflite_pre(env[op.inputs[0]], at.zero, env[op.inputs[1]], bt.zero, params,
                                                    yt.zero), op, train)
        ra, rb = add_ratios(at.scale, bt.scale, yt.scale)
        if self.exact:  # two products, then one sum (no fused multiply-add), as the op table says
            v = self._centered(op.inputs[0], env) * ra
            return self._requant_out(v.add_(self._centered(op.inputs[1], env) * rb), None, op, train)
        v = (env[op.inputs[0]].to(torch.float32) - at.zero) * ra + (env[op.inputs[1]].to(torch.float32) - bt.zero) * rb
        v = (torch.round(v) if self.exact else v) + yt.zero
        return self._clamp_out(v, op, train)

    def _avgpool(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        x = env[op.inputs[0]]
        if self.exact and self.tflite:
            xt, yt = self.g.tensors[op.inputs[0]], self.g.tensors[op.outputs[0]]
            act = (op.attrs.get("act_min", -128), op.attrs.get("act_max", 127))
            if op.attrs.get("mean"):
                params = mean_fixed_point(xt.scale, yt.scale, x.shape[2] * x.shape[3])
                return [K.mean_tflite(x, xt.zero, yt.zero, params, act)]
            return [K.avgpool_tflite(x, act)]
        if self.exact:
            return [K.avgpool_int8(x)]
        return [x.mean(dim=(2, 3))]

    def _maxpool2d(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        return [PK.maxpool2d(env[op.inputs[0]], op.attrs, self.exact)]

    def _avgpool2d(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        return [PK.avgpool2d(env[op.inputs[0]], op.attrs, self.tflite, self.exact)]

    def _reshape(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        x = env[op.inputs[0]]
        return [x.reshape(x.shape[0], *self.g.tensors[op.outputs[0]].shape)]

    def _flatten(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        x = env[op.inputs[0]]
        return [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 1, 1).contiguous()]

    def _flatten_grad(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        c, h, w = self.g.tensors[op.outputs[0]].shape
        g = env[op.inputs[0]]
        return [g.reshape(g.shape[0], h, w, c).permute(0, 3, 1, 2).contiguous()]

    def _maxpool2d_grad(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        fwd = self.g.op(op.attrs["pool"])
        return [PK.maxpool2d_grad(env[op.inputs[0]], env[op.inputs[1]], fwd.attrs)]

    def _avgpool2d_grad(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        fwd = self.g.op(op.attrs["pool"])
        return [PK.avgpool2d_grad(env[op.inputs[0]], self.g.tensors[op.outputs[0]].shape, fwd.attrs)]

    def _features(self, name: str, env: dict) -> torch.Tensor:
        t = self.g.tensors[name]
        return (env[name].to(torch.float32) - t.zero) * float(t.scale)

    def _linear(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        return [self._features(op.inputs[0], env) @ self.params[op.inputs[1]].t() + self.params[op.inputs[2]]]

    def _slice(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        ch = op.attrs["channels"]
        y = env[op.inputs[0]][:, :ch].clone()
        if self.exact and env[op.inputs[0]].dim() == 4:  # its centered value: a view of the source's
            self._cx[op.outputs[0]] = (y, self._centered(op.inputs[0], env)[:, :ch])
        return [y]

    def _softmax_ce(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        z, y = env[op.inputs[0]], env[op.inputs[1]].long()
        loss = F.cross_entropy(z, y)
        grad = (torch.softmax(z, dim=1) - F.one_hot(y, z.shape[1]).to(torch.float32)) / z.shape[0]
        return [loss, grad]

    def _linear_grad_input(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        pooled = self.g.tensors[self.g.meta["train"]["pooled"]]
        return [(env[op.inputs[0]] @ self.params[op.inputs[1]]) * float(pooled.scale)]

    def _avgpool_grad(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        _, h, w = self.g.tensors[op.outputs[0]].shape
        gy = env[op.inputs[0]]
        fmt = torch.channels_last if self.exact else torch.contiguous_format  # the int8 backward runs channels_last
        return [(gy / float(h * w))[:, :, None, None].expand(-1, -1, h, w).contiguous(memory_format=fmt)]

    def _add_grad(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        fwd = self.op_named[op.attrs["add"]]
        at, bt, yt = (self.g.tensors[n] for n in (*fwd.inputs, fwd.outputs[0]))
        gm = env[op.inputs[0]] * env[op.inputs[1]]
        return [gm * r for r, want in zip(add_ratios(at.scale, bt.scale, yt.scale), op.attrs["which"], strict=True)
                if want]

    def _grad_add(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        return [env[op.inputs[0]] + env[op.inputs[1]]]

    def _conv2d_grad_acc(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        return [torch.mul(env[op.inputs[0]], env[op.inputs[1]]).mul_(_bshape(self.mult[op.attrs["conv"]], 4))]

    def _conv2d_grad_input(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        conv = self.op_named[op.attrs["conv"]]
        gacc = env[op.inputs[0]]
        shape = (gacc.shape[0], *self.g.tensors[conv.inputs[0]].shape)
        w = self._float_conv(conv).w if self.exact else self._full_weight(conv).to(torch.float32)
        a = op.attrs
        t, b, left, r = conv_pads(a)
        if self.exact and a["stride"] == 1:  # channels_last fast paths (same sums, other orders)
            k = w.shape[2]
            if a["groups"] == 1 and k == 1 and t == b == left == r == 0:
                return [K.pointwise_grad_input(gacc, w)]
            if a["groups"] == w.shape[0] == gacc.shape[1] and w.shape[1] == 1 and t == b == left == r < k:
                return [K.depthwise_grad_input(gacc, w, t)]
        if (t, left) == (b, r):
            return [conv2d_input(shape, w, gacc, a["stride"], t, 1, a["groups"])]
        padded = (*shape[:2], shape[2] + t + b, shape[3] + left + r)  # asymmetric: on the padded input, cropped
        gx = conv2d_input(padded, w, gacc, a["stride"], 0, 1, a["groups"])
        return [gx[:, :, t:t + shape[2], left:left + shape[3]].contiguous()]

    def _conv_grads(self, op: Op, env: dict) -> dict[str, torch.Tensor]:
        """Gradients (integer units) of a conv's trainable weight slice and/or bias, summed over the batch."""
        a, params = op.attrs, op.attrs["params"]
        gacc = env[op.inputs[0]]
        out = {}
        for p in params:
            if self.roles[p].kind == "bias":
                out[p] = gacc.sum(dim=(0, 2, 3))
            else:
                if self.exact:
                    xc = self._centered(op.inputs[1], env)
                else:
                    xc = env[op.inputs[1]].to(torch.float32) - self.g.tensors[op.inputs[1]].zero
                ch = a["channels"]
                wshape = self.g.tensors[p].shape
                fast = self._fast_weight_grad(a, xc, gacc, wshape) if self.exact else None
                if fast is not None:
                    out[p] = fast
                    continue
                x, pad = _pad_input(xc, conv_pads(a))
                if a["depthwise"]:  # torch's depthwise weight gradient is much slower on mixed layouts: gacc gets x's
                    fmt = torch.channels_last if self.exact else torch.contiguous_format  # (see kernels.centered)
                    out[p] = conv2d_weight(x, wshape, gacc[:, :ch].contiguous(memory_format=fmt), a["stride"], pad, 1,
                                           ch)
                else:
                    out[p] = conv2d_weight(x, wshape, gacc, a["stride"], pad)
        return out

    @staticmethod
    def _fast_weight_grad(a: dict, xc: torch.Tensor, gacc: torch.Tensor, wshape) -> torch.Tensor | None:
        """The weight gradient by a channels_last fast path where one applies (1x1 stride-1 unpadded conv: a matrix
        product; depthwise on a map no larger than its kernel: kernels.depthwise_grad_weight_small), else None."""
        pads, k, ch = conv_pads(a), wshape[2], a["channels"]
        if a["depthwise"]:
            if xc.shape[1] == ch and xc.shape[2] * xc.shape[3] <= k * k and wshape[1] == 1:
                return K.depthwise_grad_weight_small(xc, gacc[:, :ch], k, a["stride"], pads)
            return None
        if (k == 1 and a["stride"] == 1 and pads == (0, 0, 0, 0) and tuple(wshape[:2]) == (gacc.shape[1], xc.shape[1])
                and wshape[3] == 1):
            return K.pointwise_grad_weight(gacc, xc)
        return None

    def _conv2d_update(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        for p, grad in self._conv_grads(op, env).items():
            self._apply(p, grad, op.attrs["conv"], env, fresh=True)
        return []

    def _conv2d_weight_grad(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        grads = self._conv_grads(op, env)
        return [grads[p] for p in op.attrs["params"]]

    def _linear_grads(self, op: Op, env: dict) -> list[torch.Tensor]:
        gz, feats = env[op.inputs[0]], self._features(op.inputs[1], env)
        return [gz.t() @ feats, gz.sum(dim=0)]

    def _linear_update(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        for p, grad in zip(op.attrs["params"], self._linear_grads(op, env), strict=True):
            self._apply(p, grad, None, env)
        return []

    def _linear_weight_grad(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        return self._linear_grads(op, env)

    def _apply_update(self, op: Op, env: dict, train: bool) -> list[torch.Tensor]:
        p = op.attrs["param"]
        self._apply(p, env[op.inputs[1]], self.roles[p].conv, env)
        return []

    # ---- the update: QAS, optimizer, storage ----------------------------------------------------------------
    def _apply(self, name: str, grad: torch.Tensor, conv: str | None, env: dict, fresh: bool = False) -> None:
        """`fresh`: `grad` is this call's own temporary (the QAS division and the learning rate then reuse its
        memory: the same float32 operations, without two more tensors of the parameter's size)."""
        cfg = self.cfg
        lr = float(env["lr"])
        if conv is not None and cfg.qas:  # QAS: divide by the squared per-channel scale of the parameter
            div = self._qas.get((name, grad.shape[0]))
            if div is None:
                cop = self.op_named[conv]
                x_scale = self.g.tensors[cop.inputs[0]].scale if self.roles[name].kind == "bias" else None
                div = torch.from_numpy(qas_divisor(self.g.tensors[cop.inputs[1]].scale, grad.shape[0], x_scale))
                self._qas[(name, grad.shape[0])] = div
            dv = div.view((-1,) + (1,) * (grad.dim() - 1))
            grad = grad.div_(dv) if fresh and grad.dtype == torch.float32 else grad / dv
            fresh = True  # this call's own tensor now, either way
        step = self.step_count + 1
        if cfg.optimizer == "sgd":
            delta = grad.mul_(lr) if fresh and grad.dtype == torch.float32 else lr * grad
        elif cfg.optimizer == "sgd-m":
            m = self.params[self.slots[name]["m"]]
            m.mul_(cfg.momentum).add_(grad)
            delta = lr * m
        else:
            m, v = self.params[self.slots[name]["m"]], self.params[self.slots[name]["v"]]
            b1, b2 = cfg.betas
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            delta = lr * (m / (1 - b1**step)) / (torch.sqrt(v / (1 - b2**step)) + cfg.eps)
        p = self.params[name]
        if p.dtype == torch.float32:
            p.sub_(delta.to(torch.float32))
        elif p.dtype == torch.int8:  # stochastic rounding, counter hash shared with the C runtime
            u = sr_uniform(cfg.seed, step, self.stream[name], p.numel()).view(p.shape)
            new = p.to(torch.float32)  # floor((p - delta) + u), clamped: in place, the same operations in order
            new.sub_(delta.to(torch.float32)).add_(u).floor_().clamp_(-128, 127)
            self.params[name] = q = new.to(torch.int8)
            self._wfloat[name] = (q, new, q._version)  # its float32 value, for the next FloatConv (same values as q)
        else:  # int32 bias: round to nearest
            self.params[name] = p - torch.round(delta.to(torch.float32)).to(torch.int32)

    KERNELS: dict[str, Callable] = {
        "conv2d": _conv2d, "add": _add, "avgpool": _avgpool, "linear": _linear, "slice_channels": _slice,
        "softmax_ce": _softmax_ce, "linear_grad_input": _linear_grad_input, "avgpool_grad": _avgpool_grad,
        "add_grad": _add_grad, "grad_add": _grad_add, "conv2d_grad_acc": _conv2d_grad_acc,
        "conv2d_grad_input": _conv2d_grad_input, "conv2d_update": _conv2d_update,
        "conv2d_weight_grad": _conv2d_weight_grad, "linear_update": _linear_update,
        "linear_weight_grad": _linear_weight_grad, "apply_update": _apply_update, "maxpool2d": _maxpool2d,
        "avgpool2d": _avgpool2d, "reshape": _reshape, "maxpool2d_grad": _maxpool2d_grad,
        "avgpool2d_grad": _avgpool2d_grad, "flatten": _flatten, "flatten_grad": _flatten_grad,
    }

    # ---- protocol -------------------------------------------------------------------------------------------
    def _env(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(x)
        return {self.g.inputs[0]: x if self.exact else x.to(torch.float32)}

    def run(self, ops: list[Op], env: dict, train: bool) -> dict[str, torch.Tensor]:
        last = {n: i for i, op in enumerate(ops) for n in op.inputs}  # a centered copy is dropped after its last use
        try:
            for i, op in enumerate(ops):
                outs = self.KERNELS[op.kind](self, op, env, train)
                for n, v in zip(op.outputs, outs, strict=False):
                    env[n] = quantize_per_channel(v) if self.g.tensors[n].dtype == "qint8" else v
                for n in op.inputs:
                    if last[n] == i:
                        self._cx.pop(n, None)
        finally:
            self._cx.clear()
        return env

    @torch.no_grad()
    def step(self, x: torch.Tensor | dict[str, torch.Tensor], y: torch.Tensor, lr: float) -> float:
        """One update on a batch. `x` is int8 images, or the dict `prefix(images)` returned (skips the prefix)."""
        env = dict(x) if isinstance(x, dict) else (self.prefix(x) if self.exact else None)
        if env is None:
            env, ops = self._env(x), self.g.ops
        else:
            ops = self.rest_ops
        env["label"] = torch.as_tensor(y)
        env["lr"] = torch.tensor(lr, dtype=torch.float32)
        self.run(ops, env, train=True)
        self.step_count += 1
        loss = float(env["loss"])
        return loss if math.isfinite(loss) else float("nan")

    @torch.no_grad()
    def logits(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, dict):
            return self.run(self.rest_forward_ops, dict(x), train=False)["logits"]
        if self.exact:
            return self.run(self.rest_forward_ops, self.prefix(x), train=False)["logits"]
        return self.run(self.forward_ops, self._env(x), train=False)["logits"]


def build_train_step(model: Graph, scheme, num_classes: int, *, precision: str = "int8",
                     cfg: TrainConfig | None = None) -> GraphTrainStep:
    """The host trainer's step for `model` under `scheme` (see autodiff.build.TrainConfig for the options)."""
    return GraphTrainStep(build_training_graph(model, scheme, num_classes, cfg), precision)
