"""``compt finetune``: a CLIP member's linear probe, or its full fine-tune on the training engine (issue 16).

    compt finetune runs/demo/chain/bench-M --train sets/shape/train --test sets/shape/test --mode full
    compt finetune runs/demo/chain/bench-M --train ... --test ... --mode full --progressive autoprog-zero

From Python: ``finetune(FinetuneConfig(checkpoint=..., train_dir=..., test_dir=..., mode="full"))``.

``linear-probe`` is :mod:`.probe` (the CLIP paper's App. A.3): seconds, nothing to resume.
``full`` trains the image tower plus the zero-shot-initialized head (:mod:`.head`) with the engine's
machinery, not a copy of it: the optimizer step (:func:`compt.engine.train.train_step`: autocast,
fp16 grad scaler, clipping, the NaN guard), AdamW without decay on norms/biases/embeddings and the
warmup + cosine schedule (:mod:`compt.engine.optim`), the step counters, ``metrics.jsonl`` and
progress lines (:mod:`compt.engine.runlog`), atomic checksummed checkpoints, exact resume (RNG,
optimizer, schedule, data position: :mod:`compt.engine.resume`) and SIGTERM save-and-exit. The loop
here adds what a fine-tune has and pre-training does not: AutoProg-Zero's stages (:mod:`.stages`),
entered at their first step, before that step's checkpoint, so a checkpoint at a stage boundary
already holds the stage's choice. The training data are the training ImageFolder in memory; epoch
e's order is :func:`compt.engine.loader.epoch_order` (seed, e), step b its b-th slice.

A finished run's folder holds ``final.pt`` (the classifier's weights, :func:`load_finetuned`),
``metrics.jsonl`` and ``result.json`` (:mod:`.results`, what ``compt report`` tabulates); rerunning
the same command resumes an interrupted run and returns a finished one at once.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compt.config import to_dict
from compt.engine import dist
from compt.engine.checkpoint import (
    check_writable,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from compt.engine.config import precision_of
from compt.engine.interrupt import TrainingInterrupted, signal_name, stop_agreed, stop_on_signals
from compt.engine.loader import DataError, epoch_order
from compt.engine.optim import CosineSchedule, build_optimizer
from compt.engine.resume import capture_rng, check_same_run, restore_rng, seed_all
from compt.engine.runlog import RunLog, check_finite, evaluate_now, log_step
from compt.engine.setup import TrainState, configure_torch
from compt.engine.train import advance, train_step
from compt.paradigms.clip.data.evalsets import ZeroShotTask
from compt.paradigms.clip.finetune.config import (
    FINETUNE_FREE_FIELDS,
    FINETUNE_SAME_RUN_FIELDS,
    FinetuneConfig,
)
from compt.paradigms.clip.finetune.head import (
    ImageClassifier,
    build_classifier,
    classification_loss,
    load_clip,
    top1,
)
from compt.paradigms.clip.finetune.probe import linear_probe
from compt.paradigms.clip.finetune.proxies import train_macs
from compt.paradigms.clip.finetune.results import FinetuneResult, read_result, write_result
from compt.paradigms.clip.finetune.sets import hold_out, load_splits
from compt.paradigms.clip.finetune.sid import StageEmbedding
from compt.paradigms.clip.finetune.stages import StageDriver
from compt.paradigms.clip.progressive import resize_images

__all__ = ["finetune", "load_finetuned"]

_LOG = logging.getLogger("compt.finetune")


class _ClassifierStep(nn.Module):
    """The engine's student forward for fine-tuning: a batch at the stage's resolution -> cross-entropy."""

    def __init__(self, classifier: ImageClassifier):
        super().__init__()
        self.classifier = classifier
        self.resolution: int | None = classifier.image_size  # AutoProg-Zero lowers it per stage
        self.stage = 0  # the SID id of training batches

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.resolution is not None:
            images = resize_images(images, self.resolution)
        sid = self.classifier.stage_embedding
        ids = None if sid is None else sid.draw_ids(self.stage, len(images), images.device)
        loss, logits = classification_loss(self.classifier, images, labels, ids)
        return {"loss": loss, "logits": logits}


class _ClassificationTask:
    """What the engine's step asks of a paradigm, for a classifier (the step's loss is a per-rank mean)."""

    task_loss_is_global = False

    def task_loss(self, out: dict[str, torch.Tensor], local_batch_size: int) -> torch.Tensor:
        return out["loss"]

    def after_step(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {}


class _Batches:
    """The micro-batches of each step from the run's data position (a function of seed, epoch, step)."""

    def __init__(self, train: ZeroShotTask, cfg: FinetuneConfig, state: TrainState):
        self.train, self.cfg, self.state = train, cfg, state
        self.skips = self.repairs = 0  # in-memory images: nothing to skip or repair (log_step's fields)
        self.steps_per_epoch = len(train.labels) // cfg.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"finetune: {len(train.labels)} training images are fewer than one batch of "
                f"global_batch_size={cfg.global_batch_size}; lower the batch size or add images"
            )
        self._order: tuple[int, torch.Tensor] | None = None

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        st, cfg = self.state, self.cfg
        if self._order is None or self._order[0] != st.epoch:
            self._order = (st.epoch, epoch_order(len(self.train.labels), cfg.seed, st.epoch))
        start = st.step_in_epoch * cfg.global_batch_size
        idx = self._order[1][start : start + cfg.global_batch_size].chunk(cfg.accum_steps)
        return [(self.train.images[i], self.train.labels[i]) for i in idx]


