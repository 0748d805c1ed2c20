"""C code generation: one training step of a scheduled training graph as a self-contained C99 project.

The generator reads the same objects the host executor and the planner read: the training graph (its op order is the
schedule), the arena plan (`Plan.offsets`, `Plan.aliases`) and, when the planner chose one, the patch stage in
`graph.meta["patch_stage"]` (ops, grid and the tile arena's own plan). Nothing is decided here: every activation and
gradient lives at its planned offset in one static arena of exactly `plan.arena_bytes`, every in-place op runs in
place exactly where the planner aliased it (with the planned one-channel scratch), and the ops run in graph order as
a straight line of kernel calls (`codegen/runtime/*.c`, one kernel per file).

Frozen int8 weights, int32 biases and the float32 multiplier / QAS tables are `const` (flash); the trainable state
(int8 weight slices, int32 biases, the fp32 head, optimizer slots) is initialised SRAM. Every float constant is
written as a C99 hexadecimal literal, so the C program computes with the host's exact float32 values.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.autodiff.build import TrainConfig
from microtrain.codegen.cnames import Names, c_comment, c_string
from microtrain.compiler.blockgrad import plane_bytes
from microtrain.compiler.patch import Region, make_stage
from microtrain.compiler.planner import Plan
from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph, Op
from microtrain.ir.quant import (
    Requant,
    add_fixed_point,
    add_ratios,
    conv_fixed_point,
    mean_fixed_point,
    qas_divisor,
    requant_multiplier,
)
from microtrain.ir.trainmeta import params as param_roles

TARGETS = ("host", "cortex-m4", "cortex-m7")
KERNEL_FILES = ("mt_conv2d.c", "mt_depthwise_conv2d.c", "mt_add.c", "mt_avgpool.c",
                "mt_slice_channels.c", "mt_linear.c", "mt_softmax_ce.c", "mt_linear_grad_input.c", "mt_avgpool_grad.c",
                "mt_add_grad.c", "mt_grad_add.c", "mt_conv2d_grad_acc.c", "mt_conv2d_grad_input.c",
                "mt_depthwise_grad_input.c", "mt_conv2d_update.c", "mt_linear_update.c", "mt_update.c", "mt_math.c",
                "mt_q8.c", "mt_profile.c", "mt_tflite.c", "mt_maxpool2d.c", "mt_avgpool2d.c", "mt_maxpool2d_grad.c",
                "mt_avgpool2d_grad.c", "mt_reshape.c", "mt_flatten.c", "mt_flatten_grad.c")
# (the channel-serial block backward's helpers live in the kernels they share code with; mt_profile.c is empty unless
# the profile build defines MT_PROFILE)
HARNESS_FILES = {"host": ("mt_main.c", "mt_io.h", "mt_io_host.c"),
                 "cortex-m4": ("mt_main.c", "mt_io.h", "mt_io_semihost.c", "mt_startup_m4.c", "mt_m4.ld"),
                 "cortex-m7": ("mt_main.c", "mt_io.h", "mt_io_semihost.c", "mt_startup_m4.c", "mt_m4.ld")}
C_DTYPE = {"int8": "int8_t", "int32": "int32_t", "float32": "float"}
MT_DTYPE = {"int8": "MT_I8", "int32": "MT_I32", "float32": "MT_F32"}
OPTIMIZER = {"sgd": "MT_SGD", "sgd-m": "MT_SGDM", "adam": "MT_ADAM"}


def runtime_dir() -> Path:
    return Path(str(resources.files("microtrain") / "codegen" / "runtime"))


# ---- literals --------------------------------------------------------------------------------------------------------
def c_float(v: float) -> str:
    """An exact float32 literal."""
    f = float(np.float32(v))
    if np.isnan(f):
        return "NAN"
    if np.isinf(f):
        return "INFINITY" if f > 0 else "-INFINITY"
    if f == 0:
        return "-0.0f" if np.signbit(f) else "0.0f"
    m, e = f.hex().split("p")
    return f"{m.rstrip('0').rstrip('.')}p{e}f"


def c_double(v: float) -> str:
    return float(v).hex()


def c_array(a: np.ndarray, per_line: int = 24) -> str:
    a = np.ascontiguousarray(a).reshape(-1)
    items = [c_float(v) for v in a.tolist()] if a.dtype == np.float32 else [str(int(v)) for v in a.tolist()]
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return "{\n  " + ",\n  ".join(lines) + "\n}" if items else "{0}"


def act_range(op: Op) -> str:
    """`act_min, act_max` of an op under Requant.TFLITE (a fused activation's int8 clamp)."""
    return f"{op.attrs.get('act_min', -128)}, {op.attrs.get('act_max', 127)}"


def chw(shape: tuple[int, ...]) -> str:
    """The mt_dims of a compact C x H x W tensor."""
    c, h, w = shape
    return f"(mt_dims){{{c}, {h}, {w}, {h * w}, {w}}}"


def block(call: str) -> str:
    """One statement in its own block: the lifetime of its compound literals ends with it (stack reuse)."""
    return call if call.startswith(("/*", "TRACE", "*F(")) else f"{{ {call} }}"



@dataclass
class View:
    """Where a (piece of a) CHW tensor lives: C expression of its element (c=0, r0, c0), strides, stored region."""

    ptr: str
    cs: int
    rs: int
    region: Region  # rows [r0, r1), cols [c0, c1) of the tensor that this view holds
    base: str = ""  # the buffer's start (in-place contracts compare it with ptr)

    def dims(self, c: int, region: Region | None = None) -> str:
        r0, r1, c0, c1 = region or self.region
        return f"(mt_dims){{{c}, {r1 - r0}, {c1 - c0}, {self.cs}, {self.rs}}}"

    def at(self, region: Region, cast: str = "int8_t *") -> str:
        """Pointer to element (0, region.r0, region.c0)."""
        dr, dc = region[0] - self.region[0], region[2] - self.region[2]
        off = dr * self.rs + dc
        return self.ptr if off == 0 else f"({self.ptr} + {off})"


@dataclass
class Program:
    """What the emitter produced (also written to OUT_DIR/program.json)."""

    arena_bytes: int
    state: list[dict[str, Any]] = field(default_factory=list)  # name, dtype, shape, nbytes, in save order
    state_fingerprint: int = 0
    traces: list[dict[str, Any]] = field(default_factory=list)  # tensors the trace hook dumps (first step), in order
    image_shape: tuple[int, ...] = ()
    num_classes: int = 0
    patch: dict[str, Any] | None = None
    config: dict[str, int] = field(default_factory=dict)  # mt_config.h
    stream_input: bool = False  # the patch stage reads its input tiles from the sensor callback


# ---- the emitter -----------------------------------------------------------------------------------------------------
class Emitter:
    def __init__(self, g: Graph, plan: Plan, state: dict[str, np.ndarray] | None = None):
        self.g, self.plan = g, plan
        tr = g.meta.get("train")
        if not tr:
            raise MicrotrainError(f"{g.name}: not a training graph (no meta['train'])")
        self.cfg = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in tr["config"].items()})
        if self.cfg.update_storage != "int8":
            raise MicrotrainError("the C generator supports int8 update storage only (--update-storage int8)")
        self.state_names: list[str] = list(tr["state"])
        self.roles = param_roles(g)  # meta["train"]["params"]: bias / weight slice / head / slot, and their op
        self.slots: dict[str, list[str]] = {n: [] for n in self.roles}  # parameter -> its slots (m, v order)
        for r in sorted((r for r in self.roles.values() if r.is_slot), key=lambda r: r.slot):
            self.slots[r.slot_of].append(r.name)
        self.stream = {n: i for i, n in enumerate(sorted(self.state_names))}
        self.values = {n: t.data for n, t in g.tensors.items() if t.data is not None}
        self.step0 = 0
        if state is not None:
            for n in self.state_names:
                if n not in state:
                    raise MicrotrainError(f"state has no tensor {n!r} of the training graph")
                a = np.asarray(state[n])
                t = g.tensors[n]
                if tuple(a.shape) != tuple(t.shape) or str(a.dtype) != t.dtype:
                    raise MicrotrainError(f"state tensor {n}: {a.dtype}{list(a.shape)} does not match the graph's "
                                          f"{t.dtype}{list(t.shape)}")
                self.values[n] = a
            self.step0 = int(np.asarray(state.get("__step__", 0)))
        self.names = Names()
        self.defined: set[str] = set()
        self.consts: list[str] = []  # flash definitions
        self.sram: list[str] = []  # state definitions
        self.params: dict[str, str] = {}  # state tensor -> mt_param identifier
        self.traces: list[dict[str, Any]] = []
        self.row_widths: list[int] = []  # output row widths of the convs (MT_ROW_MAX)
        self.prof_kinds: list[str] = []  # the profile build's op kinds (MT_PROF)
        self.stage = g.meta.get("patch_stage")
        self.streaming = bool(self.stage and self.stage.get("stream_input"))
        phases = [op.attrs.get("phase") for op in g.ops]
        nf = phases.count("forward")
        if phases[:nf] != ["forward"] * nf:
            raise MicrotrainError("schedule error: forward ops must come first")
        self.forward_ops, self.rest_ops = g.ops[:nf], g.ops[nf:]
        recomputed = [grp["recompute"] for grp in g.meta.get("block_grads", []) if grp.get("recompute")]
        self.unstored = {m for rc in recomputed for m in rc["masks"]}  # recomputed per channel in the backward
        self.dropped = {n for rc in recomputed for n in rc["drop_ops"]}

    # ---- buffers -----------------------------------------------------------------------------------------------
    def off(self, name: str) -> int:
        if name not in self.plan.offsets:
            raise MicrotrainError(f"tensor {name!r} has no arena offset in the plan")
        return self.plan.offsets[name]

    def act(self, name: str) -> str:
        """A tensor's arena pointer; a qint8 gradient's is its float32 scales (its int8 values follow them)."""
        t = self.g.tensors[name]
        return f"{'F' if t.dtype in ('float32', 'qint8') else 'B' if t.dtype == 'bit' else 'A'}({self.off(name)})"

    def whole(self, name: str) -> View:
        c, h, w = self.g.tensors[name].shape
        return View(self.act(name), h * w, w, (0, h, 0, w), self.act(name))

    def tensor(self, name: str) -> str:
        """A constant or state tensor's C array (defined on first use)."""
        t = self.g.tensors[name]
        if t.role == "state":
            ident = self.names("S", name)
            if ident not in self.defined:
                self.defined.add(ident)
                a = self.values[name]
                nonzero = a is not None and np.any(a)
                init = f" = {c_array(np.asarray(a, dtype=t.dtype))}" if nonzero else ""
                self.sram.append(f"static {C_DTYPE[t.dtype]} {ident}[{t.numel}]{init};  /* {c_comment(name)} */")
            return ident
        if t.data is None:
            raise MicrotrainError(f"tensor {name!r} ({t.role}) has no data")
        ident = self.names("W" if t.role == "weight" else "K", name)
        if ident not in self.defined:
            self.defined.add(ident)
            self.consts.append(f"static const {C_DTYPE[t.dtype]} {ident}[{t.numel}] = "
                               f"{c_array(np.asarray(t.data, dtype=t.dtype))};  /* {c_comment(name)} */")
        return ident

    def table(self, prefix: str, name: str, values: np.ndarray) -> str:
        ident = self.names(prefix, name)
        if ident not in self.defined:
            self.defined.add(ident)
            self.consts.append(f"static const float {ident}[{values.size}] = "
                               f"{c_array(values.astype(np.float32))};  /* {c_comment(name)} */")
        return ident

    def itable(self, prefix: str, name: str, values: np.ndarray) -> str:
        """A `static const int32_t` table in flash (the fixed-point multipliers and shifts of Requant.TFLITE)."""
        ident = self.names(prefix, name)
        if ident not in self.defined:
            self.defined.add(ident)
            self.consts.append(f"static const int32_t {ident}[{values.size}] = "
                               f"{c_array(np.asarray(values, np.int32))};  /* {c_comment(name)} */")
        return ident

    def define(self, ctype: str, prefix: str, key: str, init: str) -> str:
        """A `static const` descriptor in flash (a compound literal per call would cost stack in every call)."""
        ident = self.names(prefix, key)
        if ident not in self.defined:
            self.defined.add(ident)
            self.consts.append(f"static const {ctype} {ident} = {init};")
        return f"&{ident}"

    def mult(self, conv: Op) -> str:
        x, w, y = (self.g.tensors[n] for n in (conv.inputs[0], conv.inputs[1], conv.outputs[0]))
        return self.table("M", conv.name, requant_multiplier(x.scale, w.scale, y.scale))

    def weights(self, conv: Op) -> str:
        parts = conv.inputs[1:-1]
        w0 = self.g.tensors[parts[0]]
        k = w0.shape[2]
        if len(parts) == 2:
            return f"{{{self.tensor(parts[0])}, {self.tensor(parts[1])}, {w0.shape[conv.attrs['split_axis']]}, {k}}}"
        if w0.role == "state":
            n = w0.shape[0] if conv.attrs["groups"] > 1 else w0.shape[1]
            return f"{{{self.tensor(parts[0])}, 0, {n}, {k}}}"
        return f"{{0, {self.tensor(parts[0])}, 0, {k}}}"

    def param(self, name: str, conv: Op | None) -> str:
        """The mt_param descriptor of a trainable tensor (QAS table, slots, SR stream)."""
        if name in self.params:
            return self.params[name]
        t = self.g.tensors[name]
        slots = self.slots[name]
        ptrs = [self.tensor(s) for s in slots] + ["0"] * (2 - len(slots))
        qas, row = "0", 1
        if conv is not None and self.cfg.qas:  # ir/quant.py: the torch engine divides by the same table
            x_scale = self.g.tensors[conv.inputs[0]].scale if self.roles[name].kind == "bias" else None
            qas = self.table("Q", name, qas_divisor(self.g.tensors[conv.inputs[1]].scale, t.shape[0], x_scale))
            row = t.numel // t.shape[0]
        ident = self.names("P", name)
        self.consts.append(f"static const mt_param {ident} = {{{self.tensor(name)}, {MT_DTYPE[t.dtype]}, {t.numel}, "
                           f"{ptrs[0]}, {ptrs[1]}, {qas}, {row}, {self.stream[name]}u}};")
        self.params[name] = ident
        return ident

    # ---- forward kernels ---------------------------------------------------------------------------------------
    def conv_call(self, op: Op, xv: View, yv: View, want: Region, mask: str, scratch: str) -> str:
        g, a = self.g, op.attrs
        x, y = g.tensors[op.inputs[0]], g.tensors[op.outputs[0]]
        s, p = a["stride"], a["padding"]
        pad_top, pad_left = p + xv.region[0] - want[0] * s, p + xv.region[2] - want[2] * s
        groups = a["groups"]
        dw = groups > 1
        if dw and not (groups == x.shape[0] == y.shape[0]):
            raise MicrotrainError(f"{op.name}: grouped conv with groups={groups} is not supported by the C generator")
        conv = self.conv_descriptor(op, pad_top, pad_left)
        self.row_widths.append(want[3] - want[2])
        if self.g.requant == Requant.TFLITE:  # TFLite's fixed-point rule (mt_tflite.c)
            q, sh = conv_fixed_point(x.scale, g.tensors[op.inputs[1]].scale, y.scale)
            return (f"mt_conv2d_tfl({xv.ptr}, {xv.dims(x.shape[0])}, {conv}, {self.itable('QM', op.name, q)}, "
                    f"{self.itable('QS', op.name, sh)}, {act_range(op)}, {yv.at(want)}, "
                    f"{yv.dims(y.shape[0], want)}, {mask}, {int(dw)}, {scratch});")
        args = f"{xv.ptr}, {xv.dims(x.shape[0])}, {conv}, {yv.at(want)}, {yv.dims(y.shape[0], want)}, {mask}"
        if dw:
            return f"mt_depthwise_conv2d({args}, {scratch});"
        return f"mt_conv2d({args});"

    def conv_descriptor(self, op: Op, pad_top: int, pad_left: int) -> str:
        x, y = self.g.tensors[op.inputs[0]], self.g.tensors[op.outputs[0]]
        return self.define("mt_conv", "CV", f"{op.name}@{pad_top},{pad_left}",
                           f"{{{self.weights(op)}, {self.tensor(op.inputs[-1])}, {self.mult(op)}, "
                           f"{op.attrs['stride']}, {pad_top}, {pad_left}, {x.zero}, {y.zero}}}")

    def add_call(self, op: Op, av: View, bv: View, yv: View, want: Region, mask: str) -> str:
        at, bt, yt = (self.g.tensors[n] for n in (*op.inputs, op.outputs[0]))
        c = yt.shape[0]
        if self.g.requant == Requant.TFLITE:
            qa, sa, qb, sb, qy, sy = add_fixed_point(at.scale, bt.scale, yt.scale)
            return (f"mt_add_tfl({av.at(want)}, {av.dims(c, want)}, {at.zero}, {qa}, {sa}, {bv.at(want)}, "
                    f"{bv.dims(c, want)}, {bt.zero}, {qb}, {sb}, {yv.at(want)}, {yv.dims(c, want)}, {yt.zero}, {qy}, "
                    f"{sy}, {act_range(op)}, {mask});")
        ra, rb = add_ratios(at.scale, bt.scale, yt.scale)
        return (f"mt_add({av.at(want)}, {av.dims(c, want)}, {at.zero}, {c_float(ra)}, {bv.at(want)}, "
                f"{bv.dims(c, want)}, {bt.zero}, {c_float(rb)}, {yv.at(want)}, {yv.dims(c, want)}, {yt.zero}, {mask});")

    def forward_op(self, op: Op) -> list[str]:
        g = self.g
        mask = self.act(op.outputs[1]) if len(op.outputs) > 1 and op.outputs[1] not in self.unstored else "0"
        y = op.outputs[0]
        if op.kind == "conv2d":
            scratch = "0"
            if self.plan.aliases.get(y) == op.inputs[0]:
                scratch = f"A({self.off(op.name + '.scratch')})"
            h, w = g.tensors[y].shape[1:]
            code = [self.conv_call(op, self.whole(op.inputs[0]), self.whole(y), (0, h, 0, w), mask, scratch)]
        elif op.kind == "add":
            h, w = g.tensors[y].shape[1:]
            code = [self.add_call(op, self.whole(op.inputs[0]), self.whole(op.inputs[1]), self.whole(y), (0, h, 0, w),
                                  mask)]
        elif op.kind == "avgpool":
            c, h, w = g.tensors[op.inputs[0]].shape
            xt, yt = g.tensors[op.inputs[0]], g.tensors[y]
            if g.requant == Requant.TFLITE and op.attrs.get("mean"):
                q, sh = mean_fixed_point(xt.scale, yt.scale, h * w)
                code = [f"mt_mean_tfl({self.act(op.inputs[0])}, {c}, {h * w}, {xt.zero}, {q}, {sh}, {yt.zero}, "
                        f"{act_range(op)}, {self.act(y)});"]
            elif g.requant == Requant.TFLITE:
                code = [f"mt_avgpool_tfl({self.act(op.inputs[0])}, {c}, {h * w}, {act_range(op)}, {self.act(y)});"]
            else:
                code = [f"mt_avgpool({self.act(op.inputs[0])}, {c}, {h * w}, {self.act(y)});"]
        elif op.kind == "maxpool2d":
            code = [f"mt_maxpool2d({self.act(op.inputs[0])}, {self.pool(op)}, {self.act(y)});"]
        elif op.kind == "avgpool2d":
            code = [f"mt_avgpool2d({self.act(op.inputs[0])}, {self.pool(op)}, {int(g.requant == Requant.TFLITE)}, "
                    f"{self.act(y)});"]
        elif op.kind == "reshape":
            code = [self.reshape(op)]
        elif op.kind == "flatten":
            c, h, w = g.tensors[op.inputs[0]].shape
            code = [f"mt_flatten({self.act(op.inputs[0])}, {c}, {h * w}, {self.act(y)});"]
        elif op.kind == "slice_channels":
            code = [f"mt_slice_channels({self.act(op.inputs[0])}, {g.tensors[y].nbytes}, {self.act(y)});"]
        elif op.kind == "linear":
            x, w, b = (g.tensors[n] for n in op.inputs)
            if w.dtype != "float32":
                raise MicrotrainError("the C generator expects the training graph's fp32 head")
            code = [f"mt_linear({self.act(x.name)}, {x.shape[0]}, {x.zero}, {c_float(x.scale)}, {self.tensor(w.name)}, "
                    f"{self.tensor(b.name)}, {w.shape[0]}, {self.act(y)});"]
        else:
            raise MicrotrainError(f"op kind {op.kind!r} in the forward pass is not supported by the C generator")
        return code + self.trace(op.outputs[:1], "forward")

    def pool(self, op: Op) -> str:
        """The flash descriptor of a windowed pool (mt_pool.h) of forward op `op`."""
        from microtrain.ir.ops import pool_pads

        a = op.attrs
        c, h, w = self.g.tensors[op.inputs[0]].shape
        _, ho, wo = self.g.tensors[op.outputs[0]].shape
        t, _, left, _ = pool_pads(a)
        return self.define("mt_pool", "PL", op.name, f"{{{c}, {h}, {w}, {ho}, {wo}, {a['pool_h']}, {a['pool_w']}, "
                           f"{a['stride']}, {t}, {left}, {act_range(op)}}}")

    def reshape(self, op: Op) -> str:
        """(C,) <-> (C,1,1): a copy, or nothing where the planner aliased the two."""
        nbytes = self.g.tensors[op.outputs[0]].nbytes
        return f"mt_reshape({self.act(op.inputs[0])}, {self.act(op.outputs[0])}, {nbytes}u);"

    def trace(self, names: list[str], phase: str) -> list[str]:
        """Dump hook calls for whole tensors right after the op that wrote them (they may be overwritten later)."""
        code = []
        for n in names:
            t = self.g.tensors[n]
            if t.dtype in ("int8", "float32"):
                self.traces.append({"name": n, "dtype": t.dtype, "shape": list(t.shape), "phase": phase})
                code.append(f'TRACE({c_string(n)}, {self.act(n)}, {t.nbytes});')
        return code

    # ---- the patch stage: its ops tile by tile, intermediates in the tile arena -----------------------------------
    def patch_stage(self) -> list[str]:
        g, st = self.g, self.stage
        ops = [g.op(n) for n in st["ops"]]
        tiles = make_stage(g, ops, st["output"], st["grid"]).tiles
        tp = st["tile_plan"]
        # a one-op stage reads the image and writes the stage output (both outside): its tile arena is empty, and the
        # planner plans no zero-byte scratch, so nothing is addressed through `base` then
        base = self.off("patch_stage.scratch") if tp["arena_bytes"] else 0
        image = g.inputs[0]
        outer = {st["output"]} if self.streaming else {image, st["output"]}
        code = [f"/* patch stage: {len(ops)} ops up to {c_comment(st['output'])}, "
                f"{st['grid']}x{st['grid']} tiles, tile arena "
                f"{tp['arena_bytes']} B at {base} */"]
        for ti, regions in enumerate(tiles):
            code.append(f"/* tile {ti}: {c_comment(st['output'])} rows {regions[st['output']][:2]} cols "
                        f"{regions[st['output']][2:]} */")
            views: dict[str, View] = {n: self.whole(n) for n in outer}
            if self.streaming:  # the sensor writes this tile's input region into the tile arena
                r0, r1, c0, c1 = want = regions[image]
                c = g.tensors[image].shape[0]
                if c * (r1 - r0) * (c1 - c0) > int(np.prod(tp["shapes"][image])):
                    raise MicrotrainError(f"tile {ti}: the input region does not fit its tile buffer")
                ptr = f"A({base + tp['offsets'][image]})"
                views[image] = View(ptr, (r1 - r0) * (c1 - c0), c1 - c0, want, ptr)
                code.append(f"read_region({ptr}, {c}, {r0}, {r1}, {c0}, {c1});")
            for op in ops:
                y = op.outputs[0]
                want = regions.get(y)
                if want is None:
                    continue
                if len(op.outputs) > 1:
                    raise MicrotrainError(f"patch stage op {op.name} saves a mask: it is not frozen")
                c = g.tensors[y].shape[0]
                src = tp["aliases"].get(y)
                if y in outer:
                    yv = views[y]
                elif op.kind == "add" and src in op.inputs:  # in place: y takes over the input's buffer and layout
                    yv = views[src]
                else:  # a compact buffer for the want region (in-place depthwise: the same start as its input)
                    ptr = f"A({base + tp['offsets'][y]})"
                    yv = View(ptr, (want[1] - want[0]) * (want[3] - want[2]), want[3] - want[2], want, ptr)
                views[y] = yv
                if op.kind == "conv2d":
                    scratch = "0"
                    xv = views[op.inputs[0]]
                    if src == op.inputs[0]:
                        if xv.ptr != xv.base or xv.cs != (xv.region[1] - xv.region[0]) * xv.rs or yv.ptr != xv.base:
                            raise MicrotrainError(f"{op.name}: in-place tile over a strided view is not supported")
                        scratch = f"A({base + tp['offsets'][op.name + '.scratch']})"
                    code.append(self.conv_call(op, xv, yv, want, "0", scratch))
                elif op.kind == "add":
                    code.append(self.add_call(op, views[op.inputs[0]], views[op.inputs[1]], yv, want, "0"))
                else:
                    raise MicrotrainError(f"op kind {op.kind!r} inside a patch stage")
                total = c * (want[1] - want[0]) * (want[3] - want[2])
                if y not in outer and total > int(np.prod(tp["shapes"][y])):
                    raise MicrotrainError(f"tile {ti}: {y} needs {total} B, its tile buffer has "
                                          f"{int(np.prod(tp['shapes'][y]))}")
        return code + self.trace([st["output"]], "forward")

    # ---- loss, backward, updates -------------------------------------------------------------------------------
    def conv_of(self, param: str) -> Op | None:
        """The conv whose parameter `param` is (None for the head's)."""
        conv = self.roles[param].conv
        return None if conv is None else self.g.op(conv)

    def q8(self, op: Op) -> str:
        """The kernel suffix of a backward op: "_q8" when its activation gradients are qint8 (--int8-grads: autodiff
        makes every activation gradient qint8; parameter gradients and the loss's stay float32)."""
        return "_q8" if any(self.g.tensors[n].dtype == "qint8" for n in (*op.inputs, *op.outputs)) else ""

    def extent(self, op: Op, q8: str) -> str:
        """The size arguments of a per-element gradient kernel: elements, or channels and elements per channel."""
        t = self.g.tensors[op.inputs[0]]
        return f"{t.shape[0]}, {t.numel // t.shape[0]}" if q8 else str(t.numel)

    def workspace(self, op: Op) -> str:
        """The op's planned float32 workspace (`attrs["scratch_bytes"]` or its in-place rule's, `<op>.scratch`)."""
        return f"F({self.off(op.name + '.scratch')})"

    def backward_op(self, op: Op) -> list[str]:
        g, a = self.g, op.attrs
        t = g.tensors
        q8 = self.q8(op)
        if op.kind == "softmax_ce":
            z, _ = op.inputs
            return [f"*F({self.off(op.outputs[0])}) = mt_softmax_ce({self.act(z)}, {t[z].shape[0]}, "
                    f"*(const int32_t *)A({self.off('label')}), {self.act(op.outputs[1])});"]
        if op.kind == "linear_grad_input":
            gz, w = op.inputs
            pooled = t[g.meta["train"]["pooled"]]
            return [f"mt_linear_grad_input{q8}({self.act(gz)}, {self.tensor(w)}, {t[w].shape[0]}, {t[w].shape[1]}, "
                    f"{c_float(pooled.scale)}, {self.act(op.outputs[0])});"]
        if op.kind in ("linear_update", "linear_weight_grad"):
            gz, x = op.inputs[:2]
            xt = t[x]
            k = t[gz].shape[0]
            head = f"{self.act(gz)}, {self.act(x)}, {xt.shape[0]}, {xt.zero}, {c_float(xt.scale)}, {k}"
            if op.kind == "linear_weight_grad":
                return [f"mt_linear_weight_grad({head}, {self.act(op.outputs[0])}, {self.act(op.outputs[1])});"]
            pw, pb = (self.param(p, None) for p in a["params"])
            return [f"mt_linear_update(&st, {head}, &{pw}, &{pb});"]
        if op.kind == "avgpool_grad":
            c, h, w = t[op.outputs[0]].shape
            return [f"mt_avgpool_grad{q8}({self.act(op.inputs[0])}, {c}, {h * w}, {self.act(op.outputs[0])});"]
        if op.kind in ("maxpool2d_grad", "avgpool2d_grad"):
            d = self.pool(g.op(a["pool"]))
            tail = f"{self.act(op.outputs[0])}, {int(bool(q8))}, {self.workspace(op) if q8 else '0'}"
            if op.kind == "maxpool2d_grad":
                return [f"mt_maxpool2d_grad({self.act(op.inputs[0])}, {self.act(op.inputs[1])}, {d}, {tail});"]
            return [f"mt_avgpool2d_grad({self.act(op.inputs[0])}, {d}, {tail});"]
        if op.kind == "reshape":
            return [self.reshape(op)]
        if op.kind == "flatten_grad":
            c, h, w = t[op.outputs[0]].shape
            return [f"mt_flatten_grad({self.act(op.inputs[0])}, {c}, {h * w}, {self.act(op.outputs[0])}, "
                    f"{int(bool(q8))}, {self.workspace(op) if q8 else '0'});"]
        if op.kind == "add_grad":
            fwd = g.op(a["add"])
            at, bt, yt = (t[n] for n in (*fwd.inputs, fwd.outputs[0]))
            ra, rb = add_ratios(at.scale, bt.scale, yt.scale)
            outs = iter(op.outputs)
            ga, gb = (self.act(next(outs)) if want else "0" for want in a["which"])
            return [f"mt_add_grad{q8}({self.act(op.inputs[0])}, {self.act(op.inputs[1])}, {self.extent(op, q8)}, "
                    f"{c_float(ra)}, {c_float(rb)}, {ga}, {gb});"]
        if op.kind == "grad_add":
            return [f"mt_grad_add{q8}({self.act(op.inputs[0])}, {self.act(op.inputs[1])}, {self.extent(op, q8)}, "
                    f"{self.act(op.outputs[0])});"]
        if op.kind == "conv2d_grad_acc":
            c, h, w = t[op.inputs[0]].shape
            return [f"mt_conv2d_grad_acc{q8}({self.act(op.inputs[0])}, {self.act(op.inputs[1])}, {c}, {h * w}, "
                    f"{self.mult(g.op(a['conv']))}, {self.act(op.outputs[0])});"]
        if op.kind == "conv2d_grad_input":
            conv = g.op(a["conv"])
            gacc, gx = op.inputs[0], op.outputs[0]
            gd, xd = chw(t[gacc].shape), chw(t[gx].shape)
            wt = self.define("mt_weights", "WT", conv.name, self.weights(conv))
            head = f"{self.act(gacc)}, {gd}, {wt}, {a['stride']}, {a['padding']}"
            if q8:  # in place or not, each channel goes through the float32 workspace
                kernel = "mt_depthwise_grad_input" if conv.attrs["groups"] > 1 else "mt_conv2d_grad_input"
                return [f"{kernel}_q8({head}, {self.act(gx)}, {xd}, {self.workspace(op)});"]
            if conv.attrs["groups"] > 1:
                scratch = f"(float *)A({self.off(op.name + '.scratch')})" if self.plan.aliases.get(gx) == gacc else "0"
                return [f"mt_depthwise_grad_input({head}, {self.act(gx)}, {xd}, {scratch});"]
            return [f"mt_conv2d_grad_input({head}, {self.act(gx)}, {xd});"]
        if op.kind in ("conv2d_update", "conv2d_weight_grad"):
            o = self.conv_grad_operands(op)
            plane = f", {self.workspace(op)}" if q8 else ""
            head = f"{self.act(op.inputs[0])}, {o['gd']}, {o['x']}, {o['xd']}, {o['xz']}, {o['geo']}"
            if op.kind == "conv2d_weight_grad":
                return [f"mt_conv2d_weight_grad{q8}({head}, {a['channels']}, {o['gw']}, {o['gb']}{plane});"]
            return [f"mt_conv2d_update{q8}(&st, {head}, {o['w']}, {o['b']}{plane});"]
        if op.kind == "apply_update":
            p = a["param"]
            conv = self.conv_of(p)
            return [f"mt_apply_update(&st, &{self.param(p, conv)}, {self.act(op.inputs[1])});"]
        raise MicrotrainError(f"op kind {op.kind!r} is not supported by the C generator")

    def conv_grad_operands(self, op: Op, x_plane: str | None = None) -> dict[str, str]:
        """The C operands of a conv's weight/bias gradient op (fused update or materialised gradients): g_acc's dims,
        the saved input (or `x_plane`, where it is recomputed), its dims and zero point, the geometry, and the
        parameters or gradient buffers."""
        a, t = op.attrs, self.g.tensors
        conv = self.g.op(a["conv"])
        o = {"gd": chw(t[op.inputs[0]].shape), "x": "0", "xd": chw((0, 0, 0)), "xz": "0",
             "geo": f"{a['kernel']}, {a['stride']}, {a['padding']}, {int(a['depthwise'])}",
             "w": "0", "b": "0", "gw": "0", "gb": "0"}
        if a["channels"]:
            xt = t[op.inputs[1]]
            o.update(xd=chw(xt.shape), xz=str(xt.zero), x=x_plane if x_plane is not None else self.act(xt.name))
        if op.kind == "conv2d_weight_grad":
            for p, out in zip(a["params"], op.outputs, strict=True):
                o["gw" if self.roles[p].kind == "weight_slice" else "gb"] = self.act(out)
        else:
            for p in a["params"]:
                o["w" if self.roles[p].kind == "weight_slice" else "b"] = f"&{self.param(p, conv)}"
        return o

    def grads_row(self, op: Op, plane: str, channel: str, x_plane: str | None = None) -> str:
        """One output channel of a conv's fused update (or, reorder off, of its materialised gradients). `x_plane`:
        a depthwise conv's saved input channel, recomputed into a plane of its own."""
        o = self.conv_grad_operands(op, x_plane)
        xc0 = channel if x_plane is not None else "0"
        step = "0" if op.kind == "conv2d_weight_grad" else "&st"
        return (f"mt_conv2d_grads_row({step}, {plane}, {channel}, {o['gd']}, {o['x']}, {xc0}, {o['xd']}, {o['xz']}, "
                f"{o['geo']}, {op.attrs['channels']}, {o['w']}, {o['b']}, {o['gw']}, {o['gb']});")

    def grads_rows(self, op: Op, planes: str, first: str, count: str) -> str:
        """Output channels first .. first + count - 1 of a conv's fused update (or materialised gradients), their
        planes one after another from `planes`: a pointwise conv's four at a time (mt_conv2d_grads_rows)."""
        o = self.conv_grad_operands(op)
        step = "0" if op.kind == "conv2d_weight_grad" else "&st"
        return (f"mt_conv2d_grads_rows({step}, {planes}, {first}, {count}, {o['gd']}, {o['x']}, {o['xd']}, "
                f"{o['xz']}, {o['geo']}, {op.attrs['channels']}, {o['w']}, {o['b']}, {o['gw']}, {o['gb']});")

    def block_grad(self, grp: dict[str, Any]) -> str:
        """An inverted-residual block's backward one expanded channel e at a time (compiler/blockgrad.py): each
        member's per-channel body in schedule order, through two float32 planes, pw1's input gradient accumulated."""
        g, t = self.g, self.g.tensors
        r = {k: g.op(v) for k, v in grp["roles"].items()}
        by_name = {v: k for k, v in grp["roles"].items()}
        e_count = grp["channels"]
        x = r["pw2_gi"]
        pw2, dw = g.op(x.attrs["conv"]), g.op(r["dw_acc"].attrs["conv"])
        hw2 = int(np.prod(t[x.outputs[0]].shape[1:]))
        hw1 = int(np.prod(t[dw.inputs[0]].shape[1:]))
        out = grp["output"]
        scratch = f"F({self.off(grp['block'] + '.block_grad.scratch')})"
        q8 = {n: t[n].dtype == "qint8" for m in r.values() for n in m.outputs if n in t}
        batched = "pw1_gi" in r  # pw1's gradient planes join the input-gradient sums grp["batch"] channels per pass
        batch = grp.get("batch", 1)
        pre, body, after, post = [f"float *pa = {scratch}, *pbs = pa + {hw2};"], [], [], []

        def rounded(name: str, plane: str, n: int) -> list[str]:
            return [f"mt_q8_round({plane}, {n});"] if q8.get(name) else []

        rc = grp.get("recompute")
        if rc:  # pw1's and dw's output channel e recomputed (int8 planes, their mask bits) instead of stored
            pw1c, dwc, x = g.op(rc["pw1"]), g.op(rc["dw"]), rc["x"]
            y1, y2 = t[pw1c.outputs[0]], t[dwc.outputs[0]]
            area = f"A({self.off(grp['block'] + '.block_grad.scratch') + grp['scratch_bytes'] - rc['bytes']})"
            pre += [f"int8_t *y1 = {area}, *y2 = y1 + {hw1};",
                    f"uint8_t *m1 = (uint8_t *)(y2 + {hw2}), *m2 = m1 + {-(-hw1 // 8)};"]
            p1, p2 = pw1c.attrs["padding"], dwc.attrs["padding"]
            d1, d2 = chw((1, *y1.shape[1:])), chw((1, *y2.shape[1:]))
            c1 = f"const mt_conv c1 = mt_conv_channel({self.conv_descriptor(pw1c, p1, p1)}, {t[x].shape[0]}, e, 0);"
            c2 = f"const mt_conv c2 = mt_conv_channel({self.conv_descriptor(dwc, p2, p2)}, {e_count}, e, 1);"
            if g.requant == Requant.TFLITE:  # channel e's fixed-point multiplier and shift: the tables from e on
                def fixed(op: Op) -> tuple[str, str]:
                    q, sh = conv_fixed_point(t[op.inputs[0]].scale, t[op.inputs[1]].scale, t[op.outputs[0]].scale)
                    return self.itable("QM", op.name, q), self.itable("QS", op.name, sh)
                (q1, s1), (q2, s2) = fixed(pw1c), fixed(dwc)
                body += [f"{{ {c1} mt_conv2d_tfl({self.act(x)}, {chw(t[x].shape)}, &c1, {q1} + e, {s1} + e, "
                         f"{act_range(pw1c)}, y1, {d1}, m1, 0, 0); }}",
                         f"{{ {c2} mt_conv2d_tfl(y1, {d1}, &c2, {q2} + e, {s2} + e, {act_range(dwc)}, y2, {d2}, m2, "
                         "1, 0); }"]
            else:
                body += [f"{{ {c1} mt_conv2d({self.act(x)}, {chw(t[x].shape)}, &c1, y1, {d1}, m1); }}",
                         f"{{ {c2} mt_depthwise_conv2d(y1, {d1}, &c2, y2, {d2}, m2, 0); }}"]
        if batched:
            cin = t[out].shape[0]
            need = plane_bytes(hw1, hw2, batch, cin * hw1, q8[out])
            if need > grp["scratch_bytes"]:
                raise MicrotrainError(f"{grp['block']}: the plan reserved {grp['scratch_bytes']} bytes of block "
                                      f"scratch, the channel planes need {need}")
            total = f"pbs + {batch * hw1}" if q8[out] else self.act(out)
            pre += [f"float *total = {total};", f"for (int32_t i = 0; i < {cin * hw1}; i++) total[i] = 0.0f;"]
            if q8[out]:
                post += [f"for (int32_t c = 0; c < {cin}; c++) {self.act(out)}[c] = mt_q8_quantize(total + c * {hw1}, "
                         f"{hw1}, (int8_t *)({self.act(out)} + {cin}) + c * {hw1});"]
        for name in grp["members"]:
            role, op = by_name[name], g.op(name)
            if role == "pw2_gi":
                gacc = op.inputs[0]
                wt = self.define("mt_weights", "WT", pw2.name, self.weights(pw2))
                body += [f"mt_pw_grad_input_channel({self.act(gacc)}, {chw(t[gacc].shape)}, {wt}, {e_count}, e, "
                         f"{hw2}, {int(t[gacc].dtype == 'qint8')}, pa);", *rounded(op.outputs[0], "pa", hw2)]
            elif role in ("dw_acc", "pw1_acc"):
                plane, n = ("pa", hw2) if role == "dw_acc" else ("pb", hw1)
                mask, c = (("m2" if role == "dw_acc" else "m1"), "0") if rc else (self.act(op.inputs[1]), "e")
                body += [f"mt_conv2d_grad_acc_plane({plane}, {mask}, {c}, {n}, "
                         f"{self.mult(g.op(op.attrs['conv']))}[e]);", *rounded(op.outputs[0], plane, n)]
            elif role == "dw_upd":
                body.append(self.grads_row(op, "pa", "e", "y1" if rc else None))
            elif role == "pw1_upd":  # batched: after the pass that read row e of W1 (a weight update must follow it)
                if batched:
                    after.append(self.grads_rows(op, "pbs", "e0", "n"))
                else:
                    body.append(self.grads_row(op, "pb", "e"))
            elif role == "dw_gi":
                wt = self.define("mt_weights", "WT", dw.name, self.weights(dw))
                gd, xd = chw(t[op.inputs[0]].shape), chw(t[op.outputs[0]].shape)
                call = f"{wt}, e, {op.attrs['stride']}, {op.attrs['padding']}"
                if op.outputs[0] == out and not q8[out]:  # the group's output: channel e straight into it
                    dst = f"{self.act(out)} + e * {hw1}"
                    body.append(f"mt_depthwise_grad_input_channel(pa, {gd}, {call}, {dst}, {xd});")
                else:
                    body.append(f"mt_depthwise_grad_input_channel(pa, {gd}, {call}, pb, {xd});")
                    if op.outputs[0] == out:
                        body.append(f"{self.act(out)}[e] = mt_q8_quantize(pb, {hw1}, (int8_t *)({self.act(out)} + "
                                    f"{e_count}) + e * {hw1});")
                    else:
                        body += rounded(op.outputs[0], "pb", hw1)
            if role != "pw1_upd" or not batched:
                body.append(self.prof(f"block_grad {self.prof_kind(op)}"))
            else:
                after.append(self.prof(f"block_grad {self.prof_kind(op)}"))
        if rc:
            body.insert(2, self.prof("block_grad recompute"))
        text = " ".join

        if not batched:
            loop = f"for (int32_t e = 0; e < {e_count}; e++) {{ float *pb = pbs; (void)pb; {text(body)} }}"
        else:
            pw1 = g.op(r["pw1_gi"].attrs["conv"])
            wt = self.define("mt_weights", "WT", pw1.name, self.weights(pw1))
            plane = f"float *pb = pbs + (e - e0) * {hw1};"
            loop = (f"for (int32_t e0 = 0; e0 < {e_count};) {{ "
                    f"const int32_t n = {e_count} - e0 < {batch} ? {e_count} - e0 : {batch}; "
                    f"for (int32_t e = e0; e < e0 + n; e++) {{ {plane} {text(body)} }} "
                    f"mt_pw_grad_input_accumulate(pbs, n, {wt}, {cin}, e0, {hw1}, total); "
                    f"{self.prof('block_grad ' + self.prof_kind(r['pw1_gi']))} "
                    + (f"{text(after)} " if after else "")
                    + "e0 += n; }")
        return "{ " + text(pre) + " " + loop + " " + text(post) + " }"

    # ---- whole program -----------------------------------------------------------------------------------------
    def emit(self) -> tuple[str, str, Program]:
        g = self.g
        image = g.inputs[0]
        img = g.tensors[image]
        classes = int(g.meta["train"]["num_classes"])
        fwd: list[str] = []
        stage_ops = set(self.stage["ops"]) if self.stage else set()
        if self.stage:
            if [o.name for o in self.forward_ops[:len(stage_ops)]] != self.stage["ops"]:
                raise MicrotrainError("the patch stage is not a prefix of the schedule")
            fwd += [line if line.startswith(("/*", "TRACE")) else block(line) for line in self.patch_stage()]
            fwd.append(self.prof("patch_stage"))
        for op in self.forward_ops:
            if op.name not in stage_ops and op.name not in self.dropped:
                fwd += [f"/* {c_comment(op.name)}: {c_comment(op.kind)} */", *map(block, self.forward_op(op)),
                        self.prof(self.prof_kind(op))]
        bwd: list[str] = []
        groups = {grp["members"][0]: grp for grp in g.meta.get("block_grads", [])}
        skip: set[str] = set()
        for op in self.rest_ops:
            if op.name in skip:
                continue
            if op.name in groups:
                grp = groups[op.name]
                skip.update(grp["members"])
                bwd += [f"/* {c_comment(grp['block'])}: channel-serial backward of "
                        f"{c_comment(', '.join(grp['members']))} */",
                        self.block_grad(grp), *self.trace(grp["outputs"], "backward"), self.prof("block_grad")]
                continue
            bwd += [f"/* {c_comment(op.name)}: {c_comment(op.kind)} */", *map(block, self.backward_op(op)),
                    *self.trace(op.outputs, op.attrs.get("phase", "backward")), self.prof(self.prof_kind(op))]
        for n in self.state_names:  # state that no op touched (e.g. a frozen head) still belongs to the state
            self.tensor(n)
        layout = [{"name": n, "dtype": g.tensors[n].dtype, "shape": list(g.tensors[n].shape),
                   "nbytes": g.tensors[n].nbytes} for n in self.state_names]
        fp = zlib.crc32(";".join(f"{s['name']}:{s['dtype']}:{s['shape']}" for s in layout).encode())
        o = self.cfg
        opt = (f"static const mt_optimizer OPT = {{{OPTIMIZER[o.optimizer]}, {c_float(o.momentum)}, "
               f"{c_float(o.betas[0])}, {c_float(o.betas[1])}, {c_float(1 - o.betas[0])}, {c_float(1 - o.betas[1])}, "
               f"{c_float(o.eps)}, {c_double(o.betas[0])}, {c_double(o.betas[1])}, {int(o.seed) & 0xFFFFFFFF}u}};")
        kinds = {n: "MT_STATE_F32" if g.tensors[n].dtype == "float32" else "MT_STATE_RAW" for n in self.state_names}
        state_table = "\n".join(f'  {{{self.tensor(n)}, {g.tensors[n].nbytes}u, {kinds[n]}}},  /* {c_comment(n)} */'
                                for n in self.state_names)
        header = HEADER.format(c=img.shape[0], h=img.shape[1], w=img.shape[2], image_bytes=img.nbytes,
                               classes=classes, arena=self.plan.arena_bytes, name=c_comment(g.name), fingerprint=fp,
                               state_bytes=sum(s["nbytes"] for s in layout), stream=int(self.streaming))
        inputs = (STREAM_INPUT if self.streaming else SLOT_INPUT).format(image=self.off(image) if not self.streaming
                                                                          else -1, image_bytes=img.nbytes)
        source = SOURCE.format(
            name=c_comment(g.name),
            consts="\n".join(self.consts), sram="\n".join(self.sram), arena=self.plan.arena_bytes,
            optimizer=opt, forward="\n  ".join(fwd), backward="\n  ".join(bwd), inputs=inputs,
            loss=self.off("loss"), label=self.off("label"), lr=self.off("lr"),
            logits=self.off("logits"), classes=classes, step0=self.step0, state_table=state_table,
            state_count=len(self.state_names) + 1,
            prof_names=", ".join(c_string(k) for k in self.prof_kinds) or "0", prof_count=len(self.prof_kinds))
        prog = Program(self.plan.arena_bytes, layout, fp, list(self.traces), tuple(img.shape), classes,
                       {k: v for k, v in self.stage.items() if k != "tile_plan"} if self.stage else None,
                       self.config(), self.streaming)
        return header, source, prog

    # ---- the profile build (make profile): instructions per op kind ----------------------------------------------
    def prof(self, kind: str) -> str:
        """`MT_PROF(k);`: charges the time since the previous mark to op kind k (nothing unless MT_PROFILE)."""
        if kind not in self.prof_kinds:
            self.prof_kinds.append(kind)
        return f"MT_PROF({self.prof_kinds.index(kind)});"

    def prof_kind(self, op: Op) -> str:
        """The profile's name for an op: its kind, convolutions split into pointwise / depthwise / k x k."""
        if op.kind not in ("conv2d", "conv2d_grad_input", "conv2d_update", "conv2d_weight_grad"):
            return op.kind
        conv = op if op.kind == "conv2d" else self.g.op(op.attrs["conv"])
        k = self.g.tensors[conv.inputs[1]].shape[2]
        sub = "depthwise" if conv.attrs["groups"] > 1 else "pointwise" if k == 1 else f"{k}x{k}"
        return f"{op.kind} {sub}"

    def config(self) -> dict[str, int]:
        """mt_config.h: sizes the runtime needs from this graph (the widest conv output row)."""
        return {"MT_ROW_MAX": max([1, *self.row_widths])}


