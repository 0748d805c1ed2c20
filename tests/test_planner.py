"""The static memory planner: property tests on random graphs, and the zoo models' inference schedules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microtrain.compiler.liveness import inference_peak_bytes, live_bytes
from microtrain.compiler.planner import INPLACE_OPS, Plan, plan_memory, plot_plan
from microtrain.frontends.zoo import load_model
from microtrain.ir.graph import Graph, Op, Tensor
from microtrain.ir.ops import conv_out_hw


@st.composite
def random_graphs(draw) -> Graph:
    """conv2d (normal / depthwise, k 1 or 3, stride 1 or 2) and add ops, each reading any earlier tensor (branches,
    skips, dead ends), activations of random dtypes, a random subset of tensors as graph outputs."""
    g = Graph("random")
    c, h = draw(st.integers(1, 6)), draw(st.sampled_from([1, 2, 4, 8]))
    g.add_tensor(Tensor("x0", (c, h, h), draw(st.sampled_from(["int8", "float32"])), "input"))
    g.inputs = ["x0"]
    acts = ["x0"]
    for i in range(draw(st.integers(1, 14))):
        src = draw(st.sampled_from(acts))
        cin, hh, ww = g.tensors[src].shape
        kind = draw(st.sampled_from(["conv", "dw", "dw", "add", "add"]))
        dtype = draw(st.sampled_from(["int8", "int8", "int16", "float32", "bit"]))
        out = f"t{i}"
        if kind == "add":
            other = draw(st.sampled_from([a for a in acts if g.tensors[a].shape == (cin, hh, ww)]))
            g.add_tensor(Tensor(out, (cin, hh, ww), dtype, "act"))
            g.add_op(Op(f"op{i}", "add", [src, other], [out]))
        else:
            k, s = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 1, 2]))
            cout = cin if kind == "dw" else draw(st.integers(1, 8))
            groups = cin if kind == "dw" else 1
            g.add_tensor(Tensor(f"w{i}", (cout, cin // groups, k, k), "int8", "weight"))
            g.add_tensor(Tensor(f"b{i}", (cout,), "int32", "bias"))
            g.add_tensor(Tensor(out, (cout, *conv_out_hw(hh, ww, k, s, k // 2)), dtype, "act"))
            g.add_op(Op(f"op{i}", "conv2d", [src, f"w{i}", f"b{i}"], [out],
                        {"stride": s, "padding": k // 2, "groups": groups}))
        acts.append(out)
    g.outputs = sorted({acts[-1], *draw(st.lists(st.sampled_from(acts), max_size=2))})
    return g


@st.composite
def random_backward_graphs(draw) -> Graph:
    """Backward-pass kinds in random order over float32 gradients: conv2d_grad_acc and add_grad (with 1-bit masks that
    are graph inputs), grad_add, depthwise conv2d_grad_input of stride 1 or 2 (the output grows), pointwise
    conv2d_grad_input (never in place), and output-less conv2d_update ops that read a gradient."""
    g = Graph("random-backward")
    c, h = draw(st.integers(1, 6)), draw(st.sampled_from([1, 2, 4]))
    g.add_tensor(Tensor("g0", (c, h, h), draw(st.sampled_from(["float32", "int8"])), "grad"))
    g.inputs = ["g0"]
    grads = ["g0"]
    for i in range(draw(st.integers(1, 14))):
        src = draw(st.sampled_from(grads))
        shape = g.tensors[src].shape
        kind = draw(st.sampled_from(["acc", "acc", "add_grad", "grad_add", "dw", "dw", "pw", "update"]))
        dtype = draw(st.sampled_from(["float32", "float32", "int8"]))
        if kind in ("acc", "add_grad"):
            g.add_tensor(Tensor(f"m{i}", shape, "bit", "mask"))
            g.inputs.append(f"m{i}")
            outs = [f"t{i}"] + ([f"u{i}"] if kind == "add_grad" and draw(st.booleans()) else [])
            for o in outs:
                g.add_tensor(Tensor(o, shape, dtype, "grad"))
            g.add_op(Op(f"op{i}", "conv2d_grad_acc" if kind == "acc" else "add_grad", [src, f"m{i}"], outs))
            grads += outs
            continue
        if kind == "grad_add":
            other = draw(st.sampled_from([t for t in grads if g.tensors[t].shape == shape]))
            g.add_tensor(Tensor(f"t{i}", shape, dtype, "grad"))
            g.add_op(Op(f"op{i}", "grad_add", [src, other], [f"t{i}"]))
        elif kind == "update":
            g.add_op(Op(f"op{i}", "conv2d_update", [src], []))
            continue
        else:
            s, k = draw(st.sampled_from([1, 2])) if kind == "dw" else 1, draw(st.sampled_from([1, 3]))
            cout = shape[0] if kind == "dw" else draw(st.integers(1, 6))
            g.add_tensor(Tensor(f"w{i}", (shape[0], 1 if kind == "dw" else cout, k, k), "int8", "weight"))
            g.add_tensor(Tensor(f"t{i}", (cout, shape[1] * s, shape[2] * s), dtype, "grad"))
            g.add_op(Op(f"op{i}", "conv2d_grad_input", [src, f"w{i}"], [f"t{i}"],
                        {"stride": s, "padding": k // 2, "groups": shape[0] if kind == "dw" else 1}))
        grads.append(f"t{i}")
    g.outputs = sorted({grads[-1], *draw(st.lists(st.sampled_from(grads), max_size=2))})
    return g


def reference_lifetimes(g: Graph) -> dict[str, tuple[int, int, int]]:
    """Written independently of liveness.py: tensor -> (first step, last step, bytes)."""
    n = len(g.ops)
    first = {t: -1 for t in g.inputs}
    last: dict[str, int] = {}
    for i, op in enumerate(g.ops):
        for t in op.outputs:
            first.setdefault(t, i)
        for t in op.inputs:
            if g.tensors[t].role in ("input", "act", "grad", "mask"):
                last[t] = i
    for t in g.outputs:
        last[t] = n
    return {t: (f, last.get(t, f), g.tensors[t].nbytes) for t, f in first.items()}


def check_plan(g: Graph, p: Plan, align: int) -> None:
    n = len(g.ops)
    ref = reference_lifetimes(g)
    size = {t: b for t, (_, _, b) in ref.items()} | {lt.tensor: lt.nbytes for lt in p.lifetimes}
    assert set(p.offsets) == set(ref) | {lt.tensor for lt in p.lifetimes}
    assert all(o % align == 0 for o in p.offsets.values())
    assert p.arena_bytes == max((p.offsets[t] + b for t, b in size.items()), default=0)

    # aliases: only where the table allows, the input dies at that op, sizes agree; roots share offsets
    for out, inp in p.aliases.items():
        (i, op), = [(i, op) for i, op in enumerate(g.ops) if out in op.outputs]
        assert op.kind in INPLACE_OPS
        assert (op.outputs.index(out), op.inputs.index(inp)) in INPLACE_OPS[op.kind].pairs(g, op)
        assert ref[inp][1] == i and inp not in g.outputs
        assert ref[inp][2] == ref[out][2] or INPLACE_OPS[op.kind].resize
        assert p.offsets[out] == p.offsets[inp]
    assert len(set(p.aliases.values())) == len(p.aliases)  # one buffer is reused by at most one output

    # live intervals per planned buffer (roots + scratch), built from the reference lifetimes
    span: dict[str, tuple[int, int, int]] = {}
    for t, (f, l, b) in ref.items():
        r = p.root(t)
        f0, l0, b0 = span.get(r, (f, l, b))
        span[r] = (min(f0, f), max(l0, l), max(b0, b))  # a chain's buffer holds its largest member
    for lt in p.lifetimes:
        if lt.tensor not in ref:
            span[lt.tensor] = (lt.first, lt.last, lt.nbytes)
    assert {lt.tensor: (lt.first, lt.last, lt.nbytes) for lt in p.lifetimes} == span

    # no two simultaneously live buffers overlap in the arena
    items = sorted(span.items())
    for a, (fa, la, ba) in items:
        for b, (fb, lb, bb) in items:
            if a < b and fa <= lb and fb <= la and ba and bb:
                oa, ob = p.offsets[a], p.offsets[b]
                assert oa + ba <= ob or ob + bb <= oa, (a, b)

    # the reported curve and peak are the brute-force sums
    curve = [sum(b for f, l, b in span.values() if f <= s <= l) for s in range(n)]
    assert p.live_curve == curve
    assert p.peak_live_bytes == max(curve, default=0) <= p.arena_bytes


def simulate(g: Graph, p: Plan) -> None:
    """Run the schedule on an arena of owner tags: every input an op reads must still hold its own bytes."""
    tag = {t: k + 1 for k, t in enumerate(sorted(p.offsets))}
    arena = np.zeros(p.arena_bytes + 1, np.int64)

    def region(t: str) -> slice:
        return slice(p.offsets[t], p.offsets[t] + g.tensors[t].nbytes)

    for t in g.inputs:
        arena[region(t)] = tag[t]
    for op in g.ops:
        if (scratch := f"{op.name}.scratch") in p.offsets:
            arena[p.offsets[scratch]:p.offsets[scratch] + _scratch(p, scratch)] = -1  # the kernel's workspace
        reads = [t for t in op.inputs if t in p.offsets]
        for t in reads:
            assert (arena[region(t)] == tag[t]).all(), f"{op.name} reads clobbered {t}"
        for t in op.outputs:
            arena[region(t)] = tag[t]
        overwritten = {p.aliases[t] for t in op.outputs if t in p.aliases}
        for t in reads:  # outputs may only land on an input they alias
            assert t in overwritten or (arena[region(t)] == tag[t]).all(), f"{op.name} writes over its input {t}"
    for t in g.outputs:
        assert (arena[region(t)] == tag[t]).all(), f"output {t} clobbered"


def _scratch(p: Plan, name: str) -> int:
    return next(lt.nbytes for lt in p.lifetimes if lt.tensor == name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=st.one_of(random_graphs(), random_backward_graphs()), inplace=st.booleans(),
       align=st.sampled_from([1, 4, 16]))
def test_random_graphs(g, inplace, align):
    p = plan_memory(g, inplace=inplace, align=align)
    check_plan(g, p, align)
    simulate(g, p)
    if not inplace:
        assert p.aliases == {} and p.live_curve == live_bytes(g)
    else:
        assert p.peak_live_bytes <= plan_memory(g, inplace=False).peak_live_bytes


@settings(max_examples=200, deadline=None)
@given(c=st.integers(1, 8), a=st.integers(1, 12), b=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_resizing_depthwise_kernel_contract(c, a, b, seed):
    """The per-channel in-place kernel of `INPLACE_OPS`' resize rules, run on one shared buffer: input channel c at
    [c*a, (c+1)*a), output channel c at [c*b, (c+1)*b), channel c computed into a one-channel scratch then copied;
    ascending when b <= a, descending when b > a. It must equal the out-of-place result for any per-channel map."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-100, 100, (c, a))
    maps = rng.integers(-9, 10, (c, b, a))  # output channel c depends on input channel c only (depthwise)
    want = np.einsum("cba,ca->cb", maps, x)
    buf = np.full(max(c * a, c * b), -(10**9))
    buf[: c * a] = x.ravel()
    for ch in (range(c) if b <= a else reversed(range(c))):
        scratch = maps[ch] @ buf[ch * a:(ch + 1) * a]
        buf[ch * b:(ch + 1) * b] = scratch
    np.testing.assert_array_equal(buf[: c * b].reshape(c, b), want)


