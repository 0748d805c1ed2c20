"""The `microtrain` command line. Each subcommand lives in `microtrain/commands/<name>.py`."""

from __future__ import annotations

import argparse
import importlib
import sys

from microtrain.errors import MicrotrainError

COMMANDS = ["models", "predict", "train", "eval", "plan", "compile", "contrib", "search", "federate", "demo"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="microtrain",
        description="Fine-tune int8 networks on microcontrollers: import a model, train it with a sparse update "
                    "scheme, plan its memory, and generate C that trains on the chip.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"microtrain.commands.{name}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except MicrotrainError as e:
        print(f"microtrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("microtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
