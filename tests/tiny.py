"""A tiny random int8 model in the zoo's structure (stem, inverted-residual blocks, pool, head) for fast tests."""

from __future__ import annotations

import numpy as np

from microtrain.ir.graph import Graph, Op, Tensor
from microtrain.ir.ops import OPS

RELU6 = (6 / 255, -128)


CLASSES = 5  # classes of the tiny model's ImageNet-style head, and of the tests' new heads on it


def tiny_model(seed: int = 0, res: int = 16, classes: int = CLASSES) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph("tiny")
    g.add_tensor(Tensor("input", (3, res, res), "int8", "input", 1 / 127.5, 0))
    g.inputs.append("input")
    idx = 0

    def conv(name, x, cout, k, stride, groups, act=True):
        nonlocal idx
        xt = g.tensors[x]
        cin = xt.shape[0] // groups
        w = rng.integers(-127, 128, size=(cout, cin, k, k)).astype(np.int8)
        # scales that keep activations mostly inside the int8 range, with some clamping
        s_w = (rng.uniform(0.5, 1.5, cout) / (127 * np.sqrt(cin * k * k))).astype(np.float32) * 4
        b = rng.integers(-200, 200, size=cout).astype(np.int32)
        g.add_tensor(Tensor(f"{name}.w", w.shape, "int8", "weight", s_w, 0, w))
        g.add_tensor(Tensor(f"{name}.b", b.shape, "int32", "bias", data=b))
        scale, zero = RELU6 if act else (float(rng.uniform(0.03, 0.08)), int(rng.integers(-10, 10)))
        op = Op(name, "conv2d", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"],
                {"stride": stride, "padding": k // 2, "groups": groups, "conv_index": idx})
        idx += 1
        (shape,) = OPS["conv2d"].shape(g, op)
        g.add_tensor(Tensor(f"{name}.y", shape, "int8", "act", scale, zero))
        g.add_op(op)
        return f"{name}.y"

    def block(i, x, expand, cout, k, stride):
        cin = g.tensors[x].shape[0]
        h = conv(f"b{i}.pw1", x, cin * expand, 1, 1, 1)
        h = conv(f"b{i}.dw", h, cin * expand, k, stride, cin * expand)
        h = conv(f"b{i}.pw2", h, cout, 1, 1, 1, act=False)
        if stride == 1 and cout == cin:
            xt, ht = g.tensors[x], g.tensors[h]
            g.add_tensor(Tensor(f"b{i}.add.y", ht.shape, "int8", "act", float(max(xt.scale, ht.scale) * 1.3), 0))
            g.add_op(Op(f"b{i}.add", "add", [h, x], [f"b{i}.add.y"]))
            h = f"b{i}.add.y"
        return h

    x = conv("stem", "input", 8, 3, 2, 1)
    x = block(1, x, 2, 8, 3, 1)
    x = block(2, x, 2, 12, 5, 2)
    x = block(3, x, 3, 12, 3, 1)
    t = g.tensors[x]
    g.add_tensor(Tensor("pool.y", (t.shape[0],), "int8", "act", t.scale, t.zero))
    g.add_op(Op("pool", "avgpool", [x], ["pool.y"]))
    w = rng.integers(-127, 128, size=(classes, t.shape[0])).astype(np.int8)
    g.add_tensor(Tensor("head.w", w.shape, "int8", "weight", np.full(classes, 0.01, np.float32), 0, w))
    g.add_tensor(Tensor("head.b", (classes,), "int32", "bias", data=np.zeros(classes, np.int32)))
    g.add_tensor(Tensor("head.y", (classes,), "int8", "act", 0.1, 0))
    g.add_op(Op("head", "linear", ["pool.y", "head.w", "head.b"], ["head.y"]))
    g.outputs.append("head.y")
    return g
