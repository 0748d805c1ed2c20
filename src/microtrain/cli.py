"""The `microtrain` command line. Each subcommand lives in `microtrain/commands/<name>.py`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from microtrain.errors import MicrotrainError

COMMANDS = ["models", "predict", "train", "eval", "export", "import", "plan", "compile", "contrib", "search",
            "federate", "demo"]
MODULES = {"import": "import_model"}  # a command whose module name is not its own (`import` is a Python keyword)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="microtrain",
        description="Fine-tune int8 networks on microcontrollers: import a model, train it with a sparse update "
                    "scheme, plan its memory, and generate C that trains on the chip.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also MICROTRAIN_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"microtrain.commands.{MODULES.get(name, name)}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure a user can cause is one line on stderr, `microtrain: error: <what>: <why>`,
    and exit status 2; `--debug` (or MICROTRAIN_DEBUG=1) shows the traceback instead. Output piped into a reader
    that stops early (`| head`) ends quietly."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MICROTRAIN_DEBUG", "") not in ("", "0")
    try:
        rc = int(args.run(args) or 0)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print("microtrain: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"microtrain: error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    """The error as one line: our own errors as they are, OS errors as `<file>: <reason>`, anything else named by
    its type (with the hint to get the traceback)."""
    if isinstance(e, MicrotrainError):
        text = str(e)
    elif isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else "system"
        text = f"{where}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 else "")
    elif isinstance(e, MemoryError):
        text = "out of memory (a smaller --subset, --batch-size or model?)"
    else:
        text = f"internal error: {type(e).__name__}: {e} (--debug or MICROTRAIN_DEBUG=1 shows the traceback)"
    return " ".join(text.split())[:2000] or type(e).__name__


def _quiet_stdout() -> None:
    """The reader of our stdout went away: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass

if __name__ == "__main__":
    sys.exit(main())
