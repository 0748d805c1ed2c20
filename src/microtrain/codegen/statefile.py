"""The device's state store as the host sees it: two slots, each a CRC-checked header and a payload (mt_state.h).

A state file (the harness's `-i` / `-o`, `compile --run`'s state.bin) is that store on pages of FILE_PAGE bytes:
slot 0 at offset 0, slot 1 at offset `slot_bytes`. The payload is the u32 step counter, then every state tensor in
the program's save order. `read_slots` takes the newest slot whose header and payload CRC check out, exactly as
`mt_state_load` does; `build_file` writes what `mt_state_save` writes into an empty store.
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.errors import MicrotrainError

STATE_MAGIC = 0x3253544D  # "MTS2"
HEADER = struct.Struct("<8I")  # magic, fingerprint, sequence, payload bytes, payload CRC-32, page bytes, 0, header CRC
FILE_PAGE = 256  # the harness's file store (mt_main.c STATE_FILE_PAGE)
STATE_SOURCES = ("mt_state.h", "mt_state.c")  # copied into every project (codegen/runtime/)


class StateFileError(MicrotrainError):
    """A state file holds no valid state of this program (one line)."""


def header_region(page: int) -> int:
    return -(-HEADER.size // page) * page


def slot_bytes(payload: int, page: int = FILE_PAGE) -> int:
    return header_region(page) + -(-payload // page) * page


def payload_bytes(program: dict[str, Any]) -> int:
    return 4 + sum(int(t["nbytes"]) for t in program["state"])


@dataclass
class Slot:
    index: int
    sequence: int
    payload: bytes


def _header(fingerprint: int, seq: int, payload: bytes, page: int) -> bytes:
    head = struct.pack("<7I", STATE_MAGIC, fingerprint, seq & 0xFFFFFFFF, len(payload), zlib.crc32(payload), page, 0)
    return head + struct.pack("<I", zlib.crc32(head))


def check_slot(raw: bytes, index: int, fingerprint: int, payload: int, page: int = FILE_PAGE) -> Slot | None:
    """Slot `index` of a store image if its header and its payload CRC check out."""
    base = index * slot_bytes(payload, page)
    head = raw[base: base + HEADER.size]
    if len(head) < HEADER.size:
        return None
    magic, fp, seq, n, crc, pg, _, hcrc = HEADER.unpack(head)
    if (magic, fp, n, pg) != (STATE_MAGIC, fingerprint, payload, page) or hcrc != zlib.crc32(head[:28]):
        return None
    start = base + header_region(page)
    body = raw[start: start + payload]
    if len(body) != payload or zlib.crc32(body) != crc:
        return None
    return Slot(index, seq, body)


def newest_slot(raw: bytes, fingerprint: int, payload: int, page: int = FILE_PAGE) -> Slot | None:
    slots = [s for s in (check_slot(raw, i, fingerprint, payload, page) for i in (0, 1)) if s is not None]
    if len(slots) == 2:  # sequence numbers compare modulo 2^32, as in mt_state.c: (int32_t)(s1 - s0) > 0
        d = (slots[1].sequence - slots[0].sequence) & 0xFFFFFFFF
        return slots[1] if 0 < d < 1 << 31 else slots[0]
    return slots[0] if slots else None


def build_file(payload: bytes, fingerprint: int, seq: int = 1, page: int = FILE_PAGE) -> bytes:
    """Slot 0 of an empty store after one save (what the harness writes into a new file)."""
    head = _header(fingerprint, seq, payload, page)
    region = header_region(page)
    body = payload + b"\xff" * (slot_bytes(len(payload), page) - region - len(payload))
    return head + b"\xff" * (region - len(head)) + body


def read_state_file(path: str | Path, program: dict[str, Any]) -> dict[str, np.ndarray]:
    """The newest valid state in a state file as a host state_dict (graph dtypes, `__step__`)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise StateFileError(f"{path}: cannot read ({e.strerror or e})") from None
    return state_from_file_bytes(raw, program, str(path))


def write_state_file(path: str | Path, state: dict[str, np.ndarray], program: dict[str, Any]) -> None:
    """The inverse of `read_state_file`: a new file whose slot 0 holds `state` (sequence 1)."""
    Path(path).write_bytes(state_to_file_bytes(state, program))


