"""The log of a training run: ``metrics.jsonl``, TensorBoard when installed, a progress bar, NaN guard.

``metrics.jsonl`` is the run's structured record, one JSON object per line, each with a ``kind``:

- ``start``: the run's settings (member, teacher, world size, precision, steps, MACs per step, config);
- ``train``: every ``log_every_steps`` steps: ``loss`` (= ``loss_task`` + ``loss_ifd``), ``loss_task``
  (Eq. 2-3), for a link ``loss_ifd`` (alpha-weighted, Eq. 1), ``mse_image``/``mse_text`` (unweighted;
  an LM: ``mse_hidden`` or ``kl_logits``),
  ``alpha`` and ``ifd_ratio`` (= loss_ifd / loss_task, App. D.2's r); ``lr``, ``logit_scale``,
  ``samples_seen``, ``train_macs`` (cumulative, App. C.2), ``wall_s``, ``samples_per_s``,
  ``data_skips`` / ``data_repairs`` (what rank 0's loader dropped / kept after a repair so far this
  epoch: bad samples; refilled batches and non-UTF-8 captions, ``compt.engine.loader``); on CUDA
  ``cuda_max_allocated_gib`` / ``cuda_max_reserved_gib`` (this rank's peak memory since its start);
- ``eval``: the metrics returned by the ``evaluate`` callback;
- ``final`` / ``error``: the end of the run.

Losses of a step are those of the batch consumed by that step (before its update). On resume the
lines past the checkpoint's step are dropped, so a resumed run's file reads like an uninterrupted one.
``report`` and the tests read this file; nothing scrapes the console.

The trainer's step-boundary work that produces these records lives here too: :func:`log_step`
(averages per-rank losses, the only host sync of a log step), :func:`evaluate_now` (the ``evaluate``
callback on rank 0, its time kept out of the training wall time) and :func:`check_finite` (the NaN
guard: a run whose loss went NaN/inf stops before writing any checkpoint after it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from compt.engine import dist
from compt.engine.checkpoint import latest_checkpoint

__all__ = [
    "RunLog",
    "HEARTBEAT_S",
    "setup_logging",
    "read_metrics",
    "NonFiniteLossError",
    "EvaluationError",
    "log_step",
    "evaluate_now",
    "check_finite",
]

_LOG = logging.getLogger("compt.train")


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (only those of ``kind`` if given)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    records.append(rec)
    return records


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write null so that strict readers still parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


HEARTBEAT_S = 30.0  # on a non-terminal, a progress line at least this often (issue 12: SLURM logs)


class RunLog:
    """Writes the run's records on rank 0 (a no-op elsewhere) and drives the progress display.

    On a terminal a tqdm bar named after the member; otherwise (a SLURM log, ``> log 2>&1``, CI)
    plain ``logging`` lines: one per ``train`` record, and between records one at least every
    :data:`HEARTBEAT_S` seconds with the newest logged loss, so a slow run is never silent.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool,
        member: str,
        total_steps: int,
        steps_per_epoch: int,
        batch_size: int,
        start_step: int,
        start_wall_s: float,
    ):
        self.enabled, self.member, self.total_steps = enabled, member, total_steps
        self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
        self.last_step, self.last_wall_s = start_step, start_wall_s  # the previous train record's step/time
        # The previous printed line: real time (for the heartbeat), step and training time (for speed).
        self._printed = (time.monotonic(), start_step, start_wall_s)
        self._loss_text = ""  # the newest train record's loss, repeated by heartbeat lines
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        _drop_after(path, start_step)
        self._file = open(path, "a", encoding="utf-8")
        try:  # TensorBoard is optional
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False,
                desc=member,
            )  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (and its numbers to TensorBoard)."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def progress(
        self, step: int, total: int, values: dict[str, float], speed: float, eta_s: float, wall_s: float
    ) -> None:
        """Show loss, lr, samples/s and ETA (bar on a terminal, a log line otherwise)."""
        self.last_step, self.last_wall_s = step, wall_s
        if not self.enabled:
            return
        loss = values.get("loss", float("nan"))
        self._loss_text = f"loss {loss:.4f}"
        if "loss_ifd" in values:
            self._loss_text += f" (task {values['loss_task']:.4f} + ifd {values['loss_ifd']:.4f})"
        text = f"{self._loss_text} lr {values.get('lr', 0):.2e} {speed:.1f} samples/s"
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text)
        else:
            self._line(step, text, eta_s, wall_s)

    def heartbeat(self, step: int, wall_s: float) -> None:
        """Called after every step: a line when :data:`HEARTBEAT_S` passed since the last one (no sync)."""
        if not self.enabled or self._bar is not None or time.monotonic() - self._printed[0] < HEARTBEAT_S:
            return
        _, last_step, last_wall_s = self._printed
        window_s = max(wall_s - last_wall_s, 1e-9)
        speed = (step - last_step) * self.batch_size / window_s
        eta_s = (self.total_steps - step) * window_s / max(step - last_step, 1)
        loss = f"{self._loss_text} at step {self.last_step}" if self._loss_text else "no loss logged yet"
        self._line(step, f"{loss}, {speed:.1f} samples/s", eta_s, wall_s)

    def _line(self, step: int, text: str, eta_s: float, wall_s: float) -> None:
        epochs = f"{step / self.steps_per_epoch:.2f}/{self.total_steps / self.steps_per_epoch:.2f}"
        _LOG.info(
            "%s step %d/%d epoch %s %s eta %s", self.member, step, self.total_steps, epochs, text, _hms(eta_s)
        )
        self._printed = (time.monotonic(), step, wall_s)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        self._file = self._tb = self._bar = None


