"""benchmarks/bench_train.py: reading OpenCLIP's trainer log (the speed side of compt vs OpenCLIP)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_train import open_clip_rates, steady  # noqa: E402


def _open_clip_line(avg_s: float, last_s: float, batch: int) -> str:
    # open_clip_train/train.py's log line: the window's mean step time, then batch / the last step's time.
    rate = batch / last_s
    return (
        f"2026-01-01,00:00:00 | INFO | Train Epoch: 0 [ 2560/7680 (33%)] Data (t): 0.010 "
        f"Batch (t): {avg_s:.3f}, {rate:#g}/s, {rate:#g}/s/gpu LR: 0.000100 Logit Scale: 14.286 "
        f"Contrastive_loss: 5.5452 (5.5452) Loss: 5.5452 (5.5452)"
    )


def test_open_clip_speed_is_read_from_the_window_mean_not_the_last_step():
    # On a GPU the last step before a log line is only its kernel launches (0.02 s here), while the
    # window's steps really took 0.1 s each: 256 / 0.1 samples/s, not 256 / 0.02.
    log = "\n".join(_open_clip_line(0.1, 0.02, 256) for _ in range(3))
    assert open_clip_rates(log, 256) == pytest.approx([2560.0] * 3)


def test_steady_rate_drops_the_first_window():
    assert steady([10.0, 100.0, 110.0, 90.0]) == 100.0
    assert steady([10.0, 100.0]) == 55.0  # too few windows to drop one
