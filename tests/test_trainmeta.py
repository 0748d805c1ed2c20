"""The training graph's typed parameter metadata (`meta["train"]["params"]`, ir/trainmeta.py): written once by
autodiff, complete and consistent, saved and loaded with the graph; and what reads it no longer needs the names:
a graph whose parameters and slots are renamed to opaque names trains bit for bit like the original and reports the
same memory."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.compiler.memory import flash_bytes, state_bytes
from microtrain.errors import MicrotrainError
from microtrain.fleet.core import trainable_names
from microtrain.frontends.zoo import load_model
from microtrain.ir.graph import Graph
from microtrain.ir.trainmeta import KINDS, head, params, slots_of, trainable
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import Scheme, resolve_scheme

FIXTURES = Path(__file__).parent / "fixtures"
SRC = Path(__file__).resolve().parents[1] / "src" / "microtrain"
CASES = [("mbv1", "last:3", TrainConfig(optimizer="adam")),
         ("resnet", "last:4", TrainConfig(optimizer="sgd-m", reorder=False)),
         ("plain_cnn", "full", TrainConfig(update_storage="fp32"))]


def build(name: str, scheme: str | Scheme, cfg: TrainConfig) -> Graph:
    g = load_model(FIXTURES / f"{name}.tflite")
    return build_training_graph(g, resolve_scheme(scheme, g) if isinstance(scheme, str) else scheme, 10, cfg)


@pytest.mark.parametrize("name,scheme,cfg", CASES, ids=[c[0] for c in CASES])
def test_every_state_tensor_has_a_typed_entry(name, scheme, cfg, tmp_path):
    tg = build(name, scheme, cfg)
    ps = params(tg)
    state = tg.meta["train"]["state"]
    assert set(state) <= set(ps) and all(p.kind in KINDS for p in ps.values())
    ops = {o.name: o for o in tg.ops}
    nslots = {"sgd": 0, "sgd-m": 1, "adam": 2}[cfg.optimizer]
    for n, p in ps.items():
        if p.kind == "weight_slice":
            assert n in ops[p.op].inputs[1:-1] and ops[p.op].kind == "conv2d"
        elif p.kind == "bias":
            assert ops[p.op].inputs[-1] == n and ops[p.op].kind == "conv2d"
        elif p.is_head:
            assert ops[p.op].kind == "linear" and n in ops[p.op].inputs
        else:
            owner = ps[p.slot_of]
            assert not owner.is_slot and p.op == owner.op and p.slot in ("m", "v")
            assert tg.tensors[n].shape == tg.tensors[p.slot_of].shape
        if not p.is_slot and n in state:
            assert len(slots_of(tg, n)) == nslots
    assert trainable(tg) == [n for n in state if not ps[n].is_slot] == trainable_names(tg)
    assert {ps[n].kind for n in trainable(tg)} >= {"weight_slice", "bias", "head_weight", "head_bias"}
    assert head(tg) == ("head.w", "head.b")
    tg.save(tmp_path / "tg")
    assert Graph.load(tmp_path / "tg").meta["train"]["params"] == tg.meta["train"]["params"]


def test_frozen_head_is_described_but_not_state():
    tg = build("mbv1", Scheme("bias-2", 2, {}, head=False), TrainConfig())
    ps = params(tg)
    assert {ps[n].kind for n in head(tg)} == {"head_weight", "head_bias"}
    assert not set(head(tg)) & set(tg.meta["train"]["state"])
    assert [ps[n].kind for n in tg.meta["train"]["state"]] == ["bias", "bias"]


def test_malformed_metadata_is_refused_on_load(tmp_path):
    tg = build("mbv1", "last:2", TrainConfig(optimizer="sgd-m"))
    slot = next(n for n, p in params(tg).items() if p.is_slot)
    for bad in ({**tg.meta["train"]["params"], slot: {"kind": "slot", "op": "x", "slot_of": None, "slot": "m"}},
                {n: d for n, d in tg.meta["train"]["params"].items() if n != slot},
                {**tg.meta["train"]["params"], "head.w": {"kind": "gain", "op": "head"}},
                ["head.w"]):
        g = build("mbv1", "last:2", TrainConfig(optimizer="sgd-m"))
        g.meta["train"]["params"] = bad
        g.save(tmp_path / "g")
        with pytest.raises(MicrotrainError, match="meta.train.params"):
            Graph.load(tmp_path / "g")


def renamed(tg: Graph) -> tuple[Graph, dict[str, str]]:
    """`tg` with every parameter and slot renamed to p0000, p0001, ... (sorted as before: the stochastic-rounding
    streams are numbered in name order), everywhere a name is referenced."""
    old = sorted(tg.meta["train"]["params"])
    m = {n: f"p{i:04d}" for i, n in enumerate(old)}
    g = copy.deepcopy(tg)
    g.tensors = {m.get(n, n): t for n, t in g.tensors.items()}
    for n, t in g.tensors.items():
        t.name = n
    for op in g.ops:
        op.inputs = [m.get(n, n) for n in op.inputs]
        op.outputs = [m.get(n, n) for n in op.outputs]
        if "params" in op.attrs:
            op.attrs["params"] = [m[n] for n in op.attrs["params"]]
        if "param" in op.attrs:
            op.attrs["param"] = m[op.attrs["param"]]
    tr = g.meta["train"]
    tr["state"] = [m[n] for n in tr["state"]]
    tr["params"] = {m[n]: {**d, "slot_of": m.get(d["slot_of"])} for n, d in tr["params"].items()}
    assert not any(n.endswith((".b", ".w_train", ".m", ".v", ".w")) for n in g.tensors if n in tr["params"])
    return g, m


@pytest.mark.parametrize("name,scheme,cfg", CASES, ids=[c[0] for c in CASES])
def test_renamed_parameters_train_bit_for_bit(name, scheme, cfg):
    """The torch engine (QAS per bias / weight slice, optimizer slots, deferred updates, the add's gradient), the
    memory report and the fleet's state list read the metadata: opaque names change nothing."""
    torch.set_num_threads(1)
    from microtrain.data.samples import real_images

    tg = build(name, scheme, cfg)
    rg, m = renamed(tg)
    assert state_bytes(rg) == state_bytes(tg) and flash_bytes(rg) == flash_bytes(tg)
    assert trainable_names(rg) == [m[n] for n in trainable_names(tg)]
    x, y, _ = real_images(8, list(tg.tensors[tg.inputs[0]].shape), seed=4, source="skimage")
    a, b = GraphTrainStep(tg), GraphTrainStep(rg)
    for i in (0, 4):
        xb, yb = torch.from_numpy(x[i:i + 4]), torch.from_numpy(np.asarray(y[i:i + 4]))
        assert a.step(xb, yb, 0.05) == b.step(xb, yb, 0.05)
    sa, sb = a.state_dict(), b.state_dict()
    changed = 0
    for n in tg.meta["train"]["state"]:
        np.testing.assert_array_equal(sa[n], sb[m[n]], err_msg=n)
        changed += not np.array_equal(sa[n], tg.tensors[n].data)
    assert changed >= len(tg.meta["train"]["state"]) // 2  # the steps did update the parameters and slots


CONSUMERS = ["runtime/trainstep.py", "codegen/emit.py", "compiler/memory.py", "commands/export.py", "fleet/core.py"]


def test_no_consumer_derives_roles_from_names():
    """The suffix conventions the trainer, the C emitter, the memory report, export and the fleet used to re-derive
    (".b" = bias, ".w_train" = slice, "<param>.m/.v" = slots, "<op>.update" / "<op>.grad" = the forward op)."""
    pattern = re.compile(r"""endswith\(\s*["'][^"']*(\.b|w_train|\.m|\.v)["']|\+\s*["']\.[mv]["']|\.\{s\}|"""
                         r"""removesuffix\(\s*["']\.(update|grad)["']|rsplit\(\s*["']\.["']|SLOT_SUFFIXES|"""
                         r"""startswith\(\s*["']head\.""")
    for f in CONSUMERS:
        hits = [line.strip() for line in (SRC / f).read_text().splitlines() if pattern.search(line)]
        assert not hits, (f, hits)
