"""compt.engine.runlog: what a run prints, on a terminal (a bar named after its member) and in a log file."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import sys
import termios

import pytest
import torch

from compt.engine import runlog
from compt.engine.runlog import read_metrics
from compt.engine.train import TrainConfig, train_member
from compt.paradigms.clip.data import DataConfig

torch.set_num_threads(1)


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(member="debug-S", data=DataConfig(kind="synthetic", num_samples=64), out_dir=str(tmp_path),
                steps=6, global_batch_size=16, warmup_steps=1, save_every_steps=0, device="cpu")  # fmt: skip
    return TrainConfig(**(base | kw))


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "compt.train"]


def test_log_lines_every_n_steps_name_member_step_epoch_loss_speed_eta(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="compt.train"):
        train_member(_cfg(tmp_path, log_every_steps=3))
    lines = [line for line in _lines(caplog) if " step " in line and "eta" in line]
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")}
    # 6 steps take far less than HEARTBEAT_S: only the log steps print (4 steps per epoch).
    assert [line.split(" eta ")[0].split(" lr ")[0] for line in lines] == [
        f"debug-S step 3/6 epoch 0.75/1.50 loss {losses[3]:.4f}",
        f"debug-S step 6/6 epoch 1.50/1.50 loss {losses[6]:.4f}",
    ]
    assert all(re.search(r" [\d.]+ samples/s eta \d+:\d\d:\d\d$", line) for line in lines)
    assert "debug-S: training 6 steps (1.5 epochs of 4), global batch 16" in _lines(caplog)[0]


def test_heartbeat_lines_between_log_steps_repeat_the_newest_loss(tmp_path, caplog, monkeypatch):
    """A step slower than HEARTBEAT_S: a line after every step (issue 12), with no extra host sync."""
    monkeypatch.setattr(runlog, "HEARTBEAT_S", 0.0)
    with caplog.at_level(logging.INFO, logger="compt.train"):
        train_member(_cfg(tmp_path, log_every_steps=3))
    loss_3 = read_metrics(tmp_path / "metrics.jsonl", "train")[0]["loss"]
    beats = [line for line in _lines(caplog) if "samples/s eta" in line and " lr " not in line]
    assert [line.split(",")[0] for line in beats] == [
        "debug-S step 1/6 epoch 0.25/1.50 no loss logged yet",
        "debug-S step 2/6 epoch 0.50/1.50 no loss logged yet",
        "debug-S step 3/6 epoch 0.75/1.50 no loss logged yet",
        f"debug-S step 4/6 epoch 1.00/1.50 loss {loss_3:.4f} at step 3",
        f"debug-S step 5/6 epoch 1.25/1.50 loss {loss_3:.4f} at step 3",
        f"debug-S step 6/6 epoch 1.50/1.50 loss {loss_3:.4f} at step 3",
    ]


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="needs a pseudo-terminal")
def test_the_progress_bar_on_a_terminal_names_its_member(tmp_path, monkeypatch, caplog):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    terminal = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger="compt.train"):
        train_member(_cfg(tmp_path, member="debug-L", steps=2, log_every_steps=1))
    terminal.flush()
    readable, _, _ = select.select([master], [], [], 5.0)
    shown = os.read(master, 1 << 16).decode(errors="replace") if readable else ""
    os.close(master)
    terminal.close()
    assert re.search(r"debug-L:\s+\d+%\|.*\| \d/2 ", shown), shown
    assert not [line for line in _lines(caplog) if "samples/s eta" in line]  # the bar replaces the lines