@pytest.mark.parametrize("dtype", ["float32", "qint8"])
def test_backward_inplace_rules(dtype):
    """grad_acc on its gradient, add_grad (one output takes g), depthwise grad_input of stride 2 (grows, same offset,
    one-channel float32 scratch), pointwise grad_input never in place. qint8 (--int8-grads): the same aliases, and
    the float32 channel each grad_input declares (as autodiff does) is one buffer with the in-place scratch."""
    q8 = dtype == "qint8"
    g = Graph("bw", inputs=["g", "m", "m2"])
    g.add_tensor(Tensor("g", (4, 4, 4), dtype, "grad"))
    g.add_tensor(Tensor("m", (4, 4, 4), "bit", "mask"))
    g.add_tensor(Tensor("m2", (4, 8, 8), "bit", "mask"))
    g.add_tensor(Tensor("w", (4, 1, 3, 3), "int8", "weight"))
    g.add_tensor(Tensor("w2", (4, 2, 1, 1), "int8", "weight"))
    for t, shape in [("acc", (4, 4, 4)), ("gx", (4, 8, 8)), ("ga", (4, 8, 8)), ("gb", (4, 8, 8)), ("gs", (4, 8, 8)),
                     ("gp", (2, 8, 8))]:
        g.add_tensor(Tensor(t, shape, dtype, "grad"))
    plane = {"scratch_bytes": 8 * 8 * 4} if q8 else {}
    g.add_op(Op("acc", "conv2d_grad_acc", ["g", "m"], ["acc"]))
    g.add_op(Op("dwgi", "conv2d_grad_input", ["acc", "w"], ["gx"], {"stride": 2, "padding": 1, "groups": 4, **plane}))
    g.add_op(Op("addg", "add_grad", ["gx", "m2"], ["ga", "gb"]))
    g.add_op(Op("sum", "grad_add", ["ga", "gb"], ["gs"]))
    g.add_op(Op("pwgi", "conv2d_grad_input", ["gs", "w2"], ["gp"], {"stride": 1, "padding": 0, "groups": 1, **plane}))
    g.outputs = ["gp"]
    p = plan_memory(g)
    assert p.aliases == {"acc": "g", "gx": "acc", "ga": "gx", "gs": "ga"}
    scratch = {lt.tensor: lt.nbytes for lt in p.lifetimes if lt.tensor not in g.tensors}
    assert scratch == ({"dwgi.scratch": 8 * 8 * 4, "pwgi.scratch": 8 * 8 * 4} if q8 else {"dwgi.scratch": 8 * 8 * 4})
    chain = 4 * 8 * 8 + 4 * 4 if q8 else 4 * 8 * 8 * 4  # the chain's largest member (qint8: values + scales)
    assert next(lt.nbytes for lt in p.lifetimes if lt.tensor == "g") == chain
    check_plan(g, p, 4)
    simulate(g, p)


