"""What of a model may reach the generated C, and how: generated identifiers, escaped comments, escaped strings.

Names come from model files (`ir/graph.py` validates them against `NAME_RE` at load), but the emitter does not rely
on that: every C identifier it writes is generated here from a fixed prefix and the name's letters and digits, every
name inside a comment goes through `c_comment`, and every name inside a string literal through `c_string`. A name
like `x */ __attribute__((constructor)) void f(void) { system("..."); } /*` therefore stays text in a comment.
"""

from __future__ import annotations

import re

IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENT_SAFE = re.compile(r"[^A-Za-z0-9 _.,:;@#+\-=()\[\]<>%!&|^~{}']")  # no *, /, \, ?, quotes, control chars


class Names:
    """C identifiers for graph names: `prefix_` + the name's letters and digits (runs of anything else become _),
    unique (a numeric suffix on collision) and stable (the same (prefix, name) always gives the same identifier)."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], str] = {}
        self.taken: set[str] = set()

    def __call__(self, prefix: str, name: str) -> str:
        key = (prefix, name)
        if key not in self.ids:
            if not IDENT_RE.fullmatch(prefix):
                raise ValueError(f"identifier prefix {prefix!r} is not a C identifier")
            base = f"{prefix}_{re.sub(r'[^0-9A-Za-z]+', '_', str(name)).strip('_')}"[:120].rstrip("_")
            ident, i = base, 1
            while ident in self.taken:
                ident, i = f"{base}_{i}", i + 1
            assert IDENT_RE.fullmatch(ident), ident  # a prefix and _ first: never a C keyword
            self.taken.add(ident)
            self.ids[key] = ident
        return self.ids[key]


def c_comment(text: object) -> str:
    """Text that is safe inside a C block comment on one line: no `*/`, `/*`, line splices, trigraphs or newlines
    (every character outside a conservative set becomes `_`)."""
    return _COMMENT_SAFE.sub("_", str(text))[:200]


def c_string(text: object) -> str:
    """A C string literal (with its quotes) whose bytes are the UTF-8 bytes of `text`: printable ASCII stays, `"`,
    `\\` and `?` (trigraphs) are escaped, everything else is a three-digit octal escape."""
    out = []
    for b in str(text).encode("utf-8"):
        c = chr(b)
        if c in '"\\?':
            out.append("\\" + c)
        elif 0x20 <= b < 0x7F:
            out.append(c)
        else:
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'
