"""The compile-time backward graph against torch.autograd on the float relaxation, and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.frontends.zoo import load_model
from microtrain.runtime.executor import Executor, add_ratios
from microtrain.runtime.kernels import requant_multiplier
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import Scheme, resolve_scheme

from tiny import tiny_model

CLASSES = 5


def gradients(step: GraphTrainStep, x, y) -> dict[str, torch.Tensor]:
    """Run a reorder=False training graph up to (not including) the deferred updates; return param gradients."""
    env = step._env(x)
    env["label"], env["lr"] = torch.as_tensor(y), torch.tensor(0.0)
    step.run([o for o in step.g.ops if o.kind != "apply_update"], env, train=True)
    state = step.g.meta["train"]["state"]
    return {k.removeprefix("grad:"): v for k, v in env.items() if k.removeprefix("grad:") in state}


def reference(tg, params: dict[str, torch.Tensor], x, y) -> torch.Tensor:
    """Float relaxation of the training graph's forward, written directly with torch autograd."""
    env = {"input": x.to(torch.float64)}
    for op in tg.ops:
        if op.attrs.get("phase") != "forward":
            continue
        t = tg.tensors
        if op.kind == "conv2d":
            xt, yt, a = t[op.inputs[0]], t[op.outputs[0]], op.attrs
            parts = [params[n] for n in op.inputs[1:-1]]
            w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=a["split_axis"])
            m = requant_multiplier(xt.scale, t[op.inputs[1]].scale, yt.scale).to(torch.float64).view(1, -1, 1, 1)
            acc = F.conv2d(env[op.inputs[0]] - xt.zero, w, None, a["stride"], a["padding"], 1, a["groups"])
            env[op.outputs[0]] = torch.clamp((acc + params[op.inputs[-1]].view(1, -1, 1, 1)) * m + yt.zero, -128, 127)
        elif op.kind == "add":
            at, bt, yt = (t[n] for n in (*op.inputs, op.outputs[0]))
            ra, rb = add_ratios(at.scale, bt.scale, yt.scale)
            v = (env[op.inputs[0]] - at.zero) * ra + (env[op.inputs[1]] - bt.zero) * rb + yt.zero
            env[op.outputs[0]] = torch.clamp(v, -128, 127)
        elif op.kind == "avgpool":
            env[op.outputs[0]] = env[op.inputs[0]].mean(dim=(2, 3))
        elif op.kind == "linear":
            xt = t[op.inputs[0]]
            feats = (env[op.inputs[0]] - xt.zero) * float(xt.scale)
            env[op.outputs[0]] = feats @ params["head.w"].t() + params["head.b"]
        elif op.kind == "slice_channels":
            env[op.outputs[0]] = env[op.inputs[0]][:, : op.attrs["channels"]]
    return F.cross_entropy(env["logits"], y.long())


def _params64(tg, step, trainable):
    out = {}
    for n, v in step.params.items():
        p = v.to(torch.float64).clone()
        if n in trainable:
            p.requires_grad_(True)
        out[n] = p
    return out


