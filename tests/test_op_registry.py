"""Every op kind of the registry (`ir/ops.py` OPS) has every part: semantics text, shape and MAC rules, a gradient
rule (forward kinds), a torch kernel, a C lowering and an in-place rule (or a stated reason why it never runs in
place). The gradient rules and C lowerings are checked by use: training graphs whose kinds together cover the whole
table are built by autodiff, stepped by the torch engine and emitted as C (kinds added to the table without them fail
here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.codegen.emit import Emitter
from microtrain.compiler.memory import plan_training_graph
from microtrain.compiler.planner import INPLACE_OPS, NOT_INPLACE
from microtrain.frontends.zoo import load_model
from microtrain.ir.ops import FORWARD_KINDS, OPS, PLANNING_KINDS
from microtrain.runtime.executor import Executor
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import Scheme, resolve_scheme

FIXTURES = Path(__file__).parent / "fixtures"


def test_every_kind_declares_semantics_shape_macs_kernel_and_inplace_rule():
    assert set(FORWARD_KINDS) | set(PLANNING_KINDS) <= set(OPS)
    for kind, d in OPS.items():
        assert isinstance(d.semantics, str) and len(d.semantics) > 40, kind
        assert callable(d.shape) and callable(d.macs) and d.operands, kind
        assert (kind in INPLACE_OPS) != (kind in NOT_INPLACE), f"{kind}: in-place rule missing (or stated twice)"
        assert kind in GraphTrainStep.KERNELS or kind in PLANNING_KINDS, f"{kind}: no torch kernel"
    assert set(NOT_INPLACE) | set(INPLACE_OPS) <= set(OPS)


def _graphs():
    """Training graphs that together hold every non-planning kind: slices (a half-ratio weight), a residual's two
    gradient contributions, every pool, the FC-as-conv, reorder off (materialised gradients), qint8 gradients."""
    res, plain, mb, cc = (load_model(FIXTURES / f"{n}.tflite") for n in ("resnet", "plain_cnn", "mbv1", "cifar_cnn"))
    yield res, Scheme("half", 6, {3: 0.5, 5: 1.0}), TrainConfig()
    yield plain, resolve_scheme("full", plain), TrainConfig(reorder=False)
    yield mb, resolve_scheme("last:3", mb), TrainConfig(int8_grads=True, optimizer="adam")
    yield cc, resolve_scheme("full", cc), TrainConfig(int8_grads=True)


def test_every_kind_has_a_gradient_rule_and_a_c_lowering():
    seen: set[str] = set()
    for g, scheme, cfg in _graphs():
        c, h, w = g.tensors[g.inputs[0]].shape
        x = torch.from_numpy(np.random.default_rng(0).integers(-128, 128, (2, c, h, w)).astype(np.int8))
        Executor(g).run(x)  # every forward kind runs in the forward executor
        tg = build_training_graph(g, scheme, 4, cfg)  # a forward kind without a gradient rule raises here
        for op in g.ops[:-1]:  # each forward op whose output gets a gradient has a backward op reading it
            gy = f"grad:{op.outputs[0]}"
            if any(n == gy or n.startswith(gy + "#") for n in tg.tensors):
                assert any(o.attrs.get("phase") == "backward" and any(n == gy or n.startswith((gy + "#", gy + "@"))
                                                                      for n in o.inputs) for o in tg.ops), op.name
        step = GraphTrainStep(tg)
        assert np.isfinite(step.step(x, torch.tensor([0, 1]), 0.01))
        sched, best = plan_training_graph(tg)
        Emitter(sched, best.plan).emit()  # a kind without a C lowering raises here
        seen |= {o.kind for o in sched.ops}
    missing = set(OPS) - set(PLANNING_KINDS) - seen
    assert not missing, f"kinds no graph here exercises: {sorted(missing)}"


@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d"])
def test_pool_gradients_equal_autograd(kind):
    """maxpool2d_grad / avgpool2d_grad of the torch engine against autograd through the float forward (padded SAME
    windows, overlapping stride 2; random floats: no ties), and maxpool's tie rule: the first tap in row-major scan
    order takes the whole gradient."""
    from microtrain.runtime import pool_kernels as PK

    attrs = {"pool_h": 3, "pool_w": 3, "stride": 2, "padding": 0, "pad_bottom": 1, "pad_right": 1}
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = PK.maxpool2d(x, attrs, exact=False) if kind == "maxpool2d" else PK.avgpool2d(x, attrs, False, exact=False)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    got = PK.maxpool2d_grad(g, x.detach(), attrs) if kind == "maxpool2d" else PK.avgpool2d_grad(g, (3, 7, 7), attrs)
    torch.testing.assert_close(got, x.grad, rtol=1e-6, atol=1e-6)
    if kind == "maxpool2d":
        tie = torch.zeros(1, 1, 2, 2, dtype=torch.int8)  # one 2x2 window, all taps equal
        gx = PK.maxpool2d_grad(torch.ones(1, 1, 1, 1), tie, {"pool_h": 2, "pool_w": 2, "stride": 2, "padding": 0})
        assert gx.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]
