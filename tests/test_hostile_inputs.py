"""Issue 12: hostile model files, bad records and power cuts. Nothing from a file reaches C unchecked, the C program
refuses bad records with one line, and the device state survives a cut at every byte of a save."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from microtrain.autodiff.build import build_training_graph
from microtrain.codegen.cnames import Names, c_comment, c_string
from microtrain.codegen.project import (
    build,
    emit_project,
    harness_args,
    load_program,
    read_state,
    run_host,
    toolchain,
    write_records,
    write_state,
)
from microtrain.codegen.statefile import FILE_PAGE, StateFileError, slot_bytes
from microtrain.compiler.memory import plan_training_graph
from microtrain.errors import MicrotrainError
from microtrain.frontends.pkl import ModelLoadError
from microtrain.frontends.zoo import load_model
from microtrain.ir.graph import Graph, GraphFormatError, Op, Tensor
from microtrain.sparse.scheme import Scheme, resolve_scheme

from tiny import CLASSES, tiny_model

needs_gcc = pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain (gcc, make) not installed")
MIXED = Scheme("mixed", n_bias_update=8, weight_ratios={4: 0.5, 5: 0.25, 7: 1.0, 9: 0.5}, head=True)
REPO = Path(__file__).resolve().parents[1]
EVIL = 'x */ __attribute__((constructor)) static void pwn(void) { system("touch {marker}"); } /* "\\ \n#include'


def cli(*argv: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microtrain", *argv], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env={**os.environ, **(env or {})})


def one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """A failed command's stderr is one `microtrain: error:` line containing every needle, exit 2, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microtrain: error: "), r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def save_json_model(g: Graph, stem: Path) -> tuple[dict, dict]:
    g.save(stem)
    d = json.loads(stem.with_suffix(".json").read_text())
    with np.load(stem.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return d, arrays


def write_model(stem: Path, d: dict, arrays: dict) -> Path:
    stem.with_suffix(".json").write_text(json.dumps(d))
    with open(stem.with_suffix(".npz"), "wb") as f:
        np.savez(f, **arrays)
    return stem.with_suffix(".json")


# ---- 1. code injection from a model file --------------------------------------------------------------------------
def test_injected_graph_name_is_refused_at_load_and_never_runs(tmp_path):
    """The issue's exploit: a `"name"` holding `*/` plus a constructor. `compile --run` refuses the file with one
    line before anything is generated, and the marker the constructor would create never appears."""
    marker = tmp_path / "PWNED"
    d, arrays = save_json_model(tiny_model(res=16), tmp_path / "tiny")
    d["name"] = EVIL.replace("{marker}", str(marker))
    path = write_model(tmp_path / "evil", d, arrays)
    r = cli("compile", "--model", str(path), "--scheme", "last:2", "--classes", "5", "-o", str(tmp_path / "out"),
            "--run", "--steps", "2", "--data", "skimage")
    one_line(r, str(path), "graph name")
    assert not marker.exists() and not (tmp_path / "out" / "model.c").exists()


@pytest.mark.parametrize("where", ["tensor", "op", "input"])
def test_hostile_tensor_and_op_names_are_refused(where, tmp_path):
    d, arrays = save_json_model(tiny_model(res=16), tmp_path / "tiny")
    bad = 'stem.w"); system("id'
    if where == "tensor":
        d["tensors"][bad] = d["tensors"].pop("stem.y")
    elif where == "op":
        d["ops"][0]["name"] = "stem */ int x; /*"
    else:
        d["inputs"] = ["../../etc/passwd"]
    with pytest.raises(ModelLoadError, match="not a valid name|is not a tensor"):
        load_model(write_model(tmp_path / "m", d, arrays))


@needs_gcc
def test_emitter_escapes_even_unchecked_names(tmp_path):
    """Defence in depth: a graph built in memory (no loader) with hostile names still compiles to a program whose
    identifiers are generated, whose comments and strings hold the names as text, and which runs without executing
    anything; the trace file carries the hostile names back byte for byte."""
    marker = tmp_path / "PWNED"
    g = tiny_model(seed=3, res=16)
    evil = EVIL.replace("{marker}", str(marker))
    g.name = evil
    rename = {"stem.y": evil + "\t\x01??/", "b1.pw1.y": "é*/\\"}
    for old, new in rename.items():
        t = g.tensors.pop(old)
        t.name = new
        g.tensors[new] = t
        for op in g.ops:
            op.inputs = [new if n == old else n for n in op.inputs]
            op.outputs = [new if n == old else n for n in op.outputs]
    g.ops[0].name = evil
    tg = build_training_graph(g, resolve_scheme("last:2", g), CLASSES)
    sched, best = plan_training_graph(tg, patch=None)
    out = tmp_path / "c"
    emit_project(sched, best.plan, out)
    build(out)
    x = np.zeros((2, 3, 16, 16), np.int8)
    write_records(out / "s.bin", x, [0, 1], 0.01)
    run_host(out, harness_args("s.bin", trace="trace.bin", quiet=True))
    assert not marker.exists()
    raw = (out / "trace.bin").read_bytes()
    for new in rename.values():
        assert new.encode() in raw
    code = subprocess.run(["gcc", "-fpreprocessed", "-dD", "-E", "-P", str(out / "model.c")], capture_output=True,
                          text=True, check=True).stdout  # the C without its comments
    code = re.sub(r'"(\\.|[^"\\])*"', '""', code)  # and without its string literals
    assert "system(" not in code and "constructor)" not in code and "touch " not in code


def test_c_escaping_helpers():
    names = Names()
    for n in [EVIL, "", "a", "1abc", "a b", "a" * 500, "é", "if", "__x__"]:
        ident = names("W", n)
        assert re.fullmatch(r"W_[A-Za-z0-9_]*|W", ident), ident
    assert names("W", "a.b") != names("W", "a_b")  # sanitised names that collide stay distinct
    for text in [EVIL, "*/", "/*", "??/", "a\\\nb", "\x00\x7f"]:
        c = c_comment(text)
        assert "*/" not in c and "/*" not in c and "\\" not in c and "??" not in c and "\n" not in c
        s = c_string(text)
        body = s[1:-1]
        assert s[0] == s[-1] == '"' and not re.search(r'(?<!\\)"', body.replace("\\\\", ""))
        assert "\n" not in s and "??" not in body.replace("\\?", "")


@needs_gcc
def test_c_string_round_trips_through_gcc(tmp_path):
    texts = [EVIL, 'quote " backslash \\ trigraph ??/ ??=', "\x01\x1f\x7f\n\t", "é ü 漢字", "0123\\0"]
    prog = "#include <stdio.h>\nint main(void) {\n" + "".join(
        f"  fputs({c_string(t)}, stdout); putchar(0);\n" for t in texts) + "  return 0;\n}\n"
    (tmp_path / "s.c").write_text(prog)
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-Wno-trigraphs", "-o", str(tmp_path / "s"),
                    str(tmp_path / "s.c")], check=True)
    out = subprocess.run([str(tmp_path / "s")], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [t.encode() for t in texts]


# ---- model loaders: keys, shapes, dtypes, groups, finite values, caps ---------------------------------------------
def _mutate(kind: str, d: dict, arrays: dict) -> None:
    t = d["tensors"]
    if kind == "missing key":
        del d["ops"][0]["kind"]
    elif kind == "missing tensors":
        del d["tensors"]
    elif kind == "wrong shape":
        t["stem.w"]["shape"] = [8, 3, 3, 4]
    elif kind == "array shape":
        arrays["stem.w"] = arrays["stem.w"][:, :, :2]
    elif kind == "dtype":
        arrays["stem.b"] = arrays["stem.b"].astype(np.float64)
    elif kind == "unknown dtype":
        t["stem.y"]["dtype"] = "complex128"
    elif kind == "groups":
        d["ops"][2]["attrs"]["groups"] = 3
    elif kind == "nan scale":
        arrays["stem.w@scale"] = np.full_like(arrays["stem.w@scale"], np.nan)
    elif kind == "nan act scale":
        t["stem.y"]["scale"] = float("nan")
    elif kind == "inf weight":
        arrays["head.w"] = arrays["head.w"].astype(np.float32) * np.inf
        t["head.w"]["dtype"] = "float32"
    elif kind == "huge input":
        t["input"]["shape"] = [3, 100000, 100000]
    elif kind == "huge act":
        t["stem.y"]["shape"] = [8, 4096, 4096]
    elif kind == "stride string":
        d["ops"][0]["attrs"]["stride"] = "1); system(\"id\"); (1"
    elif kind == "unknown op":
        d["ops"][0]["kind"] = "exec"
    elif kind == "extra array":
        arrays["x */ evil"] = np.zeros(1)
    elif kind == "list not dict":
        d["tensors"] = list(d["tensors"])
    elif kind == "zero":
        t["stem.y"]["zero"] = 10 ** 9
    elif kind == "bad output shape":
        t["stem.y"]["shape"] = [8, 9, 9]


KINDS = ["missing key", "missing tensors", "wrong shape", "array shape", "dtype", "unknown dtype", "groups",
         "nan scale", "nan act scale", "inf weight", "huge input", "huge act", "stride string", "unknown op",
         "extra array", "list not dict", "zero", "bad output shape"]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_json_model_is_one_line(kind, tmp_path):
    d, arrays = save_json_model(tiny_model(res=16), tmp_path / "tiny")
    _mutate(kind, d, arrays)
    path = write_model(tmp_path / "bad", d, arrays)
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert "\n" not in str(e.value) and str(path.with_suffix("")) in str(e.value)


def test_malformed_json_model_cli_is_one_line(tmp_path, sample_images):
    d, arrays = save_json_model(tiny_model(res=16), tmp_path / "tiny")
    _mutate("nan scale", d, arrays)
    path = write_model(tmp_path / "bad", d, arrays)
    one_line(cli("predict", "--model", str(path), sample_images["chelsea"]), "bad.json", "finite")


def test_npz_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    """An archive whose members declare more than MAX_NPZ_BYTES (here lowered to 32 MB, so the test needs only a
    64 MB member compressed to 64 KB) is refused from its directory, before anything is inflated."""
    import microtrain.ir.graph as graph

    monkeypatch.setattr(graph, "MAX_NPZ_BYTES", 32 << 20)
    d, arrays = save_json_model(tiny_model(res=16), tmp_path / "tiny")
    path = write_model(tmp_path / "bomb", d, arrays)
    with zipfile.ZipFile(path.with_suffix(".npz"), "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pad.npy", b"\0" * (64 << 20))  # 64 MB of zeros: ~64 KB compressed
    with pytest.raises(ModelLoadError, match="inflates"):
        load_model(path)


def _pkl_dict(model: Graph) -> dict:
    """A tiny-training model dict with the structure `read_pkl` expects (first_conv, blocks, classifier)."""
    def conv(name: str, stride: int, groups: int) -> dict:
        w, b = model.tensors[f"{name}.w"], model.tensors[f"{name}.b"]
        op = model.op(name)
        x, y = model.tensors[op.inputs[0]], model.tensors[op.outputs[0]]
        return {"stride": stride, "groups": groups, "params": {
            "weight": w.data, "bias": b.data, "w_scales": np.asarray(w.scale, np.float32), "x_scale": x.scale,
            "x_zero": x.zero, "y_scale": y.scale, "y_zero": y.zero}}

    stem = conv("stem", 2, 1)
    stem["in_shape"] = model.tensors["input"].shape[1]
    blocks = []
    for i in (1, 2, 3):
        a = {k: model.op(f"b{i}.{k}").attrs for k in ("pw1", "dw", "pw2")}
        blk = {"pointwise1": conv(f"b{i}.pw1", 1, 1), "depthwise": conv(f"b{i}.dw", a["dw"]["stride"],
                                                                          a["dw"]["groups"]),
               "pointwise2": conv(f"b{i}.pw2", 1, 1)}
        if f"b{i}.add" in [o.name for o in model.ops]:
            y = model.tensors[f"b{i}.add.y"]
            xin = model.tensors[model.op(f"b{i}.add").inputs[1]]
            blk["residual"] = {"params": {"x_scale": xin.scale, "x_zero": xin.zero, "y_scale": y.scale,
                                          "y_zero": y.zero}}
        blocks.append(blk)
    w = model.tensors["head.w"]
    pool = model.tensors["pool.y"]
    y = model.tensors["head.y"]
    head = {"params": {"weight": w.data.reshape(*w.shape, 1, 1), "bias": model.tensors["head.b"].data,
                       "w_scales": np.asarray(w.scale, np.float32), "x_scale": pool.scale, "x_zero": pool.zero,
                       "y_scale": y.scale, "y_zero": y.zero}}
    return {"first_conv": stem, "blocks": blocks, "classifier": head}


@pytest.mark.parametrize("kind", ["ok", "in_shape huge", "in_shape str", "groups", "stride", "nan w_scales",
                                  "zero w_scales", "weight float", "kernel even", "bias shape", "x_scale nan",
                                  "channels do not chain", "blocks not list", "residual no params"])
def test_pkl_schema(kind, tmp_path):
    d = _pkl_dict(tiny_model(res=16))
    b0 = d["blocks"][0]
    if kind == "in_shape huge":
        d["first_conv"]["in_shape"] = 100000
    elif kind == "in_shape str":
        d["first_conv"]["in_shape"] = "16"
    elif kind == "groups":
        b0["depthwise"]["groups"] = 5
    elif kind == "stride":
        b0["depthwise"]["stride"] = 0
    elif kind == "nan w_scales":
        b0["pointwise1"]["params"]["w_scales"][:] = np.nan
    elif kind == "zero w_scales":
        b0["pointwise1"]["params"]["w_scales"][:] = 0
    elif kind == "weight float":
        b0["pointwise1"]["params"]["weight"] = b0["pointwise1"]["params"]["weight"].astype(np.float32)
    elif kind == "kernel even":
        b0["depthwise"]["params"]["weight"] = b0["depthwise"]["params"]["weight"][:, :, :2, :2].copy()
    elif kind == "bias shape":
        b0["pointwise2"]["params"]["bias"] = b0["pointwise2"]["params"]["bias"][:-1].copy()
    elif kind == "x_scale nan":
        b0["pointwise2"]["params"]["x_scale"] = float("nan")
    elif kind == "channels do not chain":
        p = d["blocks"][1]["pointwise1"]["params"]
        p["weight"] = np.concatenate([p["weight"], p["weight"][:, :1]], axis=1)
    elif kind == "blocks not list":
        d["blocks"] = {"0": b0}
    elif kind == "residual no params":
        b0["residual"] = {"x": 1}
    path = tmp_path / "m x*!.pkl"
    path.write_bytes(pickle.dumps(d, protocol=2))
    if kind == "ok":
        g = load_model(path)
        assert re.fullmatch(r"[A-Za-z0-9_.+-]+", g.name)  # the file name's `*`, `!` and space did not survive
        assert [o.kind for o in g.ops] == [o.kind for o in tiny_model(res=16).ops]
        return
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_graph_round_trips_through_the_validator(tmp_path):
    """Every graph the project makes (zoo models, training graphs of each optimizer / storage) loads back."""
    from microtrain.autodiff.build import TrainConfig

    m = load_model("mcunet-5fps")
    for cfg in (TrainConfig(), TrainConfig(optimizer="adam", int8_grads=True),
                TrainConfig(optimizer="sgd-m", update_storage="fp32", qas=False)):
        tg = build_training_graph(m, resolve_scheme("paper-99kb", m), 10, cfg)
        tg.save(tmp_path / "g")
        back = Graph.load(tmp_path / "g")
        assert [o.name for o in back.ops] == [o.name for o in tg.ops] and back.meta == json.loads(
            json.dumps(tg.meta))


def test_graph_in_memory_checks():
    g = Graph("ok")
    with pytest.raises(GraphFormatError):
        g.add_op(Op("x", "nope", [], []))
    g.add_tensor(Tensor("a", (1,), "int8", "act", 1.0))
    with pytest.raises(GraphFormatError, match="duplicate"):
        g.add_tensor(Tensor("a", (1,), "int8", "act", 1.0))


# ---- 2. the C program validates its records --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_prog(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinyprog")
    tg = build_training_graph(tiny_model(seed=1, res=16), MIXED, CLASSES)
    sched, best = plan_training_graph(tg, patch=None)
    emit_project(sched, best.plan, out)
    build(out)
    return out


def _records(path: Path, labels, lrs, n_images: int | None = None) -> None:
    n = len(labels)
    rng = np.random.default_rng(0)
    write_records(path, rng.integers(-128, 128, (n, 3, 16, 16)).astype(np.int8), labels, lrs)


@needs_gcc
@pytest.mark.parametrize("labels,lrs,msg", [
    ([0, CLASSES], 0.01, f"record 2: label {CLASSES} is not a class"),
    ([-1], 0.01, "record 1: label -1 is not a class"),
    ([1 << 30], 0.01, f"record 1: label {1 << 30} is not a class"),
    ([0, 1, 2], [0.01, float("nan"), 0.01], "record 2: learning rate with bits 2143289344 is not finite"),
    ([0], float("inf"), "record 1: learning rate with bits 2139095040 is not finite"),
    ([0], -0.01, "is not finite and >= 0"),
])
@pytest.mark.parametrize("program", ["prog", "prog_asan"])
def test_bad_record_is_one_error_line(tiny_prog, labels, lrs, msg, program, tmp_path):
    if program == "prog_asan":
        build(tiny_prog, "asan")
    f = tmp_path / "bad.bin"
    _records(f, labels, lrs)
    with pytest.raises(MicrotrainError, match=re.escape(msg)):
        run_host(tiny_prog, harness_args(str(f), state_out=str(tmp_path / "s.bin")), program=program)
    assert not (tmp_path / "s.bin").exists()  # it stopped before the step: nothing was saved


@needs_gcc
@pytest.mark.parametrize("cut", ["truncated", "trailing", "header count"])
def test_record_size_must_match_header(tiny_prog, cut, tmp_path):
    f = tmp_path / "r.bin"
    _records(f, [0, 1, 2], 0.01)
    raw = f.read_bytes()
    raw = {"truncated": raw[:-5], "trailing": raw + b"junk",
           "header count": raw[:4] + (1000).to_bytes(4, "little") + raw[8:]}[cut]
    f.write_bytes(raw)
    with pytest.raises(MicrotrainError, match="size does not match its header"):
        run_host(tiny_prog, harness_args(str(f)))


# ---- 3. device state that survives power cuts ------------------------------------------------------------------------
@needs_gcc
@pytest.mark.parametrize("page,flash", [(FILE_PAGE, 0), (64, 1), (8, 1)], ids=["file-256", "nor-64", "nor-8"])
def test_power_cut_at_every_byte_of_a_save(tiny_prog, page, flash, tmp_path):
    """tests/c/state_powercut.c: three saves (into an empty store, next to one state, over the older of two), each
    cut after every possible number of written bytes (torn writes included) and reloaded after the live state was
    scribbled over: 100% of the reloads give the old or the new state; a store with nothing valid loads nothing and
    leaves the live state untouched."""
    srcs = ["model.c"] + sorted(p.name for p in tiny_prog.glob("mt_*.c") if p.name not in ("mt_main.c",
                                                                                           "mt_io_host.c"))
    exe = tmp_path / "powercut"
    subprocess.run(["gcc", "-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", "-I", str(tiny_prog), "-o", str(exe),
                    *[str(tiny_prog / s) for s in srcs], str(REPO / "tests" / "c" / "state_powercut.c"), "-lm"],
                   check=True, capture_output=True)
    r = subprocess.run([str(exe), str(page), str(flash)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [dict(zip(m[::2], map(int, m[1::2]), strict=True))
            for m in (line.split() for line in r.stdout.splitlines() if line.startswith("save"))]
    assert len(rows) == 3
    prog = load_program(tiny_prog)
    payload = 4 + sum(t["nbytes"] for t in prog["state"])
    for i, row in enumerate(rows):
        assert row["bad"] == 0
        assert row["cuts"] > payload  # every byte of the payload and of the header was a cut point
        assert row["old"] + row["new"] + row["none"] == row["cuts"]
        assert row["new"] >= 1 and (row["old"] if i else row["none"]) >= row["cuts"] - row["new"] - 0
    assert "garbage store rc -2 untouched 1" in r.stdout


@needs_gcc
def test_state_file_slots_through_the_harness(tiny_prog, tmp_path):
    """-i and -o on one file: each save goes to the other slot; a flipped byte in the newest slot falls back to the
    previous state (read by the harness and by read_state), never a mix; both slots broken is a one-line error and
    nothing is saved."""
    prog = load_program(tiny_prog)
    st = tmp_path / "state.bin"
    _records(tmp_path / "a.bin", [0, 1, 2], 0.02)
    _records(tmp_path / "b.bin", [3, 4, 0], 0.02)
    run_host(tiny_prog, harness_args(str(tmp_path / "a.bin"), state_out=str(st), quiet=True))
    first = read_state(st, prog)
    assert st.stat().st_size == slot_bytes(4 + sum(t["nbytes"] for t in prog["state"]))
    run_host(tiny_prog, harness_args(str(tmp_path / "b.bin"), state_in=str(st), state_out=str(st), quiet=True))
    second = read_state(st, prog)
    assert int(second["__step__"]) == 6 and int(first["__step__"]) == 3
    raw = st.read_bytes()
    slot = len(raw) // 2
    assert len(raw) == 2 * slot
    # every single-byte corruption of the two-slot file reads as the old or the new state (host reader)
    outcomes = {"old": 0, "new": 0}
    for off in range(len(raw)):
        bad = bytearray(raw)
        bad[off] ^= 0x5A
        (tmp_path / "x.bin").write_bytes(bytes(bad))
        got = read_state(tmp_path / "x.bin", prog)
        which = "new" if int(got["__step__"]) == 6 else "old"
        ref = second if which == "new" else first
        assert which == ("old" if slot <= off < slot + 32 or slot + FILE_PAGE <= off < slot + FILE_PAGE + 4 + sum(
            t["nbytes"] for t in prog["state"]) else "new"), off
        assert all(np.array_equal(got[k], ref[k]) for k in ref), off
        outcomes[which] += 1
    assert outcomes["old"] > 0 and outcomes["new"] > 0 and sum(outcomes.values()) == len(raw)
    # the C program agrees on a sample of them: a flip inside the newest slot's CRC-covered bytes (header, payload)
    # falls back to the old state, one in its padding or in the old slot changes nothing
    payload = 4 + sum(t["nbytes"] for t in prog["state"])

    def covered(off: int) -> bool:
        rel = off - slot
        return 0 <= rel < 32 or FILE_PAGE <= rel < FILE_PAGE + payload

    for off in (0, 40, slot, slot + 17, slot + 100, slot + FILE_PAGE + 5, slot + FILE_PAGE + payload - 1,
                len(raw) - 1):
        bad = bytearray(raw)
        bad[off] ^= 0xFF
        (tmp_path / "x.bin").write_bytes(bytes(bad))
        want = 3 if covered(off) else 6
        assert int(read_state(tmp_path / "x.bin", prog)["__step__"]) == want, off
        run_host(tiny_prog, harness_args(state_in=str(tmp_path / "x.bin"), state_out=str(tmp_path / "y.bin")))
        assert int(read_state(tmp_path / "y.bin", prog)["__step__"]) == want, off
        (tmp_path / "y.bin").unlink()
    # bytes after the two slots are not part of the store (the "trailing junk"): ignored by both readers
    (tmp_path / "junk.bin").write_bytes(raw + os.urandom(100))
    assert int(read_state(tmp_path / "junk.bin", prog)["__step__"]) == 6
    run_host(tiny_prog, harness_args(state_in=str(tmp_path / "junk.bin"), state_out=str(tmp_path / "j.bin")))
    assert int(read_state(tmp_path / "j.bin", prog)["__step__"]) == 6
    # nothing valid: one line, nothing written
    (tmp_path / "z.bin").write_bytes(os.urandom(len(raw)))
    with pytest.raises(MicrotrainError, match="does not match this program or is corrupt"):
        run_host(tiny_prog, harness_args(state_in=str(tmp_path / "z.bin"), state_out=str(tmp_path / "w.bin")))
    assert not (tmp_path / "w.bin").exists()
    with pytest.raises(StateFileError, match="no valid state"):
        read_state(tmp_path / "z.bin", prog)


def test_non_finite_state_is_refused(tmp_path):
    prog = {"state_fingerprint": 7, "state": [{"name": "head.w", "dtype": "float32", "shape": [2], "nbytes": 8}]}
    with pytest.raises(StateFileError, match="finite"):
        write_state(tmp_path / "s.bin", {"head.w": np.array([1.0, np.nan], np.float32)}, prog)
    write_state(tmp_path / "s.bin", {"head.w": np.array([1.0, 2.0], np.float32)}, prog)
    assert read_state(tmp_path / "s.bin", prog)["head.w"].tolist() == [1.0, 2.0]


def test_pkl_zip_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    """A .pkl zip whose data.pkl declares more than MAX_PICKLE_BYTES (lowered to 1 MB here) is refused by the
    declared size; the issue's 1 MB zip inflating to 1 GiB is the same case at the default 256 MB cap."""
    import microtrain.frontends.pkl as pkl

    monkeypatch.setattr(pkl, "MAX_PICKLE_BYTES", 1 << 20)
    path = tmp_path / "bomb.pkl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + b"\0" * (8 << 20))
    assert path.stat().st_size < 100_000
    with pytest.raises(ModelLoadError, match="inflates to 8 MB"):
        load_model(path)


@needs_gcc
def test_c_refuses_a_state_with_nan_even_with_a_valid_crc(tiny_prog, tmp_path):
    """A state whose CRC is right but whose float tensor holds a NaN (no training step makes one) is not a valid slot:
    alone it is refused with one line; next to an older valid slot, the older one is loaded."""
    from microtrain.codegen.statefile import build_file, payload_bytes

    prog = load_program(tiny_prog)
    f32 = next(t for t in prog["state"] if t["dtype"] == "float32")
    _records(tmp_path / "a.bin", [0, 1], 0.02)
    st = tmp_path / "s.bin"
    run_host(tiny_prog, harness_args(str(tmp_path / "a.bin"), state_out=str(st), quiet=True))
    good = st.read_bytes()
    state = read_state(st, prog)
    payload = bytearray(int(state["__step__"]).to_bytes(4, "little"))
    for t in prog["state"]:
        a = np.array(state[t["name"]], t["dtype"])
        if t is f32:
            a.reshape(-1)[0] = np.nan
        payload += a.tobytes()
    assert len(payload) == payload_bytes(prog)
    bad = build_file(bytes(payload), prog["state_fingerprint"], seq=2)
    (tmp_path / "nan.bin").write_bytes(bad)
    with pytest.raises(MicrotrainError, match="does not match this program or is corrupt"):
        run_host(tiny_prog, harness_args(state_in=str(tmp_path / "nan.bin"), state_out=str(tmp_path / "o.bin")))
    (tmp_path / "both.bin").write_bytes(good + bad)  # slot 0: the valid state (seq 1), slot 1: NaN (seq 2)
    run_host(tiny_prog, harness_args(state_in=str(tmp_path / "both.bin"), state_out=str(tmp_path / "o.bin")))
    assert int(read_state(tmp_path / "o.bin", prog)["__step__"]) == 2