def test_inplace_rules():
    g = Graph("t", inputs=["x"])
    g.add_tensor(Tensor("x", (4, 8, 8), "int8", "input"))
    for name, shape in [("w", (4, 1, 3, 3)), ("w2", (4, 1, 3, 3))]:
        g.add_tensor(Tensor(name, shape, "int8", "weight"))
    g.add_tensor(Tensor("b", (4,), "int32", "bias"))
    for t, shape in [("y", (4, 8, 8)), ("z", (4, 4, 4)), ("s", (4, 8, 8)), ("u", (4, 8, 8))]:
        g.add_tensor(Tensor(t, shape, "int8", "act"))
    g.add_op(Op("dw", "conv2d", ["x", "w", "b"], ["y"], {"stride": 1, "padding": 1, "groups": 4}))
    g.add_op(Op("dw2", "conv2d", ["y", "w2", "b"], ["z"], {"stride": 2, "padding": 1, "groups": 4}))  # stride 2
    g.add_op(Op("add", "add", ["y", "y"], ["s"]))
    g.add_op(Op("add2", "add", ["s", "y"], ["u"]))  # y dies here, s too: u takes the first operand
    g.outputs = ["u", "z"]
    p = plan_memory(g)
    assert p.aliases == {"y": "x", "u": "s"}  # "s" cannot reuse y: y is still read by add2
    assert [lt.tensor for lt in p.lifetimes if lt.tensor not in g.tensors] == ["dw.scratch"]
    assert next(lt for lt in p.lifetimes if lt.tensor == "dw.scratch").nbytes == 64
    check_plan(g, p, 4)
    simulate(g, p)


@pytest.mark.parametrize("model", ["mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3"])
def test_zoo_inference(model, tmp_path):
    g = load_model(model)
    plain = plan_memory(g, inplace=False)
    assert plain.peak_live_bytes == inference_peak_bytes(g) and not plain.aliases
    p = plan_memory(g)
    assert p.aliases and {g.producer(t).kind for t in p.aliases} == {"add", "conv2d"}
    assert p.peak_live_bytes <= plain.peak_live_bytes <= p.arena_bytes * 2
    check_plan(g, p, 4)
    simulate(g, p)
    out = tmp_path / "plan.png"
    plot_plan(p, g, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
