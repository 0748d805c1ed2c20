"""Output paths checked before the work that produces them: a file the command will write must be writable now, so
a long run (contribution trials, a search, training) never ends in a traceback about its output file."""

from __future__ import annotations

import os
from pathlib import Path

from microtrain.errors import MicrotrainError


def check_output_file(path: str | Path, flag: str) -> Path:
    """`path` can be written as a file: it is not a directory, and its directory exists (or can be created) and is
    writable. Creates the directory; one-line MicrotrainError otherwise."""
    p = Path(path)
    if p.is_dir():
        raise MicrotrainError(f"{flag} {p}: is a directory, not a file")
    parent = p.parent
    if parent.exists() and not parent.is_dir():
        raise MicrotrainError(f"{flag} {p}: {parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MicrotrainError(f"{flag} {p}: cannot create {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise MicrotrainError(f"{flag} {p}: not writable")
    return p


def check_output_dir(path: str | Path, flag: str, what: str = "directory") -> Path:
    """`path` is (or can be created as) a writable directory (`what` names it in the errors)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MicrotrainError(f"{flag} {p}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MicrotrainError(f"{flag} {p}: cannot create the {what} ({e.strerror})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise MicrotrainError(f"{flag} {p}: the {what} is not writable")
    return p