@dataclass
class _Run:
    """One fine-tuning run: the fields the engine's step, counters and log read, plus the stages."""

    cfg: FinetuneConfig
    info: dist.DistInfo
    model: ImageClassifier
    forward: _ClassifierStep
    optimizer: torch.optim.Optimizer
    schedule: CosineSchedule
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    data: _Batches
    total_steps: int
    macs_per_step: int
    stages: StageDriver | None
    source: dict[str, Any]  # the CLIP loaded: member, source, format, image_size
    num_test: int
    model_cfg: dict[str, Any]
    evaluate: Any
    state: TrainState = field(default_factory=TrainState)
    log: RunLog | None = None
    paradigm: _ClassificationTask = field(default_factory=_ClassificationTask)
    distiller: None = None  # no teacher: the engine's step adds no distillation
    masks: None = None  # no growth masks
    progressive: None = None  # no AutoProg-One stages (AutoProg-Zero's are `stages`)
    sharded: bool = False  # a fine-tune is replicated (DDP), never FSDP2-sharded
    teacher_macs_per_step: int = 0
    zero_shot_top1: float | None = None  # the test top-1 of the head before the first step
    stop_signal: int = 0  # SIGTERM/SIGINT received (compt.engine.interrupt); 0: none
    clock: float = field(default_factory=time.perf_counter)
    first_bad_step: torch.Tensor | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def local_batch_size(self) -> int:
        return self.cfg.global_batch_size // self.cfg.accum_steps

    def eval_model(self) -> ImageClassifier:
        """The model the engine's periodic evaluation reads: the replicated classifier itself."""
        return self.model

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def tick(self) -> None:
        now = time.perf_counter()
        self.state.wall_s += now - self.clock
        self.clock = now


