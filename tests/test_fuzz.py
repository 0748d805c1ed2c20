"""Issue 12: property-based fuzzing (hypothesis) of every loader of untrusted files. Each mutated model JSON / NPZ /
PKL, scheme, state or record file either loads or fails with one line; never a traceback, a hang, a crash or code
execution. The C program's record and state readers run under AddressSanitizer + UBSan (microtrain/fuzz.py,
tests/c/fuzz_harness.c). `MICROTRAIN_SLOW=1` adds the acceptance run: 10,000 mutated inputs per loader
(also `python benchmarks/fuzz.py`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microtrain.codegen.project import toolchain
from microtrain.fuzz import (
    BYTE_OPS,
    JSON_OPS,
    LOADERS,
    Loaders,
    Tally,
    fuzz_c,
    make_c_project,
    random_ops,
    run_loader,
    tiny_graph,
)

REPO = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.skipif(not os.environ.get("MICROTRAIN_SLOW"), reason="set MICROTRAIN_SLOW=1 for 10,000 per loader")
needs_gcc = pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain not installed")


def ops_of(kinds: tuple[str, ...]):
    return st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 1 << 20), st.integers(0, (1 << 32) - 1)),
                    min_size=1, max_size=4)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


@pytest.fixture(scope="module")
def loaders(tmp_path_factory):
    return Loaders(tiny_graph(), tmp_path_factory.mktemp("fuzz"))


def no_findings(t: Tally) -> None:
    assert not t.findings, t.findings[:3]


@FUZZ
@given(ops=ops_of(JSON_OPS))
def test_model_json(loaders, ops):
    t = Tally()
    loaders.model_json(ops, t)
    no_findings(t)


@FUZZ
@given(ops=ops_of(BYTE_OPS))
def test_model_npz(loaders, ops):
    t = Tally()
    loaders.model_npz(ops, t)
    no_findings(t)


@FUZZ
@given(ops=ops_of(BYTE_OPS))
def test_model_pkl(loaders, ops):
    t = Tally()
    loaders.model_pkl(ops, t)
    no_findings(t)


@FUZZ
@given(ops=ops_of(JSON_OPS))
def test_scheme_file(loaders, ops):
    t = Tally()
    loaders.scheme_file(ops, t)
    no_findings(t)


@pytest.fixture(scope="module")
def c_project(tmp_path_factory):
    """The small model's C program with the fuzz driver, a valid record file and a valid two-slot state file."""
    if toolchain("host") is not None:
        pytest.skip("host C toolchain not installed")
    return make_c_project(tmp_path_factory.mktemp("cfuzz"), REPO / "tests" / "c" / "fuzz_harness.c")


@FUZZ
@given(ops=ops_of(BYTE_OPS))
def test_state_file_host_reader(loaders, c_project, ops):
    t = Tally()
    loaders.state_file(ops, t, c_project.state, c_project.program)
    no_findings(t)


@needs_gcc
@pytest.mark.parametrize("kind", ["r", "s"], ids=["records", "state"])
def test_c_readers_under_sanitizers(c_project, kind, tmp_path):
    """300 mutated record / state files through the harness built with ASan + UBSan: no sanitizer report, no
    signal, no hang; the unmutated seed is accepted (so the fuzzer really reaches the training step)."""
    rng = np.random.default_rng(1 if kind == "r" else 2)
    seed = c_project.records if kind == "r" else c_project.state
    mutations = [[("set", 0, seed[0])]] + [random_ops(rng, BYTE_OPS, len(seed)) for _ in range(300)]
    t = fuzz_c(c_project.exe, kind, seed, mutations, tmp_path)
    no_findings(t)
    assert t.total == 301 and t.loaded >= 1 and t.refused >= 100


@SLOW
@pytest.mark.parametrize("loader", LOADERS)
def test_ten_thousand_per_loader(loaders, c_project, loader, tmp_path):
    t = run_loader(loader, 10_000, loaders, c_project, tmp_path, seed=12)
    no_findings(t)
    assert t.total == 10_000
