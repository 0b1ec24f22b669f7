"""The model chain (paper §3.1): train m1 individually, then each next member from its predecessor.

``run_chain(spec)`` walks the members smallest first. Member i > 1 is a chain link: its student is
grown from member i-1's final checkpoint (inverse weight initialization, ``compt.grow``) and trained
with inverse feature distillation from it (``compt.distill``), for the link's own, much shorter
schedule. ``run_chain(spec, individual=True)`` trains every member from scratch under the identical
protocol: the baseline twins of the lossless comparison.

Everything lands in one predictable tree, and rerunning the same command resumes it::

    OUT/chain/<member>/        step_*.pt, final.pt, metrics.jsonl, export/
    OUT/chain/summary.json
    OUT/individual/<member>/   (same layout, --individual)
    OUT/individual/summary.json

Finished members are skipped (``train_member`` returns at once when ``final.pt`` exists), a
half-trained member resumes mid-epoch from its latest valid checkpoint. The first member is the
same run in both trees (the paper's Table 2 lists one number for both), so whichever tree trains
it first, the other reuses it.

Automatic epoch allocation (beyond the paper, which interpolates it, §3.1.2 / Fig. 8): a link with
``until_lossless`` evaluates every ``check_every_steps`` and stops as soon as its metric is within
``tolerance`` points of its individually trained twin, its epochs being the cap.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compt.config import ConfigError, from_dict, load_yaml, to_dict
from compt.engine import dist
from compt.engine.checkpoint import check_writable, load_checkpoint
from compt.engine.train import TrainConfig, TrainResult, train_member
from compt.families import Member, check_ascending, get_family
from compt.plan import allocate_epochs

__all__ = ["ChainSpec", "UntilLossless", "EvalSpec", "load_spec", "run_chain", "member_train_config"]


@dataclass(frozen=True)
class EvalSpec:
    """Which evaluations run after each member (and every ``every_steps`` if > 0)."""

    every_steps: int = 0  # evaluate during training every N optimizer steps; 0: only at the end
    imagefolders: tuple[str, ...] = ()  # CLIP: extra ImageFolder zero-shot sets (a class per sub-folder)
    metric: str = "mean_zeroshot_top1"  # headline metric used by reports and until_lossless (paradigm's key)
    seed: int = 0  # seed of the embedded evaluation sets

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps must be >= 0, got {self.every_steps}")


@dataclass(frozen=True)
class UntilLossless:
    """Stop a link as soon as it is lossless against its individually trained twin."""

    enabled: bool = False
    tolerance: float = 0.5  # worse than the twin by at most this, in the metric's unit (paper: 0.5 points)
    check_every_steps: int = 50  # evaluation period while a link trains, optimizer steps

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError(f"until_lossless.tolerance must be >= 0, got {self.tolerance}")
        if self.check_every_steps <= 0:
            raise ValueError(f"until_lossless.check_every_steps must be > 0, got {self.check_every_steps}")


@dataclass(frozen=True)
class ChainSpec:
    """A chain recipe (YAML). ``train`` holds TrainConfig fields shared by all members; ``link``
    overrides them for chain links (the paper uses 8000 warmup steps for baselines, 1000 for links)."""

    family: str  # a registered family name or a family YAML file
    out_dir: str  # root of the run tree (see module docstring)
    members: tuple[str, ...] = ()  # members in chain order; empty: the whole family
    data: Any = None  # the family's paradigm's data config (CLIP: compt.paradigms.clip.data.DataConfig)
    baseline_epochs: float = 1.0  # epochs of every individually trained member and of the first link
    epochs: tuple[float, ...] = ()  # per-member chain epochs (first = baseline_epochs); empty: allocate
    target_ratio: float = 0.0  # for allocation without `epochs`: last link's epochs = baseline / ratio
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for every member
    link: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields overridden for links
    eval: EvalSpec = field(default_factory=EvalSpec)
    until_lossless: UntilLossless = field(default_factory=UntilLossless)
    name: str = "chain"

    def __post_init__(self) -> None:
        paradigm = get_family(self.family).paradigm
        data = {} if self.data is None else self.data
        if isinstance(data, dict):
            data = from_dict(paradigm.data_config, data, where="data")
        elif not isinstance(data, paradigm.data_config):
            raise ValueError(
                f"data must be a mapping of {paradigm.data_config.__name__} fields, got {data!r}"
            )
        # Run-relative data defaults point at the chain's root, shared by every member (an LM's tokenizer).
        object.__setattr__(self, "data", paradigm.bind_data(data, self.out_dir))
        paradigm.check_metric(self.eval.metric)  # a typo would make until_lossless wait forever
        if self.baseline_epochs <= 0:
            raise ValueError(f"baseline_epochs must be > 0, got {self.baseline_epochs}")
        if self.epochs and len(self.epochs) != len(self.resolved_members()):
            raise ValueError(
                f"epochs has {len(self.epochs)} entries but the chain has {len(self.resolved_members())} "
                "members; give one per member (the first is usually baseline_epochs)"
            )
        if any(e <= 0 for e in self.epochs):
            raise ValueError(f"every entry of epochs must be > 0, got {list(self.epochs)}")
        for key in ("member", "epochs", "out_dir", "teacher", "data"):
            if key in self.train or key in self.link:
                raise ValueError(f"train/link must not set {key!r}: the chain sets it per member")

    def resolved_members(self) -> list[Member]:
        fam = get_family(self.family)
        return [fam.member(n) for n in self.members] if self.members else list(fam.members)

    def chain_epochs(self) -> list[float]:
        """Per-member epochs of the chain: given, or allocated linearly (§3.1.2)."""
        if self.epochs:
            return list(self.epochs)
        return [
            float(e)
            for e in allocate_epochs(
                self.resolved_members(),
                int(self.baseline_epochs),
                self.target_ratio or None,
                sample=get_family(self.family).paradigm.cost_sample(self.data),
            )
        ]


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ChainSpec:
    """Load and fully validate a chain spec, including every member's TrainConfig, in well under a second."""
    spec = load_yaml(ChainSpec, path, overrides)
    members = spec.resolved_members()
    check_ascending(members)
    check_writable(spec.out_dir, "out_dir")
    for i in range(len(members)):  # fail now, not after an hour of training the first member
        member_train_config(spec, i, individual=False)
        member_train_config(spec, i, individual=True)
    return spec