def setup_logging() -> None:
    """Log lines to stderr for a command-line run: INFO on rank 0, warnings only on the others.

    ``compt train`` and ``compt chain run`` call it, so that progress, growth, warmup and resume
    notes reach a batch job's log file (issue 11: a chain's log stayed empty). Leaves a logging
    set up by the caller alone.
    """
    if not logging.getLogger().handlers:
        level = logging.INFO if dist.launch_rank() == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _drop_after(path: Path, step: int) -> None:
    """Remove records past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if rec.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; no checkpoint was written after it, the last good one is intact."""


# --- step-boundary work of the trainer (``run`` is compt.engine.setup.Run) --------------------------


class EvaluationError(RuntimeError):
    """The ``evaluate`` callback raised on rank 0 (what other ranks raise; rank 0 raises the original)."""


def evaluate_now(run: Any, evaluate, should_stop) -> tuple[dict[str, float], bool]:
    """Call ``evaluate`` on rank 0 (eval mode, no grad); its time is kept out of the training wall time.

    When the callback raises, every rank raises (rank 0 the callback's own error), so that the
    trainer can save the training done so far instead of a rank waiting for the others forever.
    """
    run.tick()
    metrics: dict[str, float] = {}
    stop, error = False, None
    model = run.eval_model()  # under FSDP2 a collective: a plain copy of the gathered weights on rank 0
    if run.info.is_main:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = {k: float(v) for k, v in evaluate(model, run.state.step).items()}
            stop = bool(should_stop(metrics)) if should_stop is not None else False
        except Exception as e:
            error = e
        finally:
            model.train(was_training)
    failed = None if error is None else f"{type(error).__name__}: {error}"
    metrics, stop, failed = dist.broadcast_object((metrics, stop, failed))
    now = time.perf_counter()
    run.state.eval_s += now - run.clock
    run.clock = now
    if failed is not None:
        if error is not None:
            raise error
        raise EvaluationError(f"the evaluation on rank 0 failed at step {run.state.step}: {failed}")
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    _LOG.info("%s eval at step %d: %s", run.cfg.member, run.state.step, shown or "no metrics")
    run.log.write(
        {
            "kind": "eval",
            "step": run.state.step,
            "eval_s": run.state.eval_s,
            **metrics,
            **({"should_stop": True} if stop else {}),
        }
    )
    return metrics, stop


def log_step(run: Any, stats: dict[str, torch.Tensor]) -> None:
    """One metrics.jsonl record (a collective: per-rank losses are averaged over ranks); checks for NaN."""
    local = [k for k in stats if k == "loss_ifd" or k.startswith(("mse_", "kl_"))]  # per-rank means
    if not run.paradigm.task_loss_is_global:  # e.g. an LM's cross-entropy: each rank's own batch
        local += [k for k in ("loss_task", "loss_teacher") if k in stats]
    if local and run.info.world_size > 1:
        stats = {
            **stats,
            **dict(zip(local, dist.all_reduce_mean(torch.stack([stats[k] for k in local])), strict=True)),
        }
        stats["loss"] = stats["loss_task"] + stats.get("loss_ifd", 0.0)
    values = {k: float(v) for k, v in stats.items()}  # the one host sync of a log step
    run.tick()
    st = run.state
    window_s = max(st.wall_s - run.log.last_wall_s, 1e-9)
    window_steps = st.step - run.log.last_step
    speed = window_steps * run.cfg.global_batch_size / window_s
    record = {"kind": "train", "step": st.step, "epoch": st.epoch, **values}
    if "loss_ifd" in values and values["loss_task"]:
        record["ifd_ratio"] = values["loss_ifd"] / values["loss_task"]  # App. D.2's r
    record.update(
        samples_seen=st.samples_seen,
        train_macs=st.train_macs,
        wall_s=st.wall_s,
        samples_per_s=speed,
        data_skips=run.data.skips,
        data_repairs=run.data.repairs,
    )
    if run.info.device.type == "cuda":  # allocator counters, read on the host: no sync (issue 17)
        record["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(run.info.device) / 2**30
        record["cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved(run.info.device) / 2**30
    run.log.write(record)
    eta_s = (run.total_steps - st.step) * window_s / max(window_steps, 1)
    run.log.progress(st.step, run.total_steps, values, speed, eta_s, st.wall_s)
    check_finite(run)


def check_finite(run: Any) -> None:
    """Raise :class:`NonFiniteLossError` if any step since the start had a NaN/inf loss (all ranks agree)."""
    bad_step = int(dist.all_reduce_max(run.first_bad_step.float()).item())
    if bad_step < 0:
        return
    good = latest_checkpoint(run.out_dir)
    msg = (
        f"the training loss became NaN/inf at step {bad_step + 1} of {run.cfg.member}; stopped without "
        f"writing any checkpoint after it. Last good checkpoint: {good or 'none (nothing saved yet)'}. "
        "Lower train.lr, set train.grad_clip (e.g. 1.0), use precision=bf16 or fp32 instead of fp16, "
        "or check the data; then rerun to resume from that checkpoint."
    )
    run.log.write({"kind": "error", "step": run.state.step, "message": msg})
    raise NonFiniteLossError(msg)
