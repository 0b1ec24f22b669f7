"""The ``compt`` command line: one module per subcommand, each with ``register(subparsers)``.

A subcommand module defines ``register(sub)`` that adds its parser and sets ``func`` (called with
the parsed namespace, returning an exit code). Adding a command is one new module and one line in
``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
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
    """Run one ``compt`` command; returns its exit status (2: a user error, printed as one line)."""
    try:
        return _run(argv)
    except BrokenPipeError:
        # `compt chain show SPEC | head`: the reader is gone, which is no error (issue 11 item 10).
        # Python flushes stdout again at exit and would report the same pipe: point it at devnull.
        with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE returns (141)
    except KeyboardInterrupt:
        # Ctrl-C in a short command (plan, grow, eval, ...): a line, not a traceback (issue 11 item 10).
        # Training saves first and says how to resume (compt.engine.interrupt, compt.cli.train).
        print("\ncompt: interrupted by Ctrl-C", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
        return status
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as e:
        # User errors: one clear line, no traceback (set COMPT_DEBUG=1 for the traceback).
        if os.environ.get("COMPT_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"compt {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
