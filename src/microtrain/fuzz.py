"""Mutation fuzzing of every loader of untrusted files: model JSON / NPZ / PKL, scheme files, state files (host
reader), and, through `tests/c/fuzz_harness.c` under AddressSanitizer + UBSan, the C program's record and state files.

A mutation is a list of (op, position, value) triples applied to a valid input; `tests/test_fuzz.py` draws them with
hypothesis (shrinkable), `benchmarks/fuzz.py` draws 10,000 per loader from a seeded generator. The property: each
input either loads or fails with the loader's own one-line error (MicrotrainError without a newline); anything else
(another exception, a hang past the time limit, code execution, a sanitizer report or a signal in C) is a finding.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import signal
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph

BYTE_OPS = ("flip", "set", "u32", "truncate", "append", "delete", "duplicate", "zero")
INTERESTING_U32 = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                   0xFFFFFFFF, 0x7FC00000, 0x7F800000, 0xFF800000, 0xBF800000, 5, 4, 10)
JSON_OPS = ("delete", "replace", "duplicate", "wrap")
INTERESTING_JSON: tuple[Any, ...] = (None, True, 0, -1, 1, 2 ** 31, 10 ** 12, -(10 ** 12), 0.5, float("nan"),
                                     float("inf"), -0.0, 1e308, "", "x */ int main(){} /*", "a\n#include",
                                     "../../etc/passwd", "int8", "float32", "conv2d", "array", [], {}, [1, 2],
                                     {"a": 1}, [[1]], "b1.pw1.y", "stem.w", 3, 100000)


def mutate_bytes(raw: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    """Apply byte-level mutations; positions wrap around the current length."""
    b = bytearray(raw)
    for op, pos, val in ops:
        n = len(b)
        i = pos % n if n else 0
        if op == "flip" and n:
            b[i] ^= 1 << (val % 8)
        elif op == "set" and n:
            b[i] = val & 0xFF
        elif op == "u32" and n >= 4:
            i = min(i - i % 4, n - 4)
            b[i:i + 4] = INTERESTING_U32[val % len(INTERESTING_U32)].to_bytes(4, "little")
        elif op == "truncate":
            del b[i:]
        elif op == "append":
            b += bytes((val >> s) & 0xFF for s in (0, 8, 16, 24)) * (1 + val % 64)
        elif op == "delete" and n:
            del b[i:i + 1 + val % 64]
        elif op == "duplicate" and n:
            b[i:i] = b[i:i + 1 + val % 256]
        elif op == "zero" and n:
            b[i:i + 1 + val % 64] = bytes(len(b[i:i + 1 + val % 64]))
    return bytes(b)


def _paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:64]):
            yield from _paths(v, (*prefix, i))


def mutate_json(obj: Any, ops: list[tuple[str, int, int]]) -> Any:
    """Apply structural mutations to a JSON tree (delete, replace with an interesting value, duplicate, wrap)."""
    obj = copy.deepcopy(obj)
    for op, pos, val in ops:
        paths = list(_paths(obj))
        path = paths[pos % len(paths)]
        if not path:
            obj = INTERESTING_JSON[val % len(INTERESTING_JSON)] if op == "replace" else obj
            continue
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        k = path[-1]
        if op == "delete":
            del parent[k]
        elif op == "replace":
            parent[k] = copy.deepcopy(INTERESTING_JSON[val % len(INTERESTING_JSON)])
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(k, copy.deepcopy(parent[k]))
        elif op == "duplicate" and isinstance(parent, dict):
            parent[f"{k}#{val % 7}"] = copy.deepcopy(parent[k])
        elif op == "wrap":
            parent[k] = [parent[k]]
    return obj


def random_ops(rng: np.random.Generator, kinds: tuple[str, ...], limit: int = 1 << 20) -> list[tuple[str, int, int]]:
    return [(str(kinds[rng.integers(len(kinds))]), int(rng.integers(limit)), int(rng.integers(1 << 32)))
            for _ in range(int(rng.integers(1, 5)))]


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Tally:
    loaded: int = 0
    refused: int = 0
    findings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.loaded + self.refused + len(self.findings)


def check_one(load: Callable[[], Any], tally: Tally, label: str, seconds: float = 10.0) -> None:
    """Run one load: success, or a one-line MicrotrainError; everything else is a finding."""
    try:
        with time_limit(seconds):
            load()
        tally.loaded += 1
    except Hang as e:
        tally.findings.append(f"{label}: hang ({e})")
    except MicrotrainError as e:
        if "\n" in str(e) or not str(e):
            tally.findings.append(f"{label}: error message is not one line: {str(e)[:200]!r}")
        else:
            tally.refused += 1
    except Exception as e:  # the finding this fuzzer looks for
        tally.findings.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")


# ---- the loaders and their valid seeds -------------------------------------------------------------------------------
def pkl_dict(model: Graph) -> dict[str, Any]:
    """A tiny-training model dict (first_conv, blocks, classifier) with `model`'s arrays (a zoo-structured graph)."""
    def conv(name: str) -> dict[str, Any]:
        w, b = model.tensors[f"{name}.w"], model.tensors[f"{name}.b"]
        op = model.op(name)
        x, y = model.tensors[op.inputs[0]], model.tensors[op.outputs[0]]
        return {"stride": op.attrs["stride"], "groups": op.attrs["groups"], "params": {
            "weight": w.data, "bias": b.data, "w_scales": np.asarray(w.scale, np.float32), "x_scale": x.scale,
            "x_zero": x.zero, "y_scale": y.scale, "y_zero": y.zero}}

    stem = {**conv("stem"), "in_shape": model.tensors[model.inputs[0]].shape[1]}
    names = [o.name for o in model.ops]
    blocks = []
    i = 1
    while f"b{i}.dw" in names:
        blk = {"pointwise1": conv(f"b{i}.pw1") if f"b{i}.pw1" in names else None, "depthwise": conv(f"b{i}.dw"),
               "pointwise2": conv(f"b{i}.pw2")}
        if f"b{i}.add" in names:
            add = model.op(f"b{i}.add")
            xin, y = model.tensors[add.inputs[1]], model.tensors[add.outputs[0]]
            blk["residual"] = {"params": {"x_scale": xin.scale, "x_zero": xin.zero, "y_scale": y.scale,
                                          "y_zero": y.zero}}
        blocks.append(blk)
        i += 1
    w, pool, y = model.tensors["head.w"], model.tensors["pool.y"], model.tensors["head.y"]
    head = {"params": {"weight": w.data.reshape(*w.shape, 1, 1), "bias": model.tensors["head.b"].data,
                       "w_scales": np.asarray(w.scale, np.float32), "x_scale": pool.scale, "x_zero": pool.zero,
                       "y_scale": y.scale, "y_zero": y.zero}}
    return {"first_conv": stem, "blocks": blocks, "classifier": head}