HEADER = """\
/* Generated by microtrain from {name}: one on-device training step. Do not edit. */
#ifndef MT_MODEL_H
#define MT_MODEL_H

#include <stdint.h>

#include "mt_state.h"

#define MT_IMAGE_C {c}
#define MT_IMAGE_H {h}
#define MT_IMAGE_W {w}
#define MT_IMAGE_BYTES {image_bytes}
#define MT_NUM_CLASSES {classes}
#define MT_ARENA_BYTES {arena}
#define MT_STATE_BYTES {state_bytes}

/* 1: the early stage runs patch by patch and reads each patch's input region from the image source, so the whole
 * image never sits in SRAM (microtrain plan --stream-input); 0: the image is copied into its arena slot. */
#define MT_STREAM_INPUT {stream}

/* An image source (camera, file, memory): copy n pixels (int8, pixel - 128) of channel ch, row `row`, columns
 * col .. col + n - 1 into dst; return 0 on success. */
typedef int (*mt_input_fn)(void *ctx, int8_t *dst, int32_t ch, int32_t row, int32_t col, int32_t n);

/* One SGD step on one image (int8 CHW, pixel - 128); returns the loss before the update. */
float train_step(const int8_t *image, int label, float lr);
/* The same, reading the image from a source; NAN and no update if the source failed. */
float train_step_from(mt_input_fn read, void *ctx, int label, float lr);
/* The predicted class; the fp32 logits too if `logits` is not NULL. */
int predict(const int8_t *image, float *logits);
/* The same from a source; -1 if the source failed. */
int predict_from(mt_input_fn read, void *ctx, float *logits);
#if !MT_STREAM_INPUT
/* The image slot inside the arena: write an image here and pass this pointer to skip a copy. */
int8_t *input_buffer(void);
#endif
/* Updates applied so far (the stochastic-rounding counter; saved with the state). */
uint32_t trained_steps(void);

/* The trainable state and the step counter in two slots of a store (flash pages, a file: mt_state.h). save_state
 * writes the slot that does not hold the newest valid state, its header last; load_state takes the newest slot whose
 * header and CRC-32 check out and leaves the live state untouched when there is none. 0 on success, MT_STATE_* < 0
 * otherwise. */
#define MT_STATE_FINGERPRINT {fingerprint}u /* CRC-32 of the state's names, dtypes and shapes */
#define MT_STATE_PAYLOAD_BYTES (4u + MT_STATE_BYTES)
int save_state(const mt_store *store);
int load_state(const mt_store *store);

/* Debug hook: called with every int8 activation of the whole-tensor forward pass when not NULL. */
extern void (*mt_trace)(const char *name, const void *data, uint32_t nbytes);

#endif
"""

