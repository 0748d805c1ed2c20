"""`microtrain federate`: partitions, the aggregation rule, and a 3-device 2-round federation on Flower's simulation
runtime whose aggregate equals the average computed here by hand."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.cli import main
from microtrain.errors import MicrotrainError
from microtrain.fleet import core
from microtrain.runtime.trainstep import sr_uniform
from microtrain.sparse.scheme import resolve_scheme

from tiny import CLASSES, tiny_model


def hand_average(graph, states: list[dict], weights: list[int], seed: int, step: int) -> dict[str, np.ndarray]:
    """FedAvg as the docs state it: weighted mean of the integers (= real-domain mean / shared scale), int8 back with
    the device's stochastic rounding (counter hash, the server's seed), int32 to nearest even, head in float32."""
    order = sorted(graph.meta["train"]["state"])
    out = {}
    for n in core.trainable_names(graph):
        num = sum(w * states[k][n].astype(np.float64) for k, w in enumerate(weights))
        m = num / sum(weights)
        dtype = graph.tensors[n].dtype
        if dtype == "int8":
            u = sr_uniform(seed ^ core.AGGREGATION_SEED, step, order.index(n), m.size).numpy().reshape(m.shape)
            out[n] = np.clip(np.floor(m + u), -128, 127).astype(np.int8)
        elif dtype == "int32":
            out[n] = np.rint(m).astype(np.int32)
        else:
            out[n] = m.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def tiny_graph():
    m = tiny_model(res=32)
    return build_training_graph(m, resolve_scheme("last:3", m), CLASSES, TrainConfig())


def test_partitions_cover_every_image_once():
    labels = np.repeat(np.arange(10), 50)
    for spec in ("iid", "dirichlet:0.3", "dirichlet:100"):
        parts = core.partition(labels, 10, 7, spec, seed=3)
        flat = np.concatenate(parts)
        assert len(parts) == 7 and min(map(len, parts)) > 0
        assert np.array_equal(np.sort(flat), np.arange(len(labels)))
    iid = core.partition(labels, 10, 5, "iid", seed=3)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1

    def skew(parts):  # mean share of each client's most frequent class
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert skew(core.partition(labels, 10, 5, "dirichlet:0.1", seed=3)) > skew(iid) + 0.2
    for bad in ("dirichlet:0", "dirichlet:x", "shards"):
        with pytest.raises(MicrotrainError, match="--partition"):
            core.partition(labels, 10, 5, bad)
    with pytest.raises(MicrotrainError, match="clients but only"):
        core.partition(labels[:3], 10, 5, "iid")


def test_aggregate_is_the_weighted_real_domain_mean(tiny_graph):
    rng = np.random.default_rng(0)
    base = core.initial_state(tiny_graph)
    states = []
    for _ in range(3):
        s = {}
        for n, a in base.items():
            if a.dtype == np.int8:
                s[n] = rng.integers(-128, 128, a.shape).astype(np.int8)
            elif a.dtype == np.int32:
                s[n] = rng.integers(-5000, 5000, a.shape).astype(np.int32)
            else:
                s[n] = rng.normal(size=a.shape).astype(np.float32)
        states.append(s)
    weights = [5, 11, 7]
    got = core.aggregate(tiny_graph, states, weights, seed=4, step=30)
    want = hand_average(tiny_graph, states, weights, 4, 30)
    assert got.keys() == want.keys() == set(core.trainable_names(tiny_graph))
    for n in want:
        assert got[n].dtype == want[n].dtype
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    # stochastic rounding stays within one unit of the mean; devices that agree are averaged to themselves
    w = "b3.pw1.w_train"
    mean = sum(k * s[w].astype(np.float64) for k, s in zip(weights, states, strict=True)) / sum(weights)
    assert np.all(np.abs(got[w] - mean) < 1)
    same = core.aggregate(tiny_graph, [states[0]] * 3, weights, seed=4, step=30)
    assert all(np.array_equal(same[n], states[0][n]) for n in same if same[n].dtype != np.float32)
    # only the trainable state travels
    assert core.payload_bytes(tiny_graph) == sum(a.nbytes for a in base.values()) < core.model_bytes(tiny_graph)


@pytest.fixture(scope="module")
def fleet_inputs(tmp_path_factory, images32):
    """The tiny model file and an ImageFolder of the 60 labelled images32: 3 per class held out as the test split."""
    root = tmp_path_factory.mktemp("fleet")
    tiny_model(res=32).save(root / "tiny")
    x, y, _ = images32
    for c in range(CLASSES):
        idx = np.flatnonzero(y == c)
        for j, i in enumerate(idx):
            d = root / "data" / ("test" if j < 3 else "train") / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i].astype(np.int16) + 128).astype(np.uint8).transpose(1, 2, 0)).save(d / f"{i}.png")
    return root


def test_three_devices_two_rounds_on_flower(fleet_inputs, tmp_path, capsys):
    pytest.importorskip("flwr")
    run = tmp_path / "run"
    rc = main(["federate", "--model", str(fleet_inputs / "tiny.json"), "--scheme", "last:3", "--data",
               str(fleet_inputs / "data"), "--clients", "3", "--rounds", "2", "--local-steps", "6", "--partition",
               "dirichlet:1", "--lr", "0.01", "--seed", "2", "--keep-client-states", "--workers", "2", "--quiet",
               "--out", str(run), "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    job = core.Job.load(run / core.JOB)
    graph = core.training_graph(job)
    sizes = m["shard_sizes"]
    assert len(sizes) == 3 and sum(sizes) == m["train_images"] and min(sizes) > 0
    assert len(m["test_accuracy_per_round"]) == 2 and all(0 <= a <= 1 for a in m["test_accuracy_per_round"])
    assert m["global_step"] == 2 * 6 and m["engine"].startswith("torch engine at batch 1")
    # round 2's aggregate is the hand-computed average of what the devices sent back, and it is the checkpoint
    d = run / "rounds" / "round-2"
    states = [dict(np.load(d / f"client-{k}.npz")) for k in range(3)]
    want = hand_average(graph, states, sizes, job.seed, 12)
    with np.load(run / core.CHECKPOINT) as z:
        ckpt = {n: z[n] for n in z.files}
    for n, v in want.items():
        np.testing.assert_array_equal(ckpt[n], v, err_msg=n)
    assert int(ckpt["__step__"]) == 12
    # the devices trained: each sent back a state that differs from the round's starting point and from each other
    with np.load(run / "rounds" / "round-1" / "aggregate.npz") as z:
        start = {n: z[n] for n in z.files}
    assert all(any(not np.array_equal(s[n], start[n]) for n in start) for s in states)
    assert not np.array_equal(states[0]["head.w"], states[1]["head.w"])
    b = m["bytes"]
    assert b["payload_per_transfer"] == sum(v.nbytes for v in want.values()) < b["full_model"]
    assert b["wire_per_round_per_client"]["up"] >= b["payload_per_transfer"]
    assert (run / core.PLOT).stat().st_size > 0 and m["command"].startswith("microtrain federate --model")

    # interrupted after round 1: --resume runs round 2 only and ends with the same state and accuracy
    part = tmp_path / "part"
    shutil.copytree(run, part, ignore=shutil.ignore_patterns("rounds"))
    with np.load(run / "rounds" / "round-1" / "aggregate.npz") as z:
        np.savez(part / core.CHECKPOINT, **{n: z[n] for n in z.files}, __step__=np.array(6, np.int64))
    info = json.loads((run / core.STATE).read_text())
    info.update(history=info["history"][:1], global_step=6, checkpoint_sha256=core.sha256(part / core.CHECKPOINT))
    core.write_json(part / core.STATE, info)
    rc = main(["federate", "--model", str(fleet_inputs / "tiny.json"), "--scheme", "last:3", "--data",
               str(fleet_inputs / "data"), "--clients", "3", "--rounds", "2", "--local-steps", "6", "--partition",
               "dirichlet:1", "--lr", "0.01", "--seed", "2", "--quiet", "--out", str(part), "--resume", "--json"])
    assert rc == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["test_accuracy_per_round"] == m["test_accuracy_per_round"]
    assert resumed["train_loss_per_round"] == m["train_loss_per_round"]
    with np.load(part / core.CHECKPOINT) as z:
        assert all(np.array_equal(z[n], ckpt[n]) for n in ckpt)
    # a changed configuration is refused
    rc = main(["federate", "--model", str(fleet_inputs / "tiny.json"), "--scheme", "last:3", "--data",
               str(fleet_inputs / "data"), "--clients", "3", "--rounds", "2", "--local-steps", "7", "--partition",
               "dirichlet:1", "--lr", "0.01", "--seed", "2", "--quiet", "--out", str(part), "--resume"])
    assert rc == 2 and "configuration changed local_steps 6 -> 7" in capsys.readouterr().err


def test_state_bin_for_the_c_program(fleet_inputs, tmp_path, capsys):
    pytest.importorskip("flwr")
    from microtrain.codegen.project import load_program, read_state

    prog = tmp_path / "c"
    tiny = str(fleet_inputs / "tiny.json")
    assert main(["compile", "--model", tiny, "--scheme", "bias-only", "--classes", str(CLASSES), "-o",
                 str(prog)]) == 0
    run = tmp_path / "run"
    assert main(["federate", "--model", tiny, "--scheme", "bias-only", "--data", str(fleet_inputs / "data"),
                 "--clients", "2", "--rounds", "1", "--local-steps", "3", "--program", str(prog), "--quiet",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    got = read_state(run / core.STATE_BIN, load_program(prog))
    with np.load(run / core.CHECKPOINT) as z:
        for n in z.files:
            np.testing.assert_array_equal(got[n], z[n], err_msg=n)
    # a program of another scheme is refused in one line
    assert main(["federate", "--model", tiny, "--scheme", "last:3", "--data", str(fleet_inputs / "data"),
                 "--clients", "2", "--rounds", "1", "--local-steps", "3", "--program", str(prog), "--quiet",
                 "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("microtrain: error:") and "the program's state differs" in err[0]


def test_bad_options_are_one_line(fleet_inputs, tmp_path, capsys):
    base = ["federate", "--model", str(fleet_inputs / "tiny.json"), "--scheme", "last:3", "--data",
            str(fleet_inputs / "data"), "--out", str(tmp_path / "r"), "--quiet"]
    for extra, msg in ((["--partition", "dirichlet:-1"], "--partition"), (["--sample", "0"], "--sample"),
                       (["--clients", "0"], "--clients"), (["--resume"], "nothing to resume")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("microtrain: error:") and msg in err[0]