def _member_dir(spec: ChainSpec, individual: bool, member: Member) -> Path:
    return Path(spec.out_dir) / ("individual" if individual else "chain") / member.name.replace("/", "-")


def member_train_config(spec: ChainSpec, index: int, individual: bool) -> TrainConfig:
    """The TrainConfig of member ``index``: shared ``train`` fields, plus ``link`` ones for a link."""
    members = spec.resolved_members()
    member = members[index]
    is_link = index > 0 and not individual
    fields = dict(spec.train)
    if is_link:
        fields.update(spec.link)
    fields.update(
        member=member.name,
        data=to_dict(spec.data),
        epochs=spec.baseline_epochs if (individual or index == 0) else spec.chain_epochs()[index],
        out_dir=str(_member_dir(spec, individual, member)),
        family=spec.family,
        teacher=str(_member_dir(spec, False, members[index - 1]) / "final.pt") if is_link else None,
    )
    if spec.until_lossless.enabled and is_link:
        fields["eval_every_steps"] = spec.until_lossless.check_every_steps
    elif spec.eval.every_steps:
        fields["eval_every_steps"] = spec.eval.every_steps
    return from_dict(TrainConfig, fields, where=f"chain spec, member {member.name}")


def _evaluator(spec: ChainSpec, member: Member):
    """An ``evaluate(model, step)`` callback on the paradigm's held-out sets at the member's size."""
    options = {"imagefolders": spec.eval.imagefolders} if spec.eval.imagefolders else {}
    return member.paradigm.evaluator(member, data_cfg=spec.data, seed=spec.eval.seed, **options)


def _reuse_first_member(spec: ChainSpec, individual: bool, cfg: TrainConfig) -> None:
    """The first member trains identically in both trees: copy the other tree's finished run."""
    here = Path(cfg.out_dir)
    other = _member_dir(spec, not individual, spec.resolved_members()[0])
    if (here / "final.pt").exists() or not (other / "final.pt").exists():
        return
    theirs = dict(load_checkpoint(other / "final.pt").get("config") or {})
    ours = to_dict(cfg)
    shared = (theirs.keys() & ours.keys()) - {"out_dir"}  # fields added since that run are not a difference
    if any(
        theirs[k] != ours[k] for k in shared
    ):  # e.g. the other tree ran with a --set override: train this one afresh
        warnings.warn(
            f"{other / 'final.pt'} was trained with another config than {cfg.member} here; "
            "not reusing it, training the first member again",
            stacklevel=2,
        )
        return
    here.mkdir(parents=True, exist_ok=True)
    # final.pt last and atomically: it marks the copy done, so a kill mid-copy is redone on rerun
    # (a half-copied final.pt without its sidecar would otherwise pass as finished and fail to load).
    for name in ("metrics.jsonl", "final.pt.sha256", "final.pt"):
        if (other / name).exists():
            tmp = here / f".{name}.tmp{os.getpid()}"
            shutil.copy2(other / name, tmp)
            os.replace(tmp, here / name)