# --- entry -----------------------------------------------------------------------------------------


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run (or resume, or return the finished) fine-tune ``cfg``; its result is also ``out_dir/result.json``.

    Raises :class:`compt.engine.runlog.NonFiniteLossError` when the loss turns NaN/inf and
    :class:`compt.engine.train.TrainingInterrupted` (exit status 143) after saving on SIGTERM.
    """
    done = read_result(cfg.out_dir)
    if done is not None:  # finished: the same run returns its result, another run is refused
        check_same_run(to_dict(cfg), done.config or {}, Path(cfg.out_dir) / "result.json",
                       same_run=FINETUNE_SAME_RUN_FIELDS, free=FINETUNE_FREE_FIELDS)  # fmt: skip
        return done
    check_writable(cfg.out_dir, "finetune.out_dir")
    info = dist.init_distributed(cfg.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    run = None
    try:
        if info.world_size > 1:
            raise ValueError(
                "compt finetune runs in one process (CPU or one GPU); launch it without torchrun"
            )
        if cfg.mode == "linear-probe":
            return _probe(cfg, info.device)
        run = _setup(cfg, info)
        with stop_on_signals(run, run.out_dir / "final.pt", str(run.source.get("member"))):
            return _loop(run)
    finally:
        if run is not None and run.log is not None:
            run.log.close()
        torch.use_deterministic_algorithms(was_deterministic)
        dist.teardown(info)


def _load(
    cfg: FinetuneConfig,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any], ZeroShotTask, ZeroShotTask]:
    model, model_cfg, source = load_clip(cfg.checkpoint)
    image_size = int(model_cfg["vision_cfg"].get("image_size", 224))
    train, test = load_splits(cfg.train_dir, cfg.test_dir, image_size)
    return model, model_cfg, {**source, "image_size": image_size}, train, test


def _probe(cfg: FinetuneConfig, device: torch.device) -> FinetuneResult:
    """The linear probe (C chosen on its own validation split of the training set); nothing to resume."""
    model, _, source, train, test = _load(cfg)
    start = time.perf_counter()
    # finetune.seed draws the probe's validation split too: one seed per run, whatever the mode.
    probe_cfg = replace(cfg.probe, seed=cfg.seed)
    probe = linear_probe(model.to(device), source["image_size"], train, test, probe_cfg)
    result = FinetuneResult.of(
        cfg, source, test_top1=probe.test_top1, num_train=probe.num_train, num_test=probe.num_test,
        num_classes=probe.num_classes, wall_s=time.perf_counter() - start, probe=probe.to_dict(),
    )  # fmt: skip
    write_result(cfg.out_dir, result)
    return result


# --- setup -----------------------------------------------------------------------------------------


def _step_macs(classifier: ImageClassifier, train: ZeroShotTask, batch_size: int) -> int:
    """Exact MACs of one full fine-tuning step: ``batch_size`` forward + backward passes, then AdamW."""
    sample = train_macs(
        classifier, train.images[:1], train.labels[:1], lambda m, x, y: classification_loss(m, x, y)[0]
    )
    return batch_size * sample + 3 * sum(p.numel() for p in classifier.parameters() if p.requires_grad)


def _evaluator(test: ZeroShotTask, val: ZeroShotTask | None):
    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        metrics = {"test_top1": top1(model, test.images, test.labels)}
        if val is not None:
            metrics["val_top1"] = top1(model, val.images, val.labels)
        return metrics

    return evaluate


def _setup(cfg: FinetuneConfig, info: dist.DistInfo) -> _Run:
    """Load CLIP and splits; build classifier, optimizer, schedule and stages; restore a checkpoint."""
    device = info.device
    amp_dtype, use_scaler = precision_of(cfg, device)
    configure_torch(cfg, device)
    model, model_cfg, source, train, test = _load(cfg)
    train, val = hold_out(train, cfg.val_fraction, cfg.seed)
    apz = cfg.autoprog_zero if cfg.progressive else None
    seed_all(cfg.seed)  # the SID table's initialization
    num_stages = apz.num_stages if apz is not None and apz.sid else None
    classifier = build_classifier(
        model, model_cfg, train.classnames, train.templates, num_stages=num_stages,
        sid_null_prob=apz.sid_null_prob if apz is not None else 0.1,
    ).to(device).train()  # fmt: skip
    # Everything is trainable here, so the optimizer holds every parameter; AutoProg-Zero's stages
    # freeze blocks later (a frozen block's grad is None, so AdamW neither steps nor decays it).
    optimizer = build_optimizer([classifier], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                eps=cfg.eps, device=device)  # fmt: skip
    state = TrainState()
    data = _Batches(train, cfg, state)
    total_steps = cfg.steps or max(1, round(cfg.epochs * data.steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total_steps // 20)
    schedule = CosineSchedule(cfg.lr, total_steps, min(warmup, total_steps), cfg.min_lr_ratio)
    forward = _ClassifierStep(classifier)
    stages, macs = None, 0  # a stage prices its steps when it is entered
    if apz is None:
        macs = _step_macs(classifier, train, cfg.global_batch_size)
    elif total_steps < apz.num_stages:
        raise ValueError(
            f"finetune: {total_steps} steps cannot hold autoprog_zero.num_stages={apz.num_stages} "
            "stages; train more epochs or steps"
        )
    else:
        stages = StageDriver(classifier, forward, apz, train, seed=cfg.seed, total_steps=total_steps)
    run = _Run(cfg=cfg, info=info, model=classifier, forward=forward, optimizer=optimizer, schedule=schedule,
               scaler=torch.amp.GradScaler("cuda") if use_scaler else None, amp_dtype=amp_dtype, data=data,
               total_steps=total_steps, macs_per_step=macs, stages=stages, source=source, model_cfg=model_cfg,
               num_test=len(test.labels), evaluate=_evaluator(test, val), state=state)  # fmt: skip
    resume_from = latest_checkpoint(cfg.out_dir)
    if resume_from is not None:
        _restore(run, resume_from)
        _LOG.info("resumed %s at step %d (epoch %d)", resume_from, state.step, state.epoch)
    else:
        seed_all(cfg.seed)  # the training stream: SID ids (the data order has its own generator)
    run.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    name = f"{source['member']} finetune"
    run.log = RunLog(cfg.out_dir, enabled=True, member=name, total_steps=total_steps,
                     steps_per_epoch=data.steps_per_epoch, batch_size=cfg.global_batch_size,
                     start_step=state.step, start_wall_s=state.wall_s)  # fmt: skip
    run.log.write({"kind": "start", "step": state.step, "member": source["member"], "label": cfg.label,
                   "device": str(device), "precision": str(amp_dtype or "fp32"), "total_steps": total_steps,
                   "steps_per_epoch": data.steps_per_epoch, "warmup_steps": schedule.warmup_steps,
                   "num_train": len(train.labels), "num_val": 0 if val is None else len(val.labels),
                   "num_test": len(test.labels), "resumed_from": resume_from and str(resume_from),
                   "config": to_dict(cfg)})  # fmt: skip
    run.clock = time.perf_counter()
    return run


# --- the loop ----------------------------------------------------------------------------------------


def _loop(run: _Run) -> FinetuneResult:
    """compt.engine.train's order (boundary work, then one step); a stage is entered before its first step."""
    cfg, st = run.cfg, run.state
    start, stats, metrics = st.step, None, {}
    if start == 0:  # the head before any step is the zero-shot classifier (issue 16): its test top-1
        run.zero_shot_top1 = evaluate_now(run, run.evaluate, None)[0]["test_top1"]
    while True:
        fresh, last = st.step > start, st.step >= run.total_steps
        if run.stages is not None and not last:
            record = run.stages.enter_due(run)
            if record is not None:
                run.log.write(record)
                _LOG.info("stage %d: level %d at %d px (%s)", record["stage"], record["level"],
                          record["resolution"], record["how"])  # fmt: skip
        if fresh and (st.step % cfg.log_every_steps == 0 or last):
            log_step(run, stats)
        at_eval = fresh and cfg.eval_every_steps > 0 and st.step % cfg.eval_every_steps == 0
        if last or at_eval:
            metrics = evaluate_now(run, run.evaluate, None)[0]
        if last:
            return _finish(run, metrics)
        at_save = fresh and cfg.save_every_steps > 0 and st.step % cfg.save_every_steps == 0
        stop = stop_agreed(run, sync_point=True)
        if at_save or stop:
            check_finite(run)  # never save weights that a NaN step has touched
            path = _save(run, run.out_dir / f"step_{st.step}.pt")
        if stop:
            msg = f"stopped by {signal_name(stop)} at step {st.step}; saved {path}; rerun the same command"
            _LOG.warning(msg)
            raise TrainingInterrupted(msg, path, stop)
        stats = train_step(run, run.data.next())
        advance(run)
        run.log.heartbeat(
            st.step, st.wall_s + time.perf_counter() - run.clock
        )  # a line every 30 s in a log file


