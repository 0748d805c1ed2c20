"""Reader for float `torch.export` programs (`.pt2`, written by `torch.export.save`), without running pickled code.

`torch.export.load` (torch 2.13) unpickles with `weights_only=False` in several places: weights and constants saved
as pickles (tensor subclasses), torchbind / opaque objects, the legacy archive format, and the sample inputs when
the restricted unpickler refuses them; an archive may also carry AOTInductor shared libraries. So the archive is
checked first, as a zip, by what it declares: every entry must be the program's JSON, its raw (not pickled) tensor
bytes, their JSON configs, the sample inputs (which must load with `torch.load(weights_only=True)`, the restricted
unpickler), or `extra/` text files; any pickled payload, custom object or code is refused with one line before
torch reads the file. `torch.export.load` then runs with `torch.load` forced to `weights_only=True` as a second
guard. The ATen graph is mapped to a `FloatGraph` (frontends/float_graph.py) without running it.

Input normalization: an `extra/normalization.json` file `{"mean": [...], "std": [...]}` (torch.export.save's
extra_files) is read when present.
"""

from __future__ import annotations

import contextlib
import io
import json
import operator
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.frontends.float_graph import FloatBuilder, FloatGraph
from microtrain.frontends.pkl import ModelLoadError, graph_name

MAX_PT2_BYTES = 256 << 20
MAX_INFLATED = 512 << 20
_META = {"archive_format", "archive_version", "byteorder", "version", ".data/version", ".data/serialization_id"}
_ENTRY = re.compile(r"models/[\w.-]+\.json|data/weights/(weight_\d+|[\w.-]+_weights_config\.json)|"
                    r"data/constants/(tensor_\d+|[\w.-]+_constants_config\.json)|data/sample_inputs/[\w.-]+\.pt|"
                    r"extra/[\w.-]+")


def check_archive(path: Path, buf: bytes) -> dict[str, Any]:
    """Refuse anything in a .pt2 that torch.export.load would unpickle or load as code; return the normalization
    of `extra/normalization.json` ({} when absent)."""
    try:
        z = zipfile.ZipFile(io.BytesIO(buf))
        infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise ModelLoadError(f"{path}: not a torch.export archive ({e})") from None
    if sum(i.file_size for i in infos) > MAX_INFLATED:
        raise ModelLoadError(f"{path}: inflates to more than {MAX_INFLATED >> 20} MB")
    names = [i.filename for i in infos]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or not any(n.split("/", 1)[-1] == "archive_format" for n in names):
        raise ModelLoadError(f"{path}: not a torch.export archive (torch.export.save's pt2 format with one root "
                             "and an archive_format entry)")
    rel = {n: n.split("/", 1)[1] if "/" in n else "" for n in names}
    norm: dict[str, Any] = {}
    for full, r in rel.items():
        if r == "" or full.endswith("/") or r in _META:
            continue
        if not _ENTRY.fullmatch(r):
            raise ModelLoadError(f"{path}: archive entry {r[:80]!r} is not a torch.export program's JSON or raw "
                                 "tensor data (pickled objects and compiled code are refused)")
        if r.endswith("_config.json"):
            try:
                cfg = json.loads(z.read(full))
                entries = cfg["config"].items()
                for fqn, meta in entries:
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise ModelLoadError(f"{path}: {str(fqn)[:60]!r} is stored as a pickled object, which "
                                             "would run code on loading: refused")
            except ModelLoadError:
                raise
            except Exception as e:
                raise ModelLoadError(f"{path}: corrupt payload config {r[:60]!r} ({type(e).__name__})") from None
        elif r.startswith("data/sample_inputs/"):
            import torch

            try:
                torch.load(io.BytesIO(z.read(full)), weights_only=True)
            except Exception as e:
                raise ModelLoadError(f"{path}: sample inputs {r[:60]!r} are not plain tensors (the restricted "
                                     f"unpickler refuses them: {str(e).splitlines()[0][:80]}): refused") from None
        elif r == "extra/normalization.json":
            try:
                norm = json.loads(z.read(full))
                if not isinstance(norm, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"{path}: extra/normalization.json is not a JSON object ({e})") from None
    if not any(r.startswith("models/") for r in rel.values()):
        raise ModelLoadError(f"{path}: the archive holds no exported program (models/*.json)")
    return norm


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """torch.load forced to weights_only=True while torch.export.load runs (the archive check is the first guard)."""
    import torch

    orig = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return orig(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = orig


def _norm(norm: dict[str, Any], key: str, path: Path) -> tuple[float, ...] | None:
    v = norm.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in v):
        raise ModelLoadError(f"{path}: extra/normalization.json: {key} is not a list of numbers")
    return tuple(float(f) for f in v)


