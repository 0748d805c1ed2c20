"""Hostile model files end in one clear line, a non-zero exit, no traceback, and nothing executed."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile

import pytest


class _Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalEvil:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def _zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def _run_predict(model_path, image) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microtrain", "predict", "--model", str(model_path), image],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["os.system zip", "os.system raw", "eval zip", "truncated zip", "random bytes",
                                  "wrong schema", "empty"])
def test_hostile_model_file(kind, tmp_path, sample_images):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pkl"
    if kind == "os.system zip":
        path.write_bytes(_zip(pickle.dumps({"x": _Evil(f"touch {marker}")})))
    elif kind == "os.system raw":
        path.write_bytes(pickle.dumps(_Evil(f"touch {marker}"), protocol=2))
    elif kind == "eval zip":
        path.write_bytes(_zip(pickle.dumps(_EvalEvil(f"open({str(marker)!r}, 'w')"))))
    elif kind == "truncated zip":
        path.write_bytes(_zip(pickle.dumps({"first_conv": {}, "blocks": [], "pad": os.urandom(20000)}))[:5000])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "wrong schema":
        path.write_bytes(_zip(pickle.dumps({"first_conv": 1, "blocks": [], "classifier": None})))
    else:
        path.write_bytes(b"")
    r = _run_predict(path, sample_images["chelsea"])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("microtrain: error: ") and str(path) in lines[0]
    assert not marker.exists()
    assert r.stdout == ""