# --- checkpoints ---------------------------------------------------------------------------------------


def _payload(run: _Run) -> dict[str, Any]:
    """What every checkpoint of the run holds: the classifier, how to rebuild it, and the counters."""
    clf, st = run.model, run.state
    return {
        "model": clf.state_dict(),
        "model_cfg": run.model_cfg,  # the CLIP's: the classifier is its image tower plus the head
        "member": run.source["member"],
        "paradigm": "clip",
        "kind": "finetune",
        "classes": clf.head.out_features,
        "sid_stages": None if clf.stage_embedding is None else clf.stage_embedding.num_stages,
        "steps": st.step,
        "samples_seen": st.samples_seen,
        "train_macs": st.train_macs,
        "wall_s": st.wall_s,
        "config": to_dict(run.cfg),
        "macs_per_step": run.macs_per_step,
        "zero_shot_top1": run.zero_shot_top1,
        "stages": None if run.stages is None else run.stages.state_dict(),
    }


def _save(run: _Run, path: Path) -> Path:
    run.tick()
    payload = _payload(run) | {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "rng": [capture_rng(run.info.device)],
        "state": run.state.state_dict(),
    }
    save_checkpoint(path, payload)
    prune_checkpoints(run.out_dir, run.cfg.keep_last)
    return path