def _lossless_stop(spec: ChainSpec, member: Member):
    """``should_stop(metrics)``: the link is within the tolerance of its twin, in the metric's direction."""
    metric, twin = spec.eval.metric, _twin_metric(spec, member)
    sign = 1.0 if member.paradigm.higher_is_better(metric) else -1.0  # val_loss: lower is better
    target = sign * twin - spec.until_lossless.tolerance
    return lambda metrics: sign * metrics.get(metric, sign * float("-inf")) >= target


def _twin_metric(spec: ChainSpec, member: Member) -> float:
    path = Path(spec.out_dir) / "individual" / "summary.json"
    if path.exists():
        for m in json.loads(path.read_text())["members"]:
            if m["name"] == member.name and spec.eval.metric in m["metrics"]:
                return float(m["metrics"][spec.eval.metric])
    raise ConfigError(
        f"until_lossless needs the individually trained twin of {member.name}: run "
        f"`compt chain run SPEC --individual` first (expected its result in {path})"
    )


def run_chain(spec: ChainSpec, individual: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the chain (or, with ``individual``, every member from scratch); returns the summary dict.

    Idempotent and resumable: finished members are skipped, an interrupted one resumes.
    """
    members = spec.resolved_members()
    paradigm = members[0].paradigm
    root = Path(spec.out_dir) / ("individual" if individual else "chain")
    rows: list[dict[str, Any]] = []
    acc_macs = acc_wall = 0.0
    for i, member in enumerate(members):
        cfg = member_train_config(spec, i, individual)
        if i == 0 and dist.is_main():
            _reuse_first_member(spec, individual, cfg)
        dist.barrier()
        should_stop = None
        if spec.until_lossless.enabled and i > 0 and not individual:
            should_stop = _lossless_stop(spec, member)
        result: TrainResult = train_member(cfg, evaluate=_evaluator(spec, member), should_stop=should_stop)
        acc_macs += result.train_macs
        acc_wall += result.wall_s
        export_dir = Path(cfg.out_dir) / "export"
        # The config is written after the weights: only with it is an export complete (a kill
        # between the two must not leave a folder that open_clip cannot load).
        if dist.is_main() and not paradigm.is_export_dir(export_dir):
            paradigm.export(result.final_checkpoint, export_dir)
        rows.append(_summary_row(spec, cfg, result, i, individual, acc_macs, acc_wall, root))
        dist.barrier()
    summary = {
        "kind": "individual" if individual else "chain",
        "name": spec.name,
        "family": spec.family,
        "metric": spec.eval.metric,
        # How the report reads the metrics: their direction, and the gap still counted lossless.
        "higher_is_better": {
            k: paradigm.higher_is_better(k) for k in sorted({k for r in rows for k in r["metrics"]})
        },
        "lossless_tolerance": spec.until_lossless.tolerance,
        "members": rows,
        "config": to_dict(spec),
    }
    if dist.is_main():
        _write_json(root / "summary.json", summary)
    return summary


def _summary_row(spec, cfg, result, index, individual, acc_macs, acc_wall, root) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    stopped_early = result.planned_steps > 0 and result.steps < result.planned_steps
    # Epochs actually trained: the planned epochs, scaled down when until_lossless stopped the link.
    epochs = cfg.epochs * result.steps / result.planned_steps if result.planned_steps else cfg.epochs
    return {
        "name": cfg.member,
        "teacher": None if index == 0 or individual else spec.resolved_members()[index - 1].name,
        "epochs": epochs,
        "planned_epochs": cfg.epochs,
        "steps": result.steps,
        "samples_seen": result.samples_seen,
        "train_macs": result.train_macs,
        "accumulated_train_macs": acc_macs,
        "wall_s": result.wall_s,
        "accumulated_wall_s": acc_wall,
        "metrics": result.metrics,
        "metrics_file": os.path.relpath(out / "metrics.jsonl", root),
        "export": os.path.relpath(out / "export", root),
        "until_lossless": (
            {"stopped_at_step": result.steps, "epochs_needed": epochs} if stopped_early else None
        ),
    }


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
