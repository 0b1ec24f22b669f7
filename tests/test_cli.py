"""compt.cli's entry point: what every command shares (the exit status of a closed pipe)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from compt.cli import main as cli_main

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def test_a_reader_that_leaves_early_is_no_traceback(monkeypatch, capsys):
    # `compt chain show SPEC | head -1`: a real pipe whose read end is closed (was a BrokenPipeError).
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    pipe = os.fdopen(write_fd, "w")
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        assert cli_main(["chain", "show", str(DEMO)]) == 141  # 128 + SIGPIPE, as a killed tool
    finally:
        monkeypatch.undo()
        pipe.close()  # its buffer was redirected to devnull: closing does not raise again
    assert "Traceback" not in capsys.readouterr().err