def pkl_bytes(d: dict[str, Any], zipped: bool) -> bytes:
    raw = pickle.dumps(d, protocol=2)
    if not zipped:
        return raw
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", raw)
    return buf.getvalue()


class Loaders:
    """The valid seed inputs (a small model in the zoo's structure) and a checker per loader, writing mutated files
    into `work`."""

    def __init__(self, model: Graph, work: Path):
        from microtrain.sparse.scheme import resolve_scheme

        self.model, self.work = model, work
        work.mkdir(parents=True, exist_ok=True)
        model.save(work / "seed")
        self.json = json.loads((work / "seed.json").read_text())
        self.npz = (work / "seed.npz").read_bytes()
        self.pkl = pkl_bytes(pkl_dict(model), zipped=True)
        self.scheme = resolve_scheme("last:2", model).to_dict()
        self.marker = work / "PWNED"

    def model_json(self, ops: list, tally: Tally) -> None:
        from microtrain.frontends.zoo import load_model

        (self.work / "m.json").write_text(json.dumps(mutate_json(self.json, ops)))
        (self.work / "m.npz").write_bytes(self.npz)
        check_one(lambda: load_model(self.work / "m.json"), tally, f"json {ops}")

    def model_npz(self, ops: list, tally: Tally) -> None:
        from microtrain.frontends.zoo import load_model

        (self.work / "n.json").write_text(json.dumps(self.json))
        (self.work / "n.npz").write_bytes(mutate_bytes(self.npz, ops))
        check_one(lambda: load_model(self.work / "n.npz"), tally, f"npz {ops}")

    def model_pkl(self, ops: list, tally: Tally) -> None:
        from microtrain.frontends.zoo import load_model

        (self.work / "p.pkl").write_bytes(mutate_bytes(self.pkl, ops))
        check_one(lambda: load_model(self.work / "p.pkl"), tally, f"pkl {ops}")
        if self.marker.exists():
            tally.findings.append(f"pkl {ops}: code execution")

    def scheme_file(self, ops: list, tally: Tally) -> None:
        from microtrain.sparse.scheme import resolve_scheme

        (self.work / "s.json").write_text(json.dumps(mutate_json(self.scheme, ops)))
        check_one(lambda: resolve_scheme(str(self.work / "s.json"), self.model), tally, f"scheme {ops}")

    def state_file(self, ops: list, tally: Tally, seed: bytes, program: dict) -> None:
        from microtrain.codegen.statefile import read_state_file

        (self.work / "state.bin").write_bytes(mutate_bytes(seed, ops))
        check_one(lambda: read_state_file(self.work / "state.bin", program), tally, f"state {ops}")