def _restore(run: _Run, path: Path) -> None:
    """Everything a checkpoint holds, so the run continues as if never interrupted."""
    payload = load_checkpoint(path)
    check_same_run(to_dict(run.cfg), payload.get("config", {}), path, same_run=FINETUNE_SAME_RUN_FIELDS,
                   free=FINETUNE_FREE_FIELDS)  # fmt: skip
    run.model.load_state_dict(payload["model"])
    run.optimizer.load_state_dict(payload["optimizer"])
    if run.scaler is not None and payload.get("scaler"):
        run.scaler.load_state_dict(payload["scaler"])
    run.state.load_state_dict(payload["state"])
    run.zero_shot_top1 = payload.get("zero_shot_top1")
    run.macs_per_step = payload["macs_per_step"]
    if run.stages is not None:
        run.stages.load_state_dict(payload["stages"], run)
    restore_rng(payload["rng"], 0, run.info.device, run.cfg.seed + run.state.step)


def _finish(run: _Run, metrics: dict[str, float]) -> FinetuneResult:
    """Write final.pt (the fine-tuned classifier) and result.json; return the result."""
    check_finite(run)
    run.tick()
    st = run.state
    result = FinetuneResult.of(
        run.cfg, run.source, test_top1=metrics["test_top1"], val_top1=metrics.get("val_top1"),
        zero_shot_top1=run.zero_shot_top1, num_train=len(run.data.train.labels),
        num_test=run.num_test, num_classes=run.model.head.out_features, train_macs=st.train_macs,
        wall_s=st.wall_s, steps=st.step, stages=None if run.stages is None else run.stages.choices,
    )  # fmt: skip
    final = run.out_dir / "final.pt"
    save_checkpoint(final, _payload(run) | {"result": result.to_dict()})
    record = {"kind": "final", "step": st.step, "samples_seen": st.samples_seen, "train_macs": st.train_macs}
    run.log.write(record | {"wall_s": st.wall_s, "checkpoint": str(final), **metrics})
    write_result(run.cfg.out_dir, result)
    return result


def load_finetuned(path: str | Path, device: str | torch.device = "cpu") -> ImageClassifier:
    """The fine-tuned classifier of a ``compt finetune`` run's ``final.pt`` (or of a step checkpoint)."""
    from compt.engine.checkpoint import CheckpointError
    from compt.paradigms import get_paradigm

    payload = load_checkpoint(path, device)
    if payload.get("kind") != "finetune":
        raise CheckpointError(f"{path} is not a compt finetune checkpoint; pass a run folder's final.pt")
    clip = get_paradigm("clip").build(payload["model_cfg"], device)
    head = nn.Linear(int(payload["model_cfg"]["embed_dim"]), int(payload["classes"]), device=device)
    stages = payload.get("sid_stages")
    sid = None if stages is None else StageEmbedding(stages, clip.visual.class_embedding.shape[-1]).to(device)
    classifier = ImageClassifier(clip.visual, head, sid)
    classifier.load_state_dict(payload["model"])
    return classifier.eval()