SCHEMES = [
    Scheme("mixed", n_bias_update=8, weight_ratios={4: 0.5, 5: 0.25, 7: 1.0, 9: 0.5}, head=True),
    Scheme("all", n_bias_update=10, weight_ratios={i: 1.0 for i in range(10)}, head=True),
    Scheme("deep-only", n_bias_update=2, weight_ratios={8: 0.5}, head=True),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_backward_matches_autograd_on_float_relaxation(scheme):
    g = tiny_model(seed=1)
    tg = build_training_graph(g, scheme, CLASSES, TrainConfig(reorder=False))
    step = GraphTrainStep(tg, precision="fp32")
    rng = np.random.default_rng(0)
    step.params["head.w"] = torch.from_numpy(rng.normal(0, 0.5, (CLASSES, 12)).astype(np.float32))
    x = torch.from_numpy(rng.integers(-128, 128, (3, 3, 16, 16)).astype(np.int8))
    y = torch.tensor([0, 3, 4])
    ours = gradients(step, x, y)
    state = tg.meta["train"]["state"]
    params = _params64(tg, step, state)
    reference(tg, params, x, y).backward()
    assert set(ours) == set(state)
    for n in state:
        ref = params[n].grad
        assert ref is not None and ref.abs().sum() > 0, n
        torch.testing.assert_close(ours[n].to(torch.float64), ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item(),
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_backward_matches_finite_differences():
    g = tiny_model(seed=2)
    scheme = Scheme("fd", n_bias_update=4, weight_ratios={6: 1.0, 7: 0.5, 8: 1.0}, head=True)
    tg = build_training_graph(g, scheme, CLASSES, TrainConfig(reorder=False))
    step = GraphTrainStep(tg, precision="fp32")
    rng = np.random.default_rng(3)
    step.params["head.w"] = torch.from_numpy(rng.normal(0, 0.5, (CLASSES, 12)).astype(np.float32))
    x = torch.from_numpy(rng.integers(-128, 128, (2, 3, 16, 16)).astype(np.int8))
    y = torch.tensor([1, 2])
    ours = gradients(step, x, y)
    params = _params64(tg, step, [])
    checked = 0
    for name in ("b2.pw2.w_train", "b3.pw1.w_train", "b3.dw.w_train", "b3.pw2.b", "b3.dw.b"):
        flat = ours[name].flatten()
        for i in torch.argsort(flat.abs(), descending=True)[:3].tolist():  # the largest entries: well above noise
            eps = 1e-3
            p = params[name].view(-1)
            old = p[i].item()
            p[i] = old + eps
            up = reference(tg, params, x, y).item()
            p[i] = old - eps
            down = reference(tg, params, x, y).item()
            p[i] = old
            fd = (up - down) / (2 * eps)
            assert fd == pytest.approx(flat[i].item(), rel=2e-2, abs=1e-7), (name, i)
            checked += 1
    assert checked == 15


def test_pruning_keeps_only_what_is_needed():
    g = load_model("mcunet-5fps")
    scheme = resolve_scheme("paper-99kb", g)
    tg = build_training_graph(g, scheme, 10)
    earliest = min(scheme.bias_convs(g) + list(scheme.weight_ratios))
    convs = {o.attrs["conv_index"]: o.name for o in g.convs()}
    backward_convs = {o.attrs["conv"] for o in tg.ops if o.kind == "conv2d_grad_acc"}
    assert backward_convs == {convs[i] for i in range(earliest, len(convs))}
    # no gradient flows into the input of the earliest trained conv, and no mask is kept before it
    assert not any(o.kind == "conv2d_grad_input" and o.attrs["conv"] == convs[earliest] for o in tg.ops)
    masks = [n for n, t in tg.tensors.items() if t.role == "mask"]
    assert all(tg.producer(m).attrs.get("conv_index", earliest) >= earliest for m in masks)
    # bias-only convs save no input activation; weight-updated convs save exactly int(C_in * r) channels
    saved = {o.name.removesuffix(".save"): o.attrs["channels"] for o in tg.ops if o.kind == "slice_channels"}
    for i, r in scheme.weight_ratios.items():
        cin = g.tensors[g.op(convs[i]).inputs[0]].shape[0]
        assert saved.get(convs[i], cin) == int(cin * r)
    # head-only: no backward op at all besides the head update
    ho = build_training_graph(g, resolve_scheme("head-only", g), 10)
    assert [o.kind for o in ho.ops if o.attrs["phase"] == "backward"] == ["linear_update"]


@pytest.mark.parametrize("model", ["mcunet-5fps", "proxyless-w0.3"])
def test_training_forward_is_bit_exact_with_inference(model):
    g = load_model(model)
    tg = build_training_graph(g, resolve_scheme("last:12", g), 10)
    step = GraphTrainStep(tg, precision="int8")
    x = torch.from_numpy(np.random.default_rng(0).integers(-128, 128, (2, 3, 128, 128)).astype(np.int8))
    ref = Executor(g).run(x, keep_all=True)
    env = step._env(x)
    env["label"], env["lr"] = torch.tensor([1, 2]), torch.tensor(0.0)
    step.run(step.forward_ops, env, train=True)
    for n, v in ref.items():
        if n in env:
            assert torch.equal(env[n], v), n


def test_reorder_and_no_reorder_give_the_same_update():
    g = tiny_model(seed=4)
    scheme = SCHEMES[0]
    x = torch.from_numpy(np.random.default_rng(5).integers(-128, 128, (4, 3, 16, 16)).astype(np.int8))
    y = torch.tensor([0, 1, 2, 3])
    states = []
    for reorder in (True, False):
        step = GraphTrainStep(build_training_graph(g, scheme, CLASSES, TrainConfig(reorder=reorder)), "int8")
        for _ in range(3):
            step.step(x, y, lr=0.05)
        states.append(step.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k], err_msg=k)


def test_cached_prefix_step_equals_full_step():
    g = load_model("mcunet-5fps")
    x = torch.from_numpy(np.random.default_rng(6).integers(-128, 128, (2, 3, 128, 128)).astype(np.int8))
    y = torch.tensor([3, 7])
    scheme = resolve_scheme("paper-99kb", g)
    a, b = (GraphTrainStep(build_training_graph(g, scheme, 10)) for _ in range(2))
    assert a.boundary == ["b6.pw2.y", "b7.dw.y"]
    for _ in range(2):
        la = a.step(x, y, 0.1)
        lb = b.step(b.prefix(x), y, 0.1)
        assert la == lb
    sa, sb = a.state_dict(), b.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.logits(x), b.logits(b.prefix(x)))