# ---- the C program's readers under ASan + UBSan --------------------------------------------------------------------
def build_c_fuzzer(project: Path, driver: Path) -> Path:
    """The generated host project's harness with `driver` (tests/c/fuzz_harness.c) as main, under ASan + UBSan."""
    import subprocess

    flags = ["-std=c99", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    srcs = ["model.c"] + sorted(p.name for p in project.glob("mt_*.c") if p.name != "mt_io_host.c")
    subprocess.run(["gcc", *flags, "-Dmain=mt_host_main", "-c", "mt_io_host.c", "-o", "fuzz_io.o"], cwd=project,
                   check=True, capture_output=True)
    exe = project / "fuzz_harness"
    subprocess.run(["gcc", *flags, "-I.", "-o", exe.name, *srcs, "fuzz_io.o", str(driver), "-lm", "-lpthread"],
                   cwd=project, check=True, capture_output=True)
    return exe


def fuzz_c(exe: Path, kind: str, seed_file: bytes, mutations: list[list[tuple[str, int, int]]], work: Path
           ) -> Tally:
    """Mutated record (kind "r") or state (kind "s") files through the harness under the sanitizers: a child that
    does not exit 0 or 1 (a signal, a sanitizer's exit status, the 10 s alarm) or prints a sanitizer report is a
    finding."""
    import os
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ops in enumerate(mutations):
        p = work / f"{kind}{i}.bin"
        p.write_bytes(mutate_bytes(seed_file, ops))
        lines.append(f"{kind} {p}")
    (work / "manifest.txt").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98:print_stacktrace=1"}
    r = subprocess.run([str(exe), str(work / "manifest.txt")], cwd=exe.parent, capture_output=True, text=True,
                       env=env, timeout=max(60, 5 * len(mutations)))
    tally = Tally()
    for line in r.stdout.splitlines():
        word = line.split(" ", 1)[0]
        if word == "ok":
            tally.loaded += 1
        elif word == "refused":
            tally.refused += 1
        elif word == "FINDING":
            tally.findings.append(line)
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer"):
        if marker in r.stderr:
            tally.findings.append(f"sanitizer report: {r.stderr[r.stderr.index(marker):][:500]}")
    if tally.total < len(mutations):
        tally.findings.append(f"driver stopped after {tally.total} of {len(mutations)} inputs: {r.stderr[-500:]}")
    return tally


@dataclass
class CProject:
    exe: Path
    dir: Path
    records: bytes  # a valid record file (3 images)
    state: bytes  # a valid two-slot state file
    program: dict[str, Any]


def make_c_project(work: Path, driver: Path) -> CProject:
    """The tiny model's C program (tests/tiny.py's structure at 16x16, last:3) with the fuzz driver, and valid
    record and state files to mutate."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.codegen.project import build, emit_project, load_program, write_records
    from microtrain.codegen.statefile import state_to_file_bytes
    from microtrain.compiler.memory import plan_training_graph
    from microtrain.sparse.scheme import resolve_scheme

    model = tiny_graph()
    num_classes = int(model.tensors[model.outputs[0]].shape[0])
    tg = build_training_graph(model, resolve_scheme("last:3", model), num_classes)
    sched, best = plan_training_graph(tg, patch=None)
    emit_project(sched, best.plan, work)
    build(work)
    exe = build_c_fuzzer(work, driver)
    rng = np.random.default_rng(0)
    write_records(work / "seed_records.bin", rng.integers(-128, 128, (3, 3, 16, 16)).astype(np.int8),
                  [0, 1, num_classes - 1], 0.02)
    prog = load_program(work)
    state = {t["name"]: np.zeros(t["shape"], t["dtype"]) for t in prog["state"]}
    return CProject(exe, work, (work / "seed_records.bin").read_bytes(), state_to_file_bytes(state, prog), prog)


def tiny_graph(seed: int = 4) -> Graph:
    """A small random int8 model in the zoo's structure (stem, three inverted-residual blocks, pool, int8 head):
    mcunet-5fps's first ops at 16x16 with 5 classes, so every loader's seed is small and fast."""
    from microtrain.ir.graph import Op, Tensor
    from microtrain.ir.ops import OPS

    rng = np.random.default_rng(seed)
    g = Graph("fuzz")
    g.add_tensor(Tensor("input", (3, 16, 16), "int8", "input", 1 / 127.5, 0))
    g.inputs.append("input")
    index = 0

    def conv(name: str, x: str, cout: int, k: int, stride: int, groups: int) -> str:
        nonlocal index
        cin = g.tensors[x].shape[0] // groups
        w = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
        s = (rng.uniform(0.5, 1.5, cout) / (127 * np.sqrt(cin * k * k)) * 4).astype(np.float32)
        g.add_tensor(Tensor(f"{name}.w", w.shape, "int8", "weight", s, 0, w))
        g.add_tensor(Tensor(f"{name}.b", (cout,), "int32", "bias", data=rng.integers(-200, 200, cout).astype(np.int32)))
        op = Op(name, "conv2d", [x, f"{name}.w", f"{name}.b"], [f"{name}.y"],
                {"stride": stride, "padding": k // 2, "groups": groups, "conv_index": index})
        index += 1
        (shape,) = OPS["conv2d"].shape(g, op)
        g.add_tensor(Tensor(f"{name}.y", shape, "int8", "act", 6 / 255, -128))
        g.add_op(op)
        return f"{name}.y"

    x = conv("stem", "input", 8, 3, 2, 1)
    for i, (expand, cout, k, stride) in enumerate(((2, 8, 3, 1), (2, 12, 5, 2), (3, 12, 3, 1)), start=1):
        cin = g.tensors[x].shape[0]
        h = conv(f"b{i}.pw1", x, cin * expand, 1, 1, 1)
        h = conv(f"b{i}.dw", h, cin * expand, k, stride, cin * expand)
        h = conv(f"b{i}.pw2", h, cout, 1, 1, 1)
        if stride == 1 and cout == cin:
            g.add_tensor(Tensor(f"b{i}.add.y", g.tensors[h].shape, "int8", "act", 0.05, 0))
            g.add_op(Op(f"b{i}.add", "add", [h, x], [f"b{i}.add.y"]))
            h = f"b{i}.add.y"
        x = h
    t = g.tensors[x]
    g.add_tensor(Tensor("pool.y", (t.shape[0],), "int8", "act", t.scale, t.zero))
    g.add_op(Op("pool", "avgpool", [x], ["pool.y"]))
    w = rng.integers(-127, 128, (5, t.shape[0])).astype(np.int8)
    g.add_tensor(Tensor("head.w", w.shape, "int8", "weight", np.full(5, 0.01, np.float32), 0, w))
    g.add_tensor(Tensor("head.b", (5,), "int32", "bias", data=np.zeros(5, np.int32)))
    g.add_tensor(Tensor("head.y", (5,), "int8", "act", 0.1, 0))
    g.add_op(Op("head", "linear", ["pool.y", "head.w", "head.b"], ["head.y"]))
    g.outputs.append("head.y")
    return g


LOADERS = ("json", "npz", "pkl", "scheme", "state", "c-records", "c-state")


def run_loader(name: str, n: int, loaders: Loaders, c: CProject | None, work: Path, seed: int = 0) -> Tally:
    """`n` seeded random mutations through one loader."""
    rng = np.random.default_rng([seed, LOADERS.index(name)])
    tally = Tally()
    if name in ("c-records", "c-state"):
        assert c is not None
        base = c.records if name == "c-records" else c.state
        for start in range(0, n, 1000):
            part = fuzz_c(c.exe, name[2], base, [random_ops(rng, BYTE_OPS, len(base))
                                                 for _ in range(min(1000, n - start))], work / f"{name}-{start}")
            tally.loaded += part.loaded
            tally.refused += part.refused
            tally.findings += part.findings
        return tally
    for _ in range(n):
        if name == "json":
            loaders.model_json(random_ops(rng, JSON_OPS), tally)
        elif name == "scheme":
            loaders.scheme_file(random_ops(rng, JSON_OPS), tally)
        elif name == "npz":
            loaders.model_npz(random_ops(rng, BYTE_OPS, len(loaders.npz)), tally)
        elif name == "pkl":
            loaders.model_pkl(random_ops(rng, BYTE_OPS, len(loaders.pkl)), tally)
        elif name == "state":
            assert c is not None
            loaders.state_file(random_ops(rng, BYTE_OPS, len(c.state)), tally, c.state, c.program)
    return tally
