"""Compile-time autodiff: forward int8 graph + sparse scheme -> one training-step graph.

The result is ordinary IR: the forward ops (now also saving 1-bit clamp masks and channel slices where a backward
op will need them), a new fp32 head, the softmax cross-entropy loss, and the backward ops. Backward pruning is
structural: a gradient is only ever created for a tensor from which some trainable parameter can be reached
upstream, and a saved tensor (mask, slice) only for an op whose backward exists. With `reorder=True` every
parameter is updated by a fused op right where its gradient appears (the paper's operator reordering); with
`reorder=False` the weight gradients are materialised and applied after the whole backward pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph, Op, Tensor
from microtrain.ir.trainmeta import Param

OPTIMIZERS = ("sgd", "sgd-m", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Choices baked into the training graph (they change its tensors, hence its memory)."""

    optimizer: str = "sgd"  # sgd (no momentum, the paper's choice) | sgd-m | adam
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    qas: bool = True
    reorder: bool = True
    update_storage: str = "int8"  # int8 (stochastic rounding) | fp32 (float shadow of the trainable slices)
    int8_grads: bool = False  # activation gradients stored as per-channel quantized int8 ("qint8") instead of fp32
    seed: int = 0


def _state_slots(cfg: TrainConfig) -> tuple[str, ...]:
    return {"sgd": (), "sgd-m": ("m",), "adam": ("m", "v")}[cfg.optimizer]