def test_prefix_cache_changes_nothing():
    from microtrain.runtime.prefix_cache import PrefixCache

    g = tiny_model(seed=7)
    scheme = Scheme("late", n_bias_update=3, weight_ratios={8: 1.0}, head=True)
    rng = np.random.default_rng(8)
    xs = [torch.from_numpy(rng.integers(-128, 128, (4, 3, 16, 16)).astype(np.int8)) for _ in range(2)]
    y = torch.tensor([0, 1, 2, 3])
    plain = GraphTrainStep(build_training_graph(g, scheme, CLASSES))
    cached = PrefixCache(GraphTrainStep(build_training_graph(g, scheme, CLASSES)))
    assert cached.useful
    for _ in range(3):
        for x in xs:
            assert plain.step(x, y, 0.05) == cached.step(x, y, 0.05)
    assert cached.hits == 16 and cached.misses == 8
    assert torch.equal(plain.logits(xs[0]), cached.logits(xs[0]))


@pytest.mark.parametrize("precision,storage", [("int8", "int8"), ("int8", "fp32"), ("fp32", "int8")])
def test_state_dict_resumes_exactly(precision, storage):
    g = tiny_model(seed=9)
    cfg = TrainConfig(optimizer="sgd-m", update_storage=storage)
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.integers(-128, 128, (4, 3, 16, 16)).astype(np.int8))
    y = torch.tensor([0, 1, 2, 3])
    a, b = (GraphTrainStep(build_training_graph(g, SCHEMES[0], CLASSES, cfg), precision) for _ in range(2))
    for _ in range(2):
        a.step(x, y, 0.05)
    b.load_state_dict(a.state_dict())
    for _ in range(2):
        assert a.step(x, y, 0.05) == b.step(x, y, 0.05)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    if storage == "fp32":
        assert a.g.tensors["b3.pw2.w_train"].dtype == "float32"


def test_int8_gradients_are_per_channel_quantized_and_close():
    g = tiny_model(seed=11)
    rng = np.random.default_rng(12)
    x = torch.from_numpy(rng.integers(-128, 128, (3, 3, 16, 16)).astype(np.int8))
    y = torch.tensor([0, 2, 4])
    grads = {}
    for q in (False, True):
        tg = build_training_graph(g, SCHEMES[0], CLASSES, TrainConfig(reorder=False, int8_grads=q))
        step = GraphTrainStep(tg, "fp32")
        step.params["head.w"] = torch.from_numpy(rng.normal(0, 0.5, (CLASSES, 12)).astype(np.float32)) if not q \
            else grads["w"]
        grads["w"] = step.params["head.w"]
        grads[q] = gradients(step, x, y)
        acts = [t for n, t in tg.tensors.items() if t.role == "grad" and n.removeprefix("grad:") not in grads[q]
                and n != "grad:logits"]
        assert acts and all(t.dtype == ("qint8" if q else "float32") for t in acts)
        if q:  # an int8 gradient costs 1 byte per element plus one float32 scale per channel
            t = tg.tensors["grad:b3.pw1.y@b3.dw"]
            assert t.nbytes == t.numel + 4 * t.shape[0]
    rels = {n: float((grads[True][n] - ref).norm() / ref.norm()) for n, ref in grads[False].items()}
    assert rels["head.w"] == rels["head.b"] == 0  # the head's gradient comes from the loss, before any int8 gradient
    assert all(r < 0.05 for r in rels.values()), rels
    assert sum(r > 1e-4 for r in rels.values()) >= 3, rels  # deeper layers do see the quantization
