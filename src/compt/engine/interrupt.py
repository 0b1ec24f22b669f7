"""Stopping cleanly: SIGTERM (a scheduler's pre-emption) and SIGINT (Ctrl-C) save, then exit.

Either signal only sets a flag; the training loop writes ``step_<N>.pt`` at the next step boundary
and raises :class:`TrainingInterrupted`, whose exit status is 128 + the signal: 143 for SIGTERM
(what schedulers expect), 130 for Ctrl-C (what shells expect). Before issue 11 a Ctrl-C was a
KeyboardInterrupt traceback that saved nothing. A second Ctrl-C stops at once (a
``KeyboardInterrupt``), losing only the steps since the newest checkpoint. Several ranks agree on
the stop at the next log or save step (a collective); a lone process checks every step.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from compt.engine import dist

__all__ = ["TrainingInterrupted", "signal_name", "stop_on_signals", "stop_agreed"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CTRL_C_NOTE = (
    b"\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
    b"(press Ctrl-C again to stop at once, losing the steps since the last checkpoint)\n"
)


class TrainingInterrupted(SystemExit):
    """SIGTERM or SIGINT arrived: a checkpoint was written at the step boundary; rerun the same command."""

    def __init__(self, message: str, checkpoint: Path | None, signum: int = signal.SIGTERM):
        super().__init__(128 + int(signum))  # 143 for SIGTERM, 130 for SIGINT
        self.message, self.checkpoint, self.signum = message, checkpoint, int(signum)

    def __str__(self) -> str:
        return self.message


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


@contextmanager
def stop_on_signals(run: Any, final: Path, name: str) -> Iterator[None]:
    """Record SIGTERM/SIGINT in ``run.stop_signal`` while the block trains (main thread only).

    A signal that arrives during the last boundary (final evaluation and save) finishes the run
    ``name`` (``final``), then stops here: a caller such as the chain would otherwise train the next one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if signum == signal.SIGINT:  # the next Ctrl-C is Python's own: stop at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if not run.stop_signal and run.info.is_main:  # os.write: no logging lock in a handler
                os.write(2, _CTRL_C_NOTE)
        run.stop_signal = run.stop_signal or signum

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if run.stop_signal:
        raise TrainingInterrupted(
            f"stopped by {signal_name(run.stop_signal)} after {name} finished ({final}); "
            "rerun the same command",
            final,
            run.stop_signal,
        )


def stop_agreed(run: Any, sync_point: bool) -> int:
    """The stop signal every rank agrees on (0: none): at log/save steps, or every step for one process."""
    if run.info.world_size == 1:
        return run.stop_signal
    if not sync_point:
        return 0
    flag = torch.tensor(float(run.stop_signal), device=run.info.device)
    return int(dist.all_reduce_max(flag).item())