SLOT_INPUT = """
int8_t *input_buffer(void) {{ return A({image}); }}

static void set_input(const int8_t *image) {{
  input_failed = 0;
  if (image != A({image})) memcpy(A({image}), image, {image_bytes});
}}

static void set_source(mt_input_fn read, void *ctx) {{
  input_fn = read, input_ctx = ctx, input_failed = 0;
  read_region(A({image}), MT_IMAGE_C, 0, MT_IMAGE_H, 0, MT_IMAGE_W);
}}
"""

STREAM_INPUT = """
static int read_memory(void *ctx, int8_t *dst, int32_t ch, int32_t row, int32_t col, int32_t n) {{
  memcpy(dst, (const int8_t *)ctx + (ch * MT_IMAGE_H + row) * MT_IMAGE_W + col, (size_t)n);
  return 0;
}}

static void set_source(mt_input_fn read, void *ctx) {{ input_fn = read, input_ctx = ctx, input_failed = 0; }}

static void set_input(const int8_t *image) {{ set_source(read_memory, (void *)image); }}
"""

SOURCE = """\
/* Generated by microtrain from {name}: the scheduled training step as a straight line of kernel calls over one
 * static arena planned by compiler/planner.py. Do not edit. */
#include <math.h>
#include <string.h>

#include "model.h"
#include "mt_pool.h"
#include "mt_runtime.h"
#include "mt_tflite.h"

/* ---- trainable state (SRAM) ----------------------------------------------------------------------------------- */
{sram}
static uint32_t steps = {step0}u;

/* ---- frozen constants (flash) and the update descriptors of the state ------------------------------------------ */
{consts}

/* ---- the arena: every activation, mask and gradient at its planned offset ------------------------------------- */
static uint8_t arena[{arena}] __attribute__((aligned(8)));
#define A(off) ((int8_t *)(arena + (off)))
#define F(off) ((float *)(arena + (off)))
#define B(off) ((uint8_t *)(arena + (off)))

{optimizer}

/* ---- the image source ----------------------------------------------------------------------------------------- */
static mt_input_fn input_fn;
static void *input_ctx;
static int input_failed;

/* rows [r0, r1) x cols [c0, c1) of every channel, compact (channel, row, col), from the source */
static void read_region(int8_t *dst, int32_t c, int32_t r0, int32_t r1, int32_t c0, int32_t c1) {{
  for (int32_t ch = 0; ch < c; ch++)
    for (int32_t r = r0; r < r1; r++, dst += c1 - c0)
      if (!input_failed && input_fn(input_ctx, dst, ch, r, c0, c1 - c0)) input_failed = 1;
}}
{inputs}
void (*mt_trace)(const char *name, const void *data, uint32_t nbytes) = 0;
#define TRACE(name, ptr, n) do {{ if (mt_trace) mt_trace(name, ptr, n); }} while (0)

#ifdef MT_PROFILE
static const char *const prof_names[] = {{{prof_names}}};
#define MT_PROF_STEP() mt_prof_report(prof_names, {prof_count})
#else
#define MT_PROF_STEP() ((void)0)
#endif

static void forward(void) {{
  MT_PROF(-1);
  {forward}
}}

static void backward(float lr) {{
  const uint32_t step = steps + 1;
  const mt_step st = {{&OPT, lr, step, (float)(1.0 - mt_powi(OPT.beta1_d, step)),
                      (float)(1.0 - mt_powi(OPT.beta2_d, step))}};
  (void)st;
  {backward}
}}

uint32_t trained_steps(void) {{ return steps; }}

static float run_step(int label, float lr) {{
  *(int32_t *)A({label}) = label;
  *F({lr}) = lr;
  forward();
  if (input_failed) return NAN;
  backward(lr);
  steps++;
  MT_PROF_STEP();
  return *F({loss});
}}

static int run_predict(float *logits) {{
  forward();
  if (input_failed) return -1;
  const float *z = F({logits});
  int best = 0;
  for (int k = 0; k < {classes}; k++) {{
    if (z[k] > z[best]) best = k;
    if (logits) logits[k] = z[k];
  }}
  return best;
}}

float train_step(const int8_t *image, int label, float lr) {{
  set_input(image);
  return run_step(label, lr);
}}

int predict(const int8_t *image, float *logits) {{
  set_input(image);
  return run_predict(logits);
}}

float train_step_from(mt_input_fn read, void *ctx, int label, float lr) {{
  set_source(read, ctx);
  return run_step(label, lr);
}}

int predict_from(mt_input_fn read, void *ctx, float *logits) {{
  set_source(read, ctx);
  return run_predict(logits);
}}

/* ---- state: the step counter, then every state tensor in the graph's order (mt_state.c) ------------------------ */
static const mt_state_part state_parts[] = {{
  {{&steps, 4u, MT_STATE_RAW}},
{state_table}
}};

int save_state(const mt_store *store) {{
  return mt_state_save(store, MT_STATE_FINGERPRINT, state_parts, {state_count}u);
}}

int load_state(const mt_store *store) {{
  return mt_state_load(store, MT_STATE_FINGERPRINT, state_parts, {state_count}u);
}}
"""