def program_to_float(ep: Any, path: Path, norm: dict[str, Any]) -> FloatGraph:
    """An ExportedProgram's ATen graph as a FloatGraph (its parameters, buffers and constants as arrays)."""
    import torch
    from torch.export.graph_signature import InputKind

    aten = torch.ops.aten
    consts: dict[str, np.ndarray] = {}
    user = []
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            user.append(name)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            consts[name] = ep.state_dict[spec.target].detach().to(torch.float64).numpy()
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            c = ep.constants[spec.target]
            if not isinstance(c, torch.Tensor):
                raise ModelLoadError(f"{path}: constant {spec.target[:60]!r} is not a tensor")
            consts[name] = c.detach().to(torch.float64).numpy()
        else:
            raise ModelLoadError(f"{path}: program input {name[:60]!r} of kind {spec.kind.name} is not supported")
    if len(user) != 1:
        raise ModelLoadError(f"{path}: {len(user)} user inputs (one image input is supported)")
    g = ep.graph
    nodes = list(g.nodes)
    outs = [n for n in nodes if n.op == "output"]
    out_args = outs[0].args[0] if outs else ()
    if not isinstance(out_args, (tuple, list)) or len(out_args) != 1:
        raise ModelLoadError(f"{path}: the program has {len(out_args) if isinstance(out_args, (tuple, list)) else 0} "
                             "outputs (one output is supported)")
    uses = {n.name: len(n.users) for n in nodes}
    b = FloatBuilder(path, graph_name(path.stem), "torch.export", uses)
    x_node = next(n for n in nodes if n.op == "placeholder" and n.name == user[0])
    val = x_node.meta.get("val")
    shape = tuple(getattr(val, "shape", ()))
    if len(shape) != 4:
        raise ModelLoadError(f"{path}: the image input has shape {list(shape)}, not N x C x H x W")
    if not all(isinstance(s, int) for s in shape[1:]):
        raise ModelLoadError(f"{path}: the image input has a dynamic size {[str(s) for s in shape]}; export it with "
                             "a fixed C x H x W (only the batch axis may be dynamic)")
    b.set_input(x_node.name, tuple(int(s) for s in shape[1:]))

    def const(a: Any, what: str) -> np.ndarray | None:
        if a is None:
            return None
        if not isinstance(a, torch.fx.Node) or a.name not in consts:
            raise ModelLoadError(f"{path}: {what}: {str(a)[:60]!r} is not a parameter or constant")
        return consts[a.name]

    def act(a: Any, what: str) -> str:
        if not isinstance(a, torch.fx.Node) or a.name in consts:
            raise ModelLoadError(f"{path}: {what}: operand {str(a)[:60]!r} is not an activation")
        return a.name

    def arg(n: Any, i: int, key: str, default: Any) -> Any:
        return n.args[i] if len(n.args) > i else n.kwargs.get(key, default)

    def pair(v: Any) -> tuple[int, int]:
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return (int(v[0]), int(v[-1]))

    for n in nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.op != "call_function":
            raise ModelLoadError(f"{path}: node {n.name[:60]}: unsupported node kind {n.op}")
        t = n.target
        opname = getattr(t, "__name__", str(t))
        what = f"{n.name[:60]} ({opname})"
        if t in (aten.conv2d.default, aten.convolution.default):
            if t == aten.convolution.default:
                if arg(n, 6, "transposed", False):
                    raise ModelLoadError(f"{path}: {what}: unsupported op transposed convolution")
                groups = int(arg(n, 8, "groups", 1))
            else:
                groups = int(arg(n, 6, "groups", 1))
            pad = arg(n, 4, "padding", 0)
            if isinstance(pad, str):
                raise ModelLoadError(f"{path}: {what}: padding {pad!r} (numeric padding is supported)")
            ph, pw = pair(pad)
            b.conv(n.name, act(n.args[0], what), n.name, const(n.args[1], what), const(arg(n, 2, "bias", None), what),
                   pair(arg(n, 3, "stride", 1)), (ph, ph, pw, pw), groups, pair(arg(n, 5, "dilation", 1)))
        elif t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            if t == aten.batch_norm.default:
                if arg(n, 5, "training", False):
                    raise ModelLoadError(f"{path}: {what}: training-mode batch norm is not supported")
                eps = float(arg(n, 7, "eps", 1e-5))
            else:
                eps = float(arg(n, 6, "eps", 1e-5))
            xs = act(n.args[0], what)
            o = b.shapes.get(b.alias.get(xs, xs), (0,))[0]
            gamma = const(n.args[1], what)
            beta = const(n.args[2], what)
            b.batchnorm(n.name, xs, n.name, np.ones(o) if gamma is None else gamma,
                        np.zeros(o) if beta is None else beta, const(n.args[3], what), const(n.args[4], what), eps)
        elif t is operator.getitem:
            src = n.args[0]
            if not (isinstance(src, torch.fx.Node) and src.target == aten._native_batch_norm_legit_no_training.default
                    and n.args[1] == 0):
                raise ModelLoadError(f"{path}: {what}: unsupported op getitem of {str(src)[:40]}")
            b.identity(src.name, n.name)
        elif t in (aten.relu.default, aten.relu_.default):
            b.clamp(n.name, "ReLU", act(n.args[0], what), n.name, 0.0, np.inf)
        elif t in (aten.hardtanh.default, aten.hardtanh_.default):
            b.clamp(n.name, "Hardtanh", act(n.args[0], what), n.name, float(arg(n, 1, "min_val", -1.0)),
                    float(arg(n, 2, "max_val", 1.0)))
        elif t in (aten.clamp.default, aten.clamp_min.default):
            lo = arg(n, 1, "min", None)
            hi = arg(n, 2, "max", None) if t == aten.clamp.default else None
            b.clamp(n.name, "clamp", act(n.args[0], what), n.name, -np.inf if lo is None else float(lo),
                    np.inf if hi is None else float(hi))
        elif t in (aten.add.Tensor, aten.add_.Tensor):
            if arg(n, 2, "alpha", 1) != 1:
                raise ModelLoadError(f"{path}: {what}: add with alpha != 1 is not supported")
            b.add(n.name, act(n.args[0], what), act(n.args[1], what), n.name)
        elif t == aten.mean.dim:
            dims = sorted(int(d) % 4 for d in (n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]))
            if dims != [2, 3]:
                raise ModelLoadError(f"{path}: {what}: mean over dims {dims} (only H, W [2, 3] is supported)")
            b.gap(n.name, act(n.args[0], what), n.name)
        elif t in (aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default):
            if pair(n.args[1]) != (1, 1):
                raise ModelLoadError(f"{path}: {what}: adaptive pooling to {list(n.args[1])} (only 1x1 is supported)")
            b.gap(n.name, act(n.args[0], what), n.name)
        elif t in (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                   aten.squeeze.dims, aten.squeeze.dim):
            b.flatten(n.name, opname, act(n.args[0], what), n.name)
        elif t in (aten.clone.default, aten.contiguous.default, aten.dropout.default, aten.alias.default):
            b.identity(act(n.args[0], what), n.name)
        elif t == aten.linear.default:
            b.linear(n.name, act(n.args[0], what), n.name, const(n.args[1], what), const(arg(n, 2, "bias", None),
                                                                                          what))
        elif t in (aten.max_pool2d.default, aten.avg_pool2d.default):
            kind = "MaxPool" if t == aten.max_pool2d.default else "AveragePool"
            k = pair(n.args[1])
            s = pair(arg(n, 2, "stride", None) or k)
            ph, pw = pair(arg(n, 3, "padding", 0))
            if kind == "MaxPool":
                if pair(arg(n, 4, "dilation", 1)) != (1, 1):
                    raise ModelLoadError(f"{path}: {what}: dilation is not supported")
                ceil, cip = bool(arg(n, 5, "ceil_mode", False)), False
            else:
                ceil, cip = bool(arg(n, 4, "ceil_mode", False)), bool(arg(n, 5, "count_include_pad", True))
                if arg(n, 6, "divisor_override", None) is not None:
                    raise ModelLoadError(f"{path}: {what}: divisor_override is not supported")
            b.pool(n.name, kind, act(n.args[0], what), n.name, k, s, (ph, ph, pw, pw), cip, ceil)
        else:
            raise ModelLoadError(f"{path}: {what}: unsupported op {opname}")
    out = out_args[0]
    return b.finish(out.name if isinstance(out, torch.fx.Node) else str(out), _norm(norm, "mean", path),
                    _norm(norm, "std", path))


def load_pt2(path: str | Path) -> FloatGraph:
    """A float `.pt2` (torch.export.save) as a FloatGraph; one-line ModelLoadError on a corrupt, unsafe or
    unsupported file."""
    import torch

    path = Path(path)
    try:
        if path.stat().st_size > MAX_PT2_BYTES:
            raise ModelLoadError(f"{path}: larger than {MAX_PT2_BYTES >> 20} MB")
        buf = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    norm = check_archive(path, buf)
    try:
        with _weights_only():
            ep = torch.export.load(io.BytesIO(buf))
    except Exception as e:
        raise ModelLoadError(f"{path}: corrupt torch.export program ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:80] if str(e) else ''})") from None
    try:
        return program_to_float(ep, path, norm)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: malformed torch.export program ({type(e).__name__}: {str(e)[:80]})") from None
