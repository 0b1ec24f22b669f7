"""The training engine: one member, trained individually or as a chain link (§3.1-3.2, App. B.1, Table C).

A baseline member is a chain link with ``teacher=None``: one loop, not two. A link grows its student
from the teacher (:func:`compt.grow.grow`, inverse weight initialization) and adds the inverse
feature distillation loss (:mod:`compt.distill`) to the task loss. What a batch, the task loss and
the distilled features are is the member's paradigm's (:mod:`compt.paradigms`; for CLIP the
multi-caption contrastive loss of Eq. 2-3); this module knows no paradigm. With ``train.progressive`` the
member grows while it trains (AutoProg-One: stages of lower depth and resolution, MoGrow, a schedule
search), the loop calling :mod:`compt.engine.progressive_train` before and inside each step.

Launch (docs/train.md)::

    compt train --member tiny-S --data synthetic --epochs 2                      # one process, CPU or 1 GPU
    torchrun --nproc_per_node 8 -m compt train --member ViT-B/16 --data cc3m.csv # 8 GPUs, one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m compt train --member ViT-L/16 --data 'shards/{000000..003000}.tar'     # 2 nodes x 8 GPUs

From Python: ``train_member(TrainConfig(member="tiny-S", data=DataConfig(kind="synthetic")))``.
The run writes ``out_dir/step_<N>.pt`` (resumable), ``out_dir/final.pt`` and ``out_dir/metrics.jsonl``;
rerunning with the same ``out_dir`` resumes exactly where it stopped, and a finished run returns at once.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compt.engine import dist, fsdp
from compt.engine.checkpoint import check_writable, save_checkpoint
from compt.engine.config import TrainConfig, check_runtime
from compt.engine.interrupt import TrainingInterrupted, signal_name, stop_agreed, stop_on_signals
from compt.engine.lock import hold
from compt.engine.optim import moments_by_name
from compt.engine.resume import check_prior_run, gather_states, model_payload, save_run
from compt.engine.runlog import NonFiniteLossError, check_finite, evaluate_now, log_step
from compt.engine.setup import Run, TrainState, build_run

__all__ = [
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "train_member",
    "check_runtime",
    "train_step",
    "advance",
]

_LOG = logging.getLogger("compt.train")


@dataclass(frozen=True)
class TrainResult:
    """What a finished run hands to its caller (e.g. the chain orchestrator)."""

    final_checkpoint: Path  # out_dir/final.pt
    train_macs: int  # cumulative training MACs of the run
    wall_s: float  # training wall time, seconds
    steps: int  # optimizer steps done
    samples_seen: int  # training samples consumed
    metrics: dict[str, float] = field(default_factory=dict)  # the last `evaluate` result ({} if none)
    planned_steps: int = 0  # steps the schedule planned (> steps when `should_stop` ended the run early)


# --- the training step ---------------------------------------------------------------------------


def train_step(run: Run, micro_batches: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """One optimizer step of Eq. 4 over ``accum_steps`` micro-batches; returns detached stats."""
    device, world, n = run.info.device, run.info.world_size, len(micro_batches)
    lr = run.schedule.apply(run.optimizer, run.state.step)  # cosine with warmup, per iteration
    if run.masks is not None and run.masks.at(run.state.step):  # MSG: m = 1, the mask is done
        run.masks.remove()
        run.masks = None
    # The alpha schedule's factor (issue 13): at 0 L_IFD is off and the teacher need not run.
    factor = run.distiller.factor(run.state.step) if run.distiller is not None else 0.0
    # A global task loss (CLIP's gathered contrastive loss) is the same on every rank but its graph
    # reaches only the rank's own features (compt.engine.dist.gather_with_local_grad); DDP *averages*
    # gradients over ranks, so it is scaled by the world size to make that average the true gradient.
    task_scale = world if run.paradigm.task_loss_is_global else 1
    prog, step = run.progressive, run.state.step  # AutoProg-One's stages (None: full size throughout)
    stats: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        batch = tuple(x.to(device, non_blocking=True) for x in batch)
        if prog is not None:  # this stage's input resolution, for the student and a link's teacher alike
            batch = prog.resize(batch, step)
        # DDP all-reduces (FSDP2 reduce-scatters) gradients only on the last micro-batch of the step.
        sync = _no_sync(run) if world > 1 and i < n - 1 else nullcontext()
        with sync, prog.sub_net(run.model, step) if prog is not None else nullcontext():
            with run.autocast():
                out = run.forward(*batch)
                task = run.paradigm.task_loss(out, run.local_batch_size)
                parts = {"loss_task": task}
                if factor > 0:
                    # The frozen teacher sees the same batch, at the same precision.
                    teacher = run.distiller.teacher_features(batch)
                    if run.distiller.gate:  # the teacher's L_task on this batch, for the gate
                        parts["loss_teacher"] = run.distiller.teacher_task_loss(
                            teacher, out, run.local_batch_size
                        )
                    ifd = run.distiller.loss(
                        out["distill"], teacher, task, parts.get("loss_teacher"), factor
                    )  # Eq. 1
                    parts["loss_ifd"] = ifd.pop("loss")
                    stats["alpha"] = ifd.pop("alpha")
                    parts.update(ifd)  # mse_<feature>, distill_on (logged as the fraction of micro-batches)
                elif run.distiller is not None:  # scheduled off: the log keeps its columns
                    parts["loss_ifd"] = stats["alpha"] = torch.zeros((), device=device)
            objective = (task * task_scale + parts.get("loss_ifd", 0.0)) / n  # Eq. 4; L_IFD: a per-rank mean
            if run.scaler is not None:
                run.scaler.scale(objective).backward()
            else:
                objective.backward()
        for key, value in parts.items():
            stats[key] = stats.get(key, 0.0) + value.detach() / n
    if run.sharded:
        fsdp.reduce_replicated_grads(run.forward)  # parameters fully_shard cannot take (CLIP's logit_scale)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    if run.cfg.grad_clip > 0:
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        clip = fsdp.clip_grad_norm if run.sharded else torch.nn.utils.clip_grad_norm_
        stats["grad_norm"] = clip(params, run.cfg.grad_clip).detach()
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skipped when fp16 gradients overflowed
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    stats.update(run.paradigm.after_step(run.model))  # e.g. CLIP's temperature clamp
    if prog is not None:
        prog.after_step(run)  # MoGrow's EMA follows the weights
    stats["loss"] = stats["loss_task"] + stats.get("loss_ifd", 0.0)
    stats["lr"] = torch.tensor(lr)
    # Remember the first step whose loss was not finite, without a host sync (read at log/save time).
    bad = ~torch.isfinite(stats["loss"])
    run.first_bad_step = torch.where(bad & (run.first_bad_step < 0), run.state.step, run.first_bad_step)
    return stats


@contextmanager
def _no_sync(run: Run):
    """No gradient communication for this micro-batch (gradient accumulation), under DDP or FSDP2."""
    if not run.sharded:
        with run.forward.no_sync():
            yield
        return
    run.forward.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        run.forward.set_requires_gradient_sync(True)


def advance(run: Run) -> None:
    """Count the step just taken: data position, samples and training MACs (App. C.2)."""
    st = run.state
    teacher_ran = run.distiller is not None and run.distiller.factor(st.step) > 0
    if run.progressive is not None:  # the step's stage: its depth, resolution and sub-net (AutoProg-One)
        st.train_macs += run.progressive.step_macs(st.step, teacher_ran)
    else:
        st.train_macs += run.macs_per_step - (0 if teacher_ran else run.teacher_macs_per_step)
    st.step += 1
    st.samples_seen += run.cfg.global_batch_size
    st.step_in_epoch += 1
    if st.step_in_epoch >= run.data.steps_per_epoch:
        st.epoch, st.step_in_epoch = st.epoch + 1, 0


# --- the loop ------------------------------------------------------------------------------------


def train_member(
    cfg: TrainConfig,
    *,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    should_stop: Callable[[dict[str, float]], bool] | None = None,
    retrain: bool = False,
    periodic_evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
) -> TrainResult:
    """Train one member (a baseline, or a chain link when ``cfg.teacher`` is set) and return its result.

    ``evaluate(model, step)`` runs on rank 0 with the plain student in eval mode every
    ``cfg.eval_every_steps`` and after the last step; its metrics go to ``metrics.jsonl`` and
    :attr:`TrainResult.metrics`. ``periodic_evaluate`` (default: ``evaluate``) replaces it at the
    evaluations before the last step, e.g. a cheaper set (issue 12). ``should_stop(metrics) -> True``
    ends the run early (then ``evaluate`` gives the final metrics; ``final.pt`` is written as usual).
    Pass the same callbacks on every rank. Rerunning with the same ``out_dir``
    resumes from the newest valid ``step_*.pt``; a run whose ``final.pt`` exists returns at once.
    A folder holding a run of another config is an error naming the change, unless ``retrain``,
    which moves it aside (``<out_dir>.replaced-<N>``) and trains afresh. Another process training
    in the same folder is an error too (:mod:`compt.engine.lock`).

    Raises :class:`NonFiniteLossError` when the loss turns NaN/inf (no checkpoint is written after
    it) and :class:`TrainingInterrupted` (a ``SystemExit``) after saving on SIGTERM or SIGINT.
    """
    check_writable(cfg.out_dir, "train.out_dir")  # now, not at the first checkpoint
    info = dist.init_distributed(cfg.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    run = None
    try:
        with hold(cfg.out_dir):  # one run per folder (issue 11); rank 0 holds it for the job
            done = dist.run_on_main(lambda: _reuse_finished(cfg, retrain))
            if done is not None:
                return done
            run = build_run(cfg, info)
            with stop_on_signals(run, run.out_dir / "final.pt", cfg.member):
                return _loop(run, evaluate, should_stop, periodic_evaluate or evaluate)
    finally:
        if run is not None:
            run.log.close()
        torch.use_deterministic_algorithms(was_deterministic)
        dist.teardown(info)


def _reuse_finished(cfg: TrainConfig, retrain: bool) -> TrainResult | None:
    """The result of a finished run of ``cfg`` in its out_dir, else None (rank 0; see check_prior_run)."""
    payload = check_prior_run(cfg, retrain)
    if payload is None:
        return None
    final = Path(cfg.out_dir) / "final.pt"
    _LOG.info("%s: trained before (%s), with this config; not training again", cfg.member, final)
    return _result(final, payload)


def _loop(run: Run, evaluate, should_stop, periodic_evaluate) -> TrainResult:
    """nanoGPT-style: boundary work (log, eval, save) then one step, until the step after the last."""
    cfg, st = run.cfg, run.state
    has_eval = dist.broadcast_object(evaluate is not None)  # every rank must join the same collectives
    start, stats, metrics = st.step, None, {}
    while True:
        fresh = st.step > start  # the resume point's boundary work was done before the interruption
        last = st.step >= run.total_steps
        at_log = fresh and (st.step % cfg.log_every_steps == 0 or last)
        if at_log:
            log_step(run, stats)
        at_eval = fresh and cfg.eval_every_steps > 0 and st.step % cfg.eval_every_steps == 0
        if has_eval and (last or at_eval):
            try:
                metrics, stop_early = evaluate_now(run, evaluate if last else periodic_evaluate, should_stop)
                if stop_early and not last and periodic_evaluate is not evaluate:
                    metrics, _ = evaluate_now(run, evaluate, None)  # the final metrics: the full evaluation's
            except Exception:
                _save_before_raising(run)
                raise
            if stop_early and not last:
                last = True
                if not at_log:
                    log_step(run, stats)
        if last:
            return _finish(run, metrics)
        at_save = fresh and cfg.save_every_steps > 0 and st.step % cfg.save_every_steps == 0
        stop = stop_agreed(run, sync_point=at_log or at_save)
        if at_save or stop:
            check_finite(run)  # never save weights that a NaN step has touched
            path = save_run(run, run.out_dir / f"step_{st.step}.pt")
        if stop:
            msg = f"stopped by {signal_name(stop)} at step {st.step}; saved {path}; "
            msg += "rerun the same command to resume"
            _LOG.warning(msg)
            raise TrainingInterrupted(msg, path, stop)
        micro_batches = run.data.next()
        if run.progressive is not None:  # AutoProg-One: a growth, or a search's end, before this step
            run.progressive.before_step(run)
        stats = train_step(run, micro_batches)
        advance(run)
        run.log.heartbeat(st.step, st.wall_s + time.perf_counter() - run.clock)


def _save_before_raising(run: Run) -> None:
    """The evaluation failed (e.g. an eval folder went missing): keep the steps trained so far.

    Before final.pt the last checkpoint may be far behind (issue 11: an ImageFolder error after
    the last step lost the whole member); a rerun resumes here and only evaluates again.
    """
    check_finite(run)
    path = save_run(run, run.out_dir / f"step_{run.state.step}.pt")
    _LOG.error(
        "%s: the evaluation at step %d failed; saved %s. Fix the cause and rerun the same command: the "
        "run resumes there and evaluates again", run.cfg.member, run.state.step, path,
    )  # fmt: skip


# --- checkpoints ---------------------------------------------------------------------------------


def _finish(run: Run, metrics: dict[str, float]) -> TrainResult:
    """Write final.pt (the trained student, its cost and config) and return the result."""
    check_finite(run)
    run.tick()
    if run.masks is not None:  # stopped before the MSG ramp ended: fold the masks into the weights
        warnings.warn(
            f"{run.cfg.member} stopped at step {run.state.step}, before its growth masks reached 1; "
            "final.pt holds the masked weights (exact but for the masked LayerNorm statistics)",
            stacklevel=2,
        )
        run.masks.remove(fold=True)
        run.masks = None
    final = run.out_dir / "final.pt"
    st, payload = run.state, model_payload(run, gather_states(run))
    payload |= {"metrics": metrics, "planned_steps": run.total_steps}
    if run.cfg.keep_moments:  # for a link that grows its optimizer state from this member's
        payload["moments"] = moments_by_name(run.optimizer, run.model)
    if run.info.is_main:
        save_checkpoint(final, payload)
        record = {"kind": "final", "step": st.step, "samples_seen": st.samples_seen}
        run.log.write(record | {"train_macs": st.train_macs, "wall_s": st.wall_s, "checkpoint": str(final)})
        _LOG.info(
            "%s: finished %d steps, %.1f s of training -> %s", run.cfg.member, st.step, st.wall_s, final
        )
    dist.barrier()
    return _result(final, payload)


def _result(path: Path, payload: dict[str, Any]) -> TrainResult:
    """The TrainResult of a final.pt payload (also for a run finished earlier)."""
    return TrainResult(
        final_checkpoint=path,
        train_macs=int(payload["train_macs"]),
        wall_s=float(payload["wall_s"]),
        steps=int(payload["steps"]),
        samples_seen=int(payload["samples_seen"]),
        metrics=dict(payload.get("metrics") or {}),
        planned_steps=int(payload.get("planned_steps", payload["steps"])),
    )


# --- the step machinery, for loops built on this engine ------------------------------------------
# The fine-tune (compt.paradigms.clip.finetune.train, issue 16) runs its own stage-aware loop over the
# same step, counters, SIGTERM handling and precision; it passes a run object with the fields these read.
