"""The ``compt`` command line: one module per subcommand, each with ``register(subparsers)``.

A subcommand module defines ``register(sub)`` that adds its parser and sets ``func`` (called with
the parsed namespace, returning an exit code). Adding a command is one new module and one line in
``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from compt.engine.checkpoint import CheckpointError

# Order is the order shown by `compt --help`.
_COMMANDS = ["plan", "grow", "train", "chain", "eval", "finetune", "report", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compt",
        description="Chain-of-Models Pre-Training (CoM-PT) for CLIP model families.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"compt.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as e:
        # User errors: one clear line, no traceback (set COMPT_DEBUG=1 for the traceback).
        import os

        if os.environ.get("COMPT_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"compt {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
