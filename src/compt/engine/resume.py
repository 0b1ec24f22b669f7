"""Exact resume: what a training checkpoint holds, and how a run picks up where it stopped.

A run interrupted and resumed must end with the weights of an uninterrupted run (the issue's
"resume identity"). A step checkpoint ``step_<N>.pt`` therefore holds, besides the model payload
every compt checkpoint has (``model``, ``model_cfg``, ``member``):

- ``optimizer`` (AdamW moments), ``scheduler`` (the cosine schedule; the lr is a function of the
  step), ``scaler`` (fp16 only), ``distill`` (projection T and the auto-alpha averages; the alpha
  schedule is a function of the step), ``grow_mask`` (MSG's growth masks while they ramp, else None),
  ``progressive`` (an AutoProg-One run's search outcomes and MoGrow EMA, else None; its ``model`` and
  ``model_cfg`` are the stage's, of the depth the step trains);
- ``rng``: the Python/NumPy/torch/CUDA generator states of *every* rank;
- ``step``, ``epoch``, ``step_in_epoch``: the data position (a paradigm's batches are a function
  of seed, epoch and index, so the loader restarts mid-epoch exactly);
- ``samples_seen``, ``train_macs``, ``wall_s``: the live cost counters (App. C.2);
- ``config`` (the TrainConfig as a dict) and ``teacher`` (checkpoint path and member of a link).

``model`` holds the plain parameter names even while growth masks parametrize the model
(:func:`compt.grow.masks.plain_state_dict`). Resuming checks that the folder holds the same run
(:func:`check_same_run`); a checkpoint written before a field existed is read with the value that
its code implied (:data:`LEGACY_VALUES`). The functions here
take the trainer's run object (``compt.engine.setup.Run``); this module never imports the trainer.
Under FSDP2 (``run.sharded``) the model, projection and optimizer states are gathered to full tensors
on rank 0 and written in the same layout (:mod:`compt.engine.fsdp` says why).
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compt.config import to_dict
from compt.engine import dist, fsdp
from compt.engine.checkpoint import (
    checkpoint_digest,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from compt.engine.loader import pin_batches
from compt.grow.masks import GrowthMask, plain_state_dict

__all__ = [
    "SAME_RUN_FIELDS",
    "LEGACY_VALUES",
    "DataStream",
    "seed_all",
    "capture_rng",
    "restore_rng",
    "check_same_run",
    "run_changes",
    "check_prior_run",
    "move_aside",
    "RunMismatchError",
    "gather_states",
    "model_payload",
    "save_run",
    "restore_run",
]

_LOG = logging.getLogger("compt.train")

# TrainConfig fields that define the run: resuming with other values would silently train another model.
SAME_RUN_FIELDS = (
    "member",
    "family",
    "teacher",
    "data",
    "global_batch_size",
    "accum_steps",
    "epochs",
    "steps",
    "seed",
    "width",
    "depth",
    "alpha_ref_dim",  # the meaning of alpha (issue 13): an old run must not silently resume 16x lighter
    "optimizer_init",
    "progressive",  # AutoProg-One's stages decide what the checkpoint's model is (issue 15)
    "distill",
)
# TrainConfig fields added by issue 13, and the value a checkpoint written before them implies.
LEGACY_VALUES = {
    "alpha_ref_dim": None,  # alpha weighed the per-dimension MSE
    "alpha_schedule": "constant",
    "alpha_schedule_fraction": 1.0,
    "mask_ramp_fraction": 0.25,
    "optimizer_init": "fresh",
    "keep_moments": False,
    "lr_decay_fraction": 1.0,
    "progressive": None,  # issue 15
    "distill": "feature",  # issue 14: what a link distills (the only target before)
}
# Fields that may change between an interruption and its resume without a warning.
_FREE_FIELDS = ("out_dir", "device", "save_every_steps", "keep_last", "log_every_steps", "eval_every_steps")
_DATA_FREE_FIELDS = ("workers",)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (CUDA: the state of ``device`` only)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(states: list[dict[str, Any]], rank: int, device: torch.device, fallback_seed: int) -> None:
    """Restore rank ``rank``'s states from a checkpoint's per-rank list.

    When the world size changed since the checkpoint, there is no state for this rank: it is seeded
    with ``fallback_seed`` instead (with a warning; the run then differs from an uninterrupted one
    only in random choices made by the training process itself, not in its data).
    """
    if not isinstance(states, list) or rank >= len(states):
        warnings.warn(
            f"the checkpoint holds RNG states for {len(states) if isinstance(states, list) else 0} rank(s), "
            f"none for rank {rank}; seeding it afresh (the world size changed since the checkpoint)",
            stacklevel=2,
        )
        seed_all(fallback_seed)
        return
    state = states[rank]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def run_changes(
    now: dict[str, Any],
    payload: dict[str, Any],
    *,
    finished: bool,
    same_run: tuple[str, ...] = SAME_RUN_FIELDS,
    free: tuple[str, ...] = _FREE_FIELDS,
) -> list[str]:
    """What makes the run of config ``now`` another one than the checkpoint ``payload``'s, in words.

    For a step checkpoint, the fields of :data:`SAME_RUN_FIELDS` (others may change on resume); for
    a finished run (``final.pt``), every field but the free ones, since none of the new values would
    be used (issue 11: a rerun reported new epochs for weights trained with the old ones); ``same_run``
    and ``free`` default to TrainConfig's (a loop with another config passes its own). A field
    written before it existed takes its :data:`LEGACY_VALUES` value; other fields added since the
    checkpoint are not a difference. A link's teacher counts by content too: a teacher retrained
    since (another SHA-256) makes the link stale.
    """
    saved = {**LEGACY_VALUES, **(payload.get("config") or {})}
    keys = same_run if not finished else [k for k in now if k in saved and k not in free]
    changes = []
    for key in keys:
        a, b = now.get(key), saved.get(key)
        if key == "data":
            a, b = _strip_free(a), _strip_free(b)
        if a != b:
            changes.append(f"train.{key} is {b!r} there but {a!r} now")
    teacher = payload.get("teacher") or {}
    if now.get("teacher") and teacher.get("sha256"):
        digest = checkpoint_digest(now["teacher"])
        if digest is not None and digest != teacher["sha256"]:
            changes.append(f"its teacher {now['teacher']} was retrained since (another SHA-256)")
    return changes


def _strip_free(data: Any) -> Any:
    return {k: v for k, v in data.items() if k not in _DATA_FREE_FIELDS} if isinstance(data, dict) else data


def check_same_run(
    now: dict[str, Any],
    saved: dict[str, Any],
    path: str | Path,
    *,
    same_run: tuple[str, ...] = SAME_RUN_FIELDS,
    free: tuple[str, ...] = _FREE_FIELDS,
) -> None:
    """Raise if ``saved`` (a checkpoint's ``config``) is another run than ``now``; warn on softer changes.

    ``same_run`` / ``free``: the fields that define the run and those that may change silently.
    """
    changes = run_changes(now, {"config": saved}, finished=False, same_run=same_run, free=free)
    if changes:
        raise RunMismatchError(
            f"{path} belongs to a different run: {changes[0]}. Use a new out_dir for the new settings, or "
            "the old settings to resume."
        )
    saved = {**LEGACY_VALUES, **saved}
    changed = [k for k in now if k not in same_run and k not in free and now[k] != saved.get(k)]
    if changed:
        warnings.warn(
            f"resuming {path} with changed settings: "
            + ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed),
            stacklevel=2,
        )


class RunMismatchError(ValueError):
    """The output folder holds a run of another config; nothing was trained or changed."""


def check_prior_run(cfg: Any, retrain: bool = False) -> dict[str, Any] | None:
    """What ``cfg.out_dir`` holds already, checked against ``cfg`` (rank 0, under the folder's lock).

    Returns the payload (tensors memory-mapped) of a finished run of this config, to reuse; ``None``
    to train, from scratch or resuming a step checkpoint of this run. A run of another config is a
    :class:`RunMismatchError` that names what changed; with ``retrain`` the folder is moved aside
    instead (:func:`move_aside`: nothing trained is deleted) and ``None`` returned.
    """
    out = Path(cfg.out_dir)
    final = out / "final.pt"
    if final.is_file() and not verify_checkpoint(final):
        warnings.warn(
            f"{final} is corrupted or truncated (SHA-256 mismatch); resuming from the newest valid "
            "step checkpoint to write it again",
            stacklevel=2,
        )
    found = final if final.is_file() and verify_checkpoint(final) else latest_checkpoint(out)
    if found is None:
        return None
    payload = load_checkpoint(found, mmap=True)
    finished = found == final
    changes = run_changes(to_dict(cfg), payload, finished=finished)
    if not changes:
        return payload if finished else None
    if retrain:
        moved = move_aside(out)
        _LOG.warning("%s: %s held a run of another config (%s); moved it to %s, training afresh",
                     cfg.member, out, "; ".join(changes), moved)  # fmt: skip
        return None
    what = "a finished run" if finished else "a run"
    keep = "keep that result" if finished else "resume it"
    raise RunMismatchError(
        f"{found} belongs to a different run: {'; '.join(changes)}. {out} holds {what} of another config "
        f"and nothing was trained. Use a new out_dir for the new settings, the old settings to {keep}, "
        f"or --retrain (compt train / compt chain run) to move it to {_aside_name(out)} and train afresh."
    )


def move_aside(folder: str | Path) -> Path:
    """Rename ``folder`` to ``<folder>.replaced-<N>`` (the first free N) and return the new path."""
    folder = Path(folder)
    target = _aside_name(folder)
    os.replace(folder, target)  # a free name: never replaces anything
    return target


def _aside_name(folder: Path) -> Path:
    n = 1
    while folder.with_name(f"{folder.name}.replaced-{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}.replaced-{n}")


class DataStream:
    """The micro-batches of each optimizer step, epoch after epoch, from the run's data position."""

    def __init__(self, cfg: Any, member: Any, info: dist.DistInfo, state: Any):
        self.cfg, self.member, self.info, self.state = cfg, member, info, state
        self.micro_batch = cfg.global_batch_size // cfg.accum_steps  # samples per micro-batch, all ranks
        if self.micro_batch % info.world_size:
            raise ValueError(
                f"train.global_batch_size={cfg.global_batch_size} / accum_steps={cfg.accum_steps} = "
                f"{self.micro_batch} samples per micro-batch cannot be split over {info.world_size} ranks; "
                "use a multiple of the number of processes"
            )
        # Samples the loader skipped / used after a repair so far this epoch (metrics.jsonl's
        # data_skips / data_repairs; a repair is e.g. a refilled batch or a non-UTF-8 caption).
        self._it, self._at, self.skips, self.repairs = None, None, 0, 0
        member.paradigm.check_data(cfg.data, member)
        self.steps_per_epoch = len(self._open()) // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"one epoch of the data has fewer than accum_steps={cfg.accum_steps} "
                f"batches of {self.micro_batch}; use more data or a smaller train.global_batch_size"
            )

    def _open(self):
        st = self.state
        self._loader = self.member.paradigm.build_loader(
            self.cfg.data,
            self.member,
            global_batch_size=self.micro_batch,
            rank=self.info.rank,
            world_size=self.info.world_size,
            epoch=st.epoch,
            start_step=st.step_in_epoch * self.cfg.accum_steps,
            pin_memory=pin_batches(self.info.device, getattr(self.cfg.data, "workers", 0)),
        )
        self._it, self._at = iter(self._loader), (st.epoch, st.step_in_epoch)
        return self._loader

    def next(self) -> list[tuple[torch.Tensor, ...]]:
        """The ``accum_steps`` micro-batches of the step at the current data position."""
        if self._at != (self.state.epoch, self.state.step_in_epoch):  # a new epoch, or resumed elsewhere
            self._open()
        batches = [next(self._it) for _ in range(self.cfg.accum_steps)]
        self._at = (self.state.epoch, self.state.step_in_epoch + 1)
        self.skips = sum(getattr(self._loader, "skips", {}).values())
        self.repairs = sum(getattr(self._loader, "repairs", {}).values())
        return batches


def gather_states(run: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model", "projection"}`` state dicts: the live ones, or under FSDP2 full ones on rank 0
    (a collective: every rank calls it)."""
    if run.sharded:
        return fsdp.full_states(run.forward)
    return {"model": run.model.state_dict(), "projection": run.projection.state_dict()}


def model_payload(run: Any, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """The part of a checkpoint that final.pt shares: model (from :func:`gather_states`), config, costs."""
    st = run.state
    # Mid-run, an AutoProg run's model is its stage's (shallower); at the end it is the member itself.
    model_member = run.progressive.stage.member if run.progressive is not None else run.member
    return {
        "model": states["model"] if run.sharded else plain_state_dict(run.model),  # masks: plain names
        "model_cfg": model_member.model_config(),
        "member": run.member.name,
        "paradigm": run.member.paradigm_name,
        "steps": st.step,
        "epoch": st.epoch,
        "samples_seen": st.samples_seen,
        "train_macs": st.train_macs,
        "wall_s": st.wall_s,
        "eval_s": st.eval_s,
        "config": to_dict(run.cfg),
        "teacher": run.teacher_info,
        "macs_per_step": run.macs_per_step,
        # AutoProg-One: the schedule trained so far (a step checkpoint adds the EMA, save_run)
        "progressive": {"progression": run.progressive.progression.state_dict()} if run.progressive else None,
        **run.paradigm.checkpoint_extras(run.cfg.data),  # e.g. an LM's tokenizer: the file stands alone
    }


def save_run(run: Any, path: Path) -> Path:
    """A resumable checkpoint at a step boundary (a collective: every rank sends its RNG state)."""
    run.tick()
    rng = dist.all_gather_object(capture_rng(run.info.device))
    states = gather_states(run)
    optimizer = (
        fsdp.full_optimizer_state(run.forward, run.optimizer) if run.sharded else run.optimizer.state_dict()
    )
    if run.info.is_main:
        payload = model_payload(run, states) | {
            "optimizer": optimizer,
            "scheduler": run.schedule.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "rng": rng,
            "step": run.state.step,
            "step_in_epoch": run.state.step_in_epoch,
            "state": run.state.state_dict(),
            "distill": {
                "projection": states["projection"],
                **(run.distiller.state_dict() if run.distiller is not None else {}),
            },
            "world_size": run.info.world_size,
            "grow_mask": run.masks.state_dict() if run.masks is not None else None,
            "progressive": run.progressive.state_dict() if run.progressive is not None else None,
        }
        save_checkpoint(path, payload)
        prune_checkpoints(run.out_dir, run.cfg.keep_last)
    dist.barrier()
    return path


def restore_run(run: Any, path: Path, payload: dict[str, Any] | None = None) -> None:
    """Load everything a checkpoint holds, so the run continues as if never interrupted.

    ``payload``: the checkpoint's, when the caller loaded it already (an AutoProg run builds its model
    from it: the stage's depth and the search outcomes, compt.engine.progressive_train).
    """
    payload = load_checkpoint(path) if payload is None else payload
    check_same_run(to_dict(run.cfg), payload.get("config", {}), path)
    if run.sharded:  # every rank read the full file: each takes its shards
        fsdp.load_states(
            run.forward, {"model": payload["model"], "projection": payload["distill"]["projection"]}
        )
        fsdp.load_optimizer_state(run.forward, run.optimizer, payload["optimizer"])
    else:
        run.model.load_state_dict(payload["model"])
        run.projection.load_state_dict(payload["distill"]["projection"])
        run.optimizer.load_state_dict(payload["optimizer"])
    if run.scaler is not None and payload.get("scaler"):
        run.scaler.load_state_dict(payload["scaler"])
    if run.distiller is not None:
        run.distiller.load_state_dict(payload["distill"])
    run.state.load_state_dict(payload["state"])
    masks = payload.get("grow_mask")  # absent once the ramp has ended (or for any other strategy)
    run.masks = GrowthMask.from_state(masks) if masks else None
    if run.masks is not None:
        run.masks.ramp_steps = max(1, round(run.cfg.mask_ramp_fraction * run.total_steps))
    restore_rng(payload["rng"], run.info.rank, run.info.device, run.cfg.seed + run.info.rank + run.state.step)