def build_training_graph(fwd: Graph, scheme, num_classes: int, cfg: TrainConfig | None = None) -> Graph:
    """Derive the training graph of `fwd` for `scheme` with a fresh fp32 head of `num_classes` outputs."""
    cfg = cfg or TrainConfig()
    if cfg.optimizer not in OPTIMIZERS:
        raise MicrotrainError(f"unknown optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if cfg.update_storage not in ("int8", "fp32"):
        raise MicrotrainError(f"unknown update storage {cfg.update_storage!r} (int8 or fp32)")
    g = Graph(name=f"{fwd.name}:train", inputs=list(fwd.inputs), meta=copy.deepcopy(fwd.meta))
    for n in fwd.inputs:
        g.add_tensor(copy.copy(fwd.tensors[n]))
    convs = {o.attrs["conv_index"]: o for o in fwd.convs()}
    bias_set = set(scheme.bias_convs(fwd))
    channels = {i: scheme.updated_channels(fwd, i) for i in convs}
    trainable_ops = {convs[i].name for i in convs if i in bias_set or channels[i] > 0}

    # ---- which tensors need a gradient (reachable from a trainable parameter, forward direction) ----------
    needs: set[str] = set()
    for op in fwd.ops:
        if op.name in trainable_ops or any(n in needs for n in op.inputs):
            needs.update(op.outputs)
    backbone_grad = fwd.ops[-1].inputs[0] in needs  # does any gradient reach the pooled features?

    # ---- forward part ------------------------------------------------------------------------------------
    saved: dict[str, str] = {}  # op name -> saved input slice tensor
    masks: dict[str, str] = {}
    state: list[str] = []
    roles: dict[str, Param] = {}  # meta["train"]["params"] (ir/trainmeta.py): what each parameter tensor is
    for op in fwd.ops[:-1]:  # all but the ImageNet head
        new = Op(op.name, op.kind, list(op.inputs), list(op.outputs), {**op.attrs, "phase": "forward"})
        for n in op.outputs:
            g.add_tensor(copy.copy(fwd.tensors[n]))
        for n in op.inputs:
            if n not in g.tensors:
                g.add_tensor(copy.copy(fwd.tensors[n]))
        y = fwd.tensors[op.outputs[0]]
        if op.outputs[0] in needs and backbone_grad and op.kind in ("conv2d", "add"):
            masks[op.name] = f"{op.name}.mask"
            g.add_tensor(Tensor(masks[op.name], y.shape, "bit", "mask"))
            new.outputs.append(masks[op.name])
        if op.kind == "conv2d" and backbone_grad:
            i = op.attrs["conv_index"]
            _split_trainable(g, new, fwd, channels[i], i in bias_set, state, cfg.update_storage, roles)
        g.add_op(new)
        if op.kind == "conv2d" and backbone_grad and channels[op.attrs["conv_index"]] > 0:
            x = fwd.tensors[op.inputs[0]]
            ch = channels[op.attrs["conv_index"]]
            if ch == x.shape[0]:
                saved[op.name] = x.name
            else:
                saved[op.name] = f"{op.name}.x_saved"
                g.add_tensor(Tensor(saved[op.name], (ch, *x.shape[1:]), "int8", "act", x.scale, x.zero))
                g.add_op(Op(f"{op.name}.save", "slice_channels", [x.name], [saved[op.name]],
                            {"channels": ch, "phase": "forward"}))

    # ---- new fp32 head and loss ---------------------------------------------------------------------------
    pooled = fwd.ops[-1].inputs[0]
    c_feat = fwd.tensors[pooled].shape[0]
    head_role = "state" if scheme.head else "weight"
    g.add_tensor(Tensor("head.w", (num_classes, c_feat), "float32", head_role,
                        data=np.zeros((num_classes, c_feat), np.float32)))
    g.add_tensor(Tensor("head.b", (num_classes,), "float32", head_role, data=np.zeros(num_classes, np.float32)))
    if scheme.head:
        state += ["head.w", "head.b"]
    roles["head.w"], roles["head.b"] = Param("head.w", "head_weight", "head"), Param("head.b", "head_bias", "head")
    g.add_tensor(Tensor("logits", (num_classes,), "float32", "act"))
    g.add_op(Op("head", "linear", [pooled, "head.w", "head.b"], ["logits"], {"phase": "forward"}))
    g.add_tensor(Tensor("label", (), "int32", "label"))
    g.inputs.append("label")
    g.add_tensor(Tensor("lr", (), "float32", "input"))
    g.inputs.append("lr")
    g.add_tensor(Tensor("loss", (), "float32", "loss"))
    g.add_tensor(Tensor("grad:logits", (num_classes,), "float32", "grad"))
    g.add_op(Op("loss", "softmax_ce", ["logits", "label"], ["loss", "grad:logits"], {"phase": "loss"}))
    g.outputs = ["loss", "logits"]

    # ---- backward ------------------------------------------------------------------------------------------
    gdtype = "qint8" if cfg.int8_grads else "float32"  # activation gradients (parameter gradients stay float32)
    deferred: list[Op] = []  # reorder=False: updates applied after the whole backward pass
    grad: dict[str, str] = {}  # tensor -> name of its (so far accumulated) gradient

    def emit(op: Op) -> None:
        op.attrs["phase"] = "backward"
        g.add_op(op)

    def contribute(tensor: str, gname: str) -> None:
        if tensor not in grad:
            grad[tensor] = gname
            return
        acc = f"grad:{tensor}#{len([k for k in g.tensors if k.startswith('grad:' + tensor)])}"
        g.add_tensor(Tensor(acc, g.tensors[tensor].shape, gdtype, "grad"))
        emit(Op(f"{acc}.add", "grad_add", [grad[tensor], gname], [acc]))
        grad[tensor] = acc

    def plane(tensor: str) -> dict[str, int]:
        """qint8 gradients: the C kernel of an op that needs one float32 channel of `tensor` whole (a conv's input
        gradient before it is quantized, g_acc dequantized for a weight gradient) declares it as workspace."""
        return {"scratch_bytes": 4 * g.tensors[tensor].numel // g.tensors[tensor].shape[0]} if cfg.int8_grads else {}

    def new_grad(tensor: str, suffix: str = "") -> str:
        name = f"grad:{tensor}{suffix}"
        g.add_tensor(Tensor(name, g.tensors[tensor].shape, gdtype, "grad"))
        return name

    def update(opname: str, params: list[str], inputs: list[str], kind: str, attrs: dict) -> None:
        slots = [f"{p}.{s}" for p in params for s in _state_slots(cfg)]
        for p in params:
            for s in _state_slots(cfg):
                g.add_tensor(Tensor(f"{p}.{s}", g.tensors[p].shape, "float32", "state",
                                    data=np.zeros(g.tensors[p].shape, np.float32)))
                state.append(f"{p}.{s}")
                roles[f"{p}.{s}"] = Param(f"{p}.{s}", "slot", roles[p].op, slot_of=p, slot=s)
        if cfg.reorder:
            emit(Op(opname, kind, [*inputs, *params, "lr", *slots], [], {**attrs, "params": params}))
            return
        grads = []
        for p in params:
            gp = f"grad:{p}"
            g.add_tensor(Tensor(gp, g.tensors[p].shape, "float32", "grad"))
            grads.append(gp)
        gkind = "conv2d_weight_grad" if kind == "conv2d_update" else "linear_weight_grad"
        emit(Op(f"{opname}.grad", gkind, inputs, grads, {**attrs, "params": params}))
        for p, gp in zip(params, grads, strict=True):
            deferred.append(Op(f"{p}.update", "apply_update", [p, gp, "lr", *[f"{p}.{s}" for s in _state_slots(cfg)]],
                               [], {"phase": "backward", "param": p, "of": opname}))

    if backbone_grad:  # before the head's update: the gradient uses this step's weights
        gp = new_grad(pooled)
        emit(Op("head.grad_input", "linear_grad_input", ["grad:logits", "head.w"], [gp]))
        grad[pooled] = gp
    if scheme.head:
        update("head.update", ["head.w", "head.b"], ["grad:logits", pooled], "linear_update", {})
    for op in reversed(fwd.ops[:-1]):
        y = op.outputs[0]
        if y not in grad:
            continue
        gy = grad.pop(y)
        x = op.inputs[0]
        if op.kind == "avgpool":
            gx = new_grad(x, "@pool")
            emit(Op("pool.grad", "avgpool_grad", [gy], [gx]))
            contribute(x, gx)
        elif op.kind in ("maxpool2d", "avgpool2d", "reshape", "flatten"):  # one input; maxpool re-finds its argmax
            gx = new_grad(x, f"@{op.name}")
            if op.kind == "flatten":
                emit(Op(f"{op.name}.grad", "flatten_grad", [gy], [gx], plane(x)))
            elif op.kind == "reshape":
                emit(Op(f"{op.name}.grad", "reshape", [gy], [gx], {"to": len(g.tensors[x].shape)}))
            else:
                emit(Op(f"{op.name}.grad", f"{op.kind}_grad", [gy, x] if op.kind == "maxpool2d" else [gy], [gx],
                        {"pool": op.name, **plane(x)}))
            contribute(x, gx)
        elif op.kind == "add":
            a, b = op.inputs
            outs = [new_grad(t, f"@{op.name}") if t in needs else None for t in (a, b)]
            emit(Op(f"{op.name}.grad", "add_grad", [gy, masks[op.name]], [o for o in outs if o],
                    {"which": [t in needs for t in (a, b)], "add": op.name}))
            for t, o in zip((a, b), outs, strict=True):
                if o:
                    contribute(t, o)
        elif op.kind == "conv2d":
            gacc = f"{op.name}.gacc"
            g.add_tensor(Tensor(gacc, g.tensors[y].shape, gdtype, "grad"))
            emit(Op(f"{op.name}.grad_acc", "conv2d_grad_acc", [gy, masks[op.name]], [gacc], {"conv": op.name}))
            if x in needs:
                gx = new_grad(x, f"@{op.name}")
                emit(Op(f"{op.name}.grad_input", "conv2d_grad_input", [gacc, *_weight_parts(g, op.name)], [gx],
                        {"conv": op.name, "stride": op.attrs["stride"], "padding": op.attrs["padding"],
                         "groups": op.attrs["groups"], **_end_pads(op), **plane(x)}))
            i = op.attrs["conv_index"]
            params = [n for n in g.op(op.name).inputs if n in roles and roles[n].op == op.name]  # w_train, b
            if params:
                k = g.tensors[op.inputs[1]].shape[2] if channels[i] == 0 else g.tensors[params[0]].shape[2]
                ins = [gacc] + ([saved[op.name]] if channels[i] else [])
                update(f"{op.name}.update", params, ins, "conv2d_update",
                       {"conv": op.name, "stride": op.attrs["stride"], "padding": op.attrs["padding"],
                        **_end_pads(op), "depthwise": op.attrs["groups"] > 1, "kernel": k, "channels": channels[i],
                        **plane(gacc)})
            if x in needs:
                contribute(x, gx)
        else:  # never a silent stop of the backward
            raise MicrotrainError(f"{op.name}: autodiff has no gradient rule for op kind {op.kind!r}")
    for op in deferred:
        g.add_op(op)
    g.meta.update({"train": {"scheme": scheme.to_dict(), "num_classes": num_classes, "state": state,
                             "config": {k: (list(v) if isinstance(v, tuple) else v)
                                        for k, v in cfg.__dict__.items()},
                             "pooled": pooled, "params": {n: p.to_json() for n, p in roles.items()}}})
    return g


def _end_pads(op: Op) -> dict[str, int]:
    """A conv's bottom / right padding when it differs from its top / left (ir/ops.py conv_pads)."""
    return {k: op.attrs[k] for k in ("pad_bottom", "pad_right") if k in op.attrs}


def _split_trainable(g: Graph, op: Op, fwd: Graph, ch: int, bias: bool, state: list[str], storage: str,
                     roles: dict[str, Param]) -> None:
    """Replace a conv's weight operand by [frozen rest (flash), trainable first-ch slice (SRAM)], and mark its bias
    trainable (both recorded in `roles`). Depthwise weights [C,1,k,k] split along channels (axis 0), others along
    input channels (axis 1)."""
    w = fwd.tensors[op.inputs[1]]
    b = g.tensors[op.inputs[2]]
    if bias:
        b.role = "state"
        state.append(b.name)
        roles[b.name] = Param(b.name, "bias", op.name)
    if ch == 0:
        return
    axis = 0 if op.attrs["groups"] > 1 else 1
    full = w.shape[axis]
    train = np.take(w.data, np.arange(ch), axis=axis)
    if storage == "fp32":  # a float shadow of the slice (integer units): 4 bytes per element, no rounding loss
        train = train.astype(np.float32)
    wt = Tensor(f"{op.name}.w_train", train.shape, str(train.dtype), "state", w.scale, 0, train.copy())
    g.add_tensor(wt)
    state.append(wt.name)
    roles[wt.name] = Param(wt.name, "weight_slice", op.name)
    parts = [wt.name]
    if ch < full:
        rest = np.take(w.data, np.arange(ch, full), axis=axis)
        g.tensors.pop(w.name, None)
        g.add_tensor(Tensor(f"{op.name}.w_frozen", rest.shape, "int8", "weight", w.scale, 0, rest.copy()))
        parts.append(f"{op.name}.w_frozen")
    else:
        g.tensors.pop(w.name, None)
    op.inputs = [op.inputs[0], *parts, op.inputs[2]]
    op.attrs["train_channels"] = ch
    op.attrs["split_axis"] = axis


def _weight_parts(g: Graph, conv: str) -> list[str]:
    """The weight operand(s) of a conv in the training graph: [w] or [w_train] or [w_train, w_frozen]."""
    op = g.op(conv)
    return op.inputs[1:-1]


def frozen_prefix(g: Graph) -> tuple[list[Op], list[str]]:
    """The forward ops of training graph `g` that depend on no trainable tensor (their outputs are a pure function of
    the input image), and the tensors through which the rest of the step reads them. Caching the boundary per image
    is exact; the patch stage is chosen among these ops."""
    state = set(g.meta["train"]["state"])
    frozen, produced = [], set(g.inputs[:1])
    for op in g.ops:
        if op.attrs.get("phase") != "forward":
            continue
        if all(n in produced or g.tensors[n].data is not None for n in op.inputs) and not state & set(op.inputs):
            frozen.append(op)
            produced.update(op.outputs)
    rest = [o for o in g.ops if o not in frozen]
    boundary = sorted({n for o in rest for n in o.inputs if n in produced})
    return frozen, boundary