def state_from_file_bytes(raw: bytes, program: dict[str, Any], source: str = "state") -> dict[str, np.ndarray]:
    """The newest valid state of a store image (a state file's bytes) as a host state_dict."""
    n = payload_bytes(program)
    slot = newest_slot(raw, int(program["state_fingerprint"]), n)
    if slot is None:
        raise StateFileError(f"{source}: no valid state of this program (wrong program, or both slots corrupt)")
    (step,) = struct.unpack_from("<I", slot.payload)
    out: dict[str, np.ndarray] = {}
    off = 4
    for t in program["state"]:
        count = int(np.prod(t["shape"], dtype=np.int64))
        out[t["name"]] = np.frombuffer(slot.payload, t["dtype"], count, off).reshape(t["shape"]).copy()
        off += int(t["nbytes"])
        if out[t["name"]].dtype.kind == "f" and not np.isfinite(out[t["name"]]).all():
            raise StateFileError(f"{source}: state tensor {t['name']} holds NaN or infinite values")
    out["__step__"] = np.array(step, np.int64)
    return out


def state_to_file_bytes(state: dict[str, np.ndarray], program: dict[str, Any]) -> bytes:
    """A new store image whose slot 0 holds `state` (sequence 1): what the harness's `-o` writes into a new file."""
    parts = [struct.pack("<I", int(np.asarray(state.get("__step__", 0))) & 0xFFFFFFFF)]
    for t in program["state"]:
        if t["name"] not in state:
            raise StateFileError(f"state has no tensor {t['name']!r}")
        a = np.ascontiguousarray(np.asarray(state[t["name"]], t["dtype"]))
        if list(a.shape) != list(t["shape"]):
            raise StateFileError(f"state tensor {t['name']}: shape {list(a.shape)}, the program's is {t['shape']}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise StateFileError(f"state tensor {t['name']} holds NaN or infinite values")
        parts.append(a.tobytes())
    return build_file(b"".join(parts), int(program["state_fingerprint"]))


# ---- the store API from Python (ctypes): an in-memory two-slot store for a loaded program ----------------------------
_READ = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                         ctypes.c_uint32)
_WRITE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                          ctypes.c_uint32)
_ERASE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
_SYNC = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class CStore(ctypes.Structure):
    """mt_store (mt_state.h)."""

    _fields_ = [("ctx", ctypes.c_void_p), ("page_bytes", ctypes.c_uint32), ("slot_bytes", ctypes.c_uint32),
                ("read", _READ), ("write", _WRITE), ("erase", _ERASE), ("sync", _SYNC)]


class MemoryStore:
    """Two slots of FILE_PAGE pages in a bytearray, for `save_state` / `load_state` of a program loaded with ctypes
    (`lib.save_state.argtypes = [ctypes.POINTER(CStore)]`). `image` is what the harness's file would hold."""

    def __init__(self, payload: int, image: bytes = b""):
        self.slot = slot_bytes(payload)
        self.mem = bytearray(2 * self.slot)
        self.mem[:len(image[:2 * self.slot])] = image[:2 * self.slot]
        self.written = 0  # the end of the furthest write: a harness file's length

        def read(ctx: int, slot: int, off: int, data: int, n: int) -> int:
            at = slot * self.slot + off
            if slot > 1 or at + n > len(self.mem):
                return -1
            ctypes.memmove(data, bytes(self.mem[at:at + n]), n)
            return 0

        def write(ctx: int, slot: int, off: int, data: int, n: int) -> int:
            at = slot * self.slot + off
            if slot > 1 or at + n > len(self.mem):
                return -1
            self.mem[at:at + n] = ctypes.string_at(data, n)
            self.written = max(self.written, at + n)
            return 0

        self._callbacks = (_READ(read), _WRITE(write))  # kept alive as long as the store
        self.c = CStore(None, FILE_PAGE, self.slot, self._callbacks[0], self._callbacks[1], _ERASE(), _SYNC())

    def image(self) -> bytes:
        return bytes(self.mem[:max(self.written, self.slot)])
