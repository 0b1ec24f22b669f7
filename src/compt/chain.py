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
the tolerance of its individually trained twin, in the metric's direction (a loss: at most that much
above the twin's; issue 12), its epochs being the cap.

Evaluations during training (``eval.every_steps``, the ``until_lossless`` checks) compute only the
``eval.periodic`` metrics (default: the validation loss, the cheap low-noise metric of issue 12) and
what ``until_lossless`` compares; the evaluation after the last step computes everything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compt.config import ConfigError, from_dict, load_yaml, to_dict
from compt.cost import run_steps
from compt.engine import dist
from compt.engine.checkpoint import check_writable, load_checkpoint
from compt.engine.config import check_schedule
from compt.engine.lock import hold
from compt.engine.resume import run_changes
from compt.engine.train import TrainConfig, TrainResult, check_runtime, train_member
from compt.families import Member, check_ascending, get_family
from compt.lossless import CHANCE_PREFIX, MetricRule, Tolerance, is_lossless
from compt.plan import allocate_epochs

__all__ = [
    "ChainSpec",
    "UntilLossless",
    "EvalSpec",
    "load_spec",
    "run_chain",
    "member_train_config",
    "check_until_lossless",
    "metric_rules",
]

_LOG = logging.getLogger("compt.chain")


@dataclass(frozen=True)
class EvalSpec:
    """Which evaluations run after each member (and every ``every_steps`` if > 0)."""

    every_steps: int = 0  # evaluate during training every N optimizer steps; 0: only at the end
    imagefolders: tuple[str, ...] = ()  # CLIP: extra ImageFolder zero-shot sets (a class per sub-folder)
    metric: str = "mean_zeroshot_top1"  # headline metric used by reports and until_lossless (paradigm's key)
    seed: int = 0  # seed of the embedded evaluation sets
    # Metric keys the evaluations during training compute (only their sets are evaluated; the last
    # evaluation computes all); empty: everything every time. Issue 12: the cheap validation loss.
    periodic: tuple[str, ...] = ("val_loss",)
    # Keyword options of the paradigm's evaluator (CLIP: num_images, val_images, val_batch_size, batch_size)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        if not isinstance(self.options, dict):
            raise ValueError(f"eval.options must be a mapping of evaluator options, got {self.options!r}")
        reserved = {"metrics", "data_cfg", "imagefolders", "seed"} & set(self.options)
        if reserved:
            raise ValueError(f"eval.options must not set {sorted(reserved)}: the chain sets them")


@dataclass(frozen=True)
class UntilLossless:
    """Stop a link as soon as it is lossless against its individually trained twin."""

    enabled: bool = False
    # How much worse than its twin on eval.metric a link may be and count as lossless, in the metric's
    # units (points for a %, nats for a loss); null: the paradigm's default (0.5 points, 0.01 nats).
    tolerance: float | None = None
    relative_tolerance: float | None = None  # or a fraction of the twin's value; the larger applies
    check_every_steps: int = 50  # evaluation period while a link trains, optimizer steps

    def __post_init__(self) -> None:
        try:
            self.as_tolerance()
        except ValueError as e:
            raise ValueError(
                f"tolerance={self.tolerance!r}, relative_tolerance={self.relative_tolerance!r}: {e}"
            ) from None
        if self.check_every_steps <= 0:
            raise ValueError(f"until_lossless.check_every_steps must be > 0, got {self.check_every_steps}")

    def as_tolerance(self) -> Tolerance | None:
        """The spec's tolerance, or None when it sets none (then the paradigm's default applies)."""
        if self.tolerance is None and self.relative_tolerance is None:
            return None
        return Tolerance(absolute=self.tolerance or 0.0, relative=self.relative_tolerance or 0.0)


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
        for where, keys in (("eval.metric", (self.eval.metric,)), ("eval.periodic", self.eval.periodic)):
            for key in keys:  # a typo would make until_lossless wait forever
                try:
                    paradigm.check_metric(key)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
        if self.baseline_epochs <= 0:
            raise ValueError(f"baseline_epochs must be > 0, got {self.baseline_epochs}")
        if self.target_ratio and self.target_ratio < 1:  # else found only when epochs are allocated
            raise ValueError(f"target_ratio must be >= 1 (or 0: the default), got {self.target_ratio}")
        if self.epochs and len(self.epochs) != len(self.resolved_members()):
            raise ValueError(
                f"epochs has {len(self.epochs)} entries but the chain has {len(self.resolved_members())} "
                "members; give one per member (the first is usually baseline_epochs)"
            )
        if any(e <= 0 for e in self.epochs):
            raise ValueError(f"every entry of epochs must be > 0, got {list(self.epochs)}")
        # steps too: it would override every member's epochs, and summary.json would report those.
        for key in ("member", "epochs", "steps", "out_dir", "teacher", "data"):
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
                self.baseline_epochs,  # not int(): a 2.5-epoch baseline allocated the links from 2
                self.target_ratio or None,
                sample=get_family(self.family).paradigm.cost_sample(self.data),
            )
        ]


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ChainSpec:
    """Load and fully validate a chain spec before anything trains (issue 11).

    Checked: every member's TrainConfig, chain and individual; this machine's device and precision;
    the data (kind, files, one epoch at least one global batch); the evaluation options; the output
    folder. Reading the data is the slow part (a large table is indexed once and reused by training).
    """
    spec = load_yaml(ChainSpec, path, overrides)
    members = spec.resolved_members()
    check_ascending(members)
    check_writable(spec.out_dir, "out_dir")
    configs = []
    for i, member in enumerate(members):  # fail now, not after an hour of training the first member
        for individual in (False, True):
            cfg = member_train_config(spec, i, individual)
            try:
                check_runtime(cfg)
            except ValueError as e:
                raise ConfigError(f"{path}, member {member.name}: {e}") from None
            configs.append(cfg)
    if spec.until_lossless.enabled and any(c.progressive is not None and c.teacher for c in configs):
        # It would stop a link mid-schedule, before AutoProg's last stage has grown the full member.
        raise ConfigError(
            f"{path}: until_lossless stops a link early, but a progressive link (link.progressive or "
            "train.progressive) reaches its full member only in its last stage; disable one of them"
        )
    try:
        _check_data(spec, members, configs)
        for member in members:
            member.paradigm.check_eval(member, **_eval_options(spec))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return spec


def _check_data(spec: ChainSpec, members: list[Member], configs: list[TrainConfig]) -> None:
    """Every member can read the data, and one epoch holds at least one global batch."""
    sizes = {}
    for member in members:
        member.paradigm.check_data(spec.data, member)
        sizes[member.name] = member.paradigm.num_samples(spec.data, member)
    for cfg in configs:
        size = sizes[cfg.member]
        if size is not None and size < cfg.global_batch_size:
            raise ConfigError(
                f"data: one epoch has {size} samples, fewer than {cfg.member}'s global batch of "
                f"{cfg.global_batch_size}: no optimizer step could run; use more data (data.num_samples) "
                "or a smaller train.global_batch_size"
            )
        if size is not None and cfg.progressive is not None:  # its stages and searches fit its steps
            steps_per_epoch = size // cfg.global_batch_size
            try:
                check_schedule(cfg, cfg.steps or run_steps(cfg.epochs, steps_per_epoch), steps_per_epoch)
            except ValueError as e:
                raise ConfigError(f"member {cfg.member}: {e}") from None


def check_until_lossless(spec: ChainSpec) -> None:
    """Raise :class:`ConfigError` unless every link's individually trained twin has its result.

    ``run_chain`` calls it before the first member trains, not when the first link needs it.
    """
    if spec.until_lossless.enabled:
        for member in spec.resolved_members()[1:]:
            _twin_metric(spec, member)


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
    # A link that grows its AdamW moments reads them from its teacher's final.pt (issue 13). The first
    # member is one run shared by both trees, so it keeps them in both.
    grown_next = index + 1 < len(members) and {**spec.train, **spec.link}.get("optimizer_init") == "grown"
    if grown_next and (not individual or index == 0):
        fields["keep_moments"] = True
    if spec.until_lossless.enabled and is_link:
        fields["eval_every_steps"] = spec.until_lossless.check_every_steps
    elif spec.eval.every_steps:
        fields["eval_every_steps"] = spec.eval.every_steps
    return from_dict(TrainConfig, fields, where=f"chain spec, member {member.name}")


def _eval_options(spec: ChainSpec, metrics: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The paradigm evaluator's options: ``eval.options``, the ImageFolders, and for the evaluations
    during training the metric keys they compute (``metrics``: only the sets these keys need)."""
    options = dict(spec.eval.options)
    if spec.eval.imagefolders:
        options["imagefolders"] = spec.eval.imagefolders
    if metrics is not None:
        options["metrics"] = metrics
    return options


def _evaluator(spec: ChainSpec, member: Member, metrics: tuple[str, ...] | None = None):
    """An ``evaluate(model, step)`` callback on the paradigm's held-out sets at the member's size."""
    return member.paradigm.evaluator(
        member, data_cfg=spec.data, seed=spec.eval.seed, **_eval_options(spec, metrics)
    )


def _periodic_evaluator(spec: ChainSpec, member: Member, until_lossless: bool):
    """The evaluations during training: ``eval.periodic`` and what until_lossless compares (None: all)."""
    if not spec.eval.periodic:
        return None
    keys = tuple(dict.fromkeys(spec.eval.periodic + ((spec.eval.metric,) if until_lossless else ())))
    return _evaluator(spec, member, keys)


def metric_rules(spec: ChainSpec, keys: list[str]) -> dict[str, MetricRule]:
    """How each of ``keys`` is compared (the paradigm's direction, tolerance and unit), with the
    spec's ``until_lossless`` tolerance for ``eval.metric``; ``summary.json`` records them."""
    paradigm = get_family(spec.family).paradigm
    own = spec.until_lossless.as_tolerance()
    return {k: paradigm.metric_rule(k, own if k == spec.eval.metric else None) for k in keys}


def _lossless_stop(spec: ChainSpec, member: Member):
    """``should_stop(metrics)``: the link is within the tolerance of its twin, in the metric's direction."""
    metric, twin = spec.eval.metric, _twin_metric(spec, member)
    rule = metric_rules(spec, [metric])[metric]
    return lambda metrics: metric in metrics and is_lossless(metrics[metric], twin, rule)


def _reuse_first_member(spec: ChainSpec, individual: bool, cfg: TrainConfig) -> None:
    """The first member trains identically in both trees: copy the other tree's finished run."""
    here = Path(cfg.out_dir)
    other = _member_dir(spec, not individual, spec.resolved_members()[0])
    if (here / "final.pt").exists() or not (other / "final.pt").exists():
        return
    changes = run_changes(to_dict(cfg), load_checkpoint(other / "final.pt", mmap=True), finished=True)
    if changes:  # e.g. the other tree ran with a --set override: train this one afresh
        warnings.warn(
            f"{other / 'final.pt'} was trained with another config than {cfg.member} here "
            f"({'; '.join(changes)}); not reusing it, training the first member again",
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


# The spec fields that make an individually trained twin the twin of this chain's member.
_TWIN_FIELDS = ("family", "data", "baseline_epochs", "train")


def _twin_metric(spec: ChainSpec, member: Member) -> float:
    path = Path(spec.out_dir) / "individual" / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        theirs, ours = summary.get("config") or {}, to_dict(spec)
        for config in (theirs, ours):  # data loader workers change nothing that trains
            config.get("data", {}).pop("workers", None)
        changed = [k for k in _TWIN_FIELDS if k in theirs and theirs[k] != ours[k]]
        changed += [
            f"eval.{k}"
            for k in ("seed", "imagefolders")
            if theirs.get("eval", {}).get(k, ours["eval"][k]) != ours["eval"][k]
        ]
        if changed:  # the twins of another spec: until_lossless would compare against the wrong target
            raise ConfigError(
                f"until_lossless: the twins in {path} were trained with another {', '.join(changed)} than "
                "this spec; rerun `compt chain run SPEC --individual` with this spec (--retrain moves the "
                "old twins aside), or use another out_dir"
            )
        for m in summary["members"]:
            if m["name"] == member.name and spec.eval.metric in m["metrics"]:
                return float(m["metrics"][spec.eval.metric])
    raise ConfigError(
        f"until_lossless needs the individually trained twin of {member.name}: run "
        f"`compt chain run SPEC --individual` first (expected its {spec.eval.metric} in {path})"
    )


def run_chain(
    spec: ChainSpec, individual: bool = False, progress: bool = True, retrain: bool = False
) -> dict[str, Any]:
    """Train the chain (or, with ``individual``, every member from scratch); returns the summary dict.

    Idempotent and resumable: finished members are skipped, an interrupted one resumes. A member
    whose folder holds a run of another config (other epochs, lr, data, teacher weights...) is an
    error naming the change; ``retrain`` moves such a folder aside and trains it again, and the
    links after it follow since their teacher changed. A second process on the same tree at the
    same time is refused (:mod:`compt.engine.lock`).
    """
    root = Path(spec.out_dir) / ("individual" if individual else "chain")
    if not individual:
        check_until_lossless(spec)
    with hold(root):
        rows = _train_members(spec, individual, retrain, root)
        keys = sorted(
            {k for r in rows for k in r["metrics"] if not k.startswith(CHANCE_PREFIX)} | {spec.eval.metric}
        )
        summary = {
            "kind": "individual" if individual else "chain",
            "name": spec.name,
            "family": spec.family,
            "paradigm": get_family(spec.family).paradigm.name,
            "metric": spec.eval.metric,
            # How the report compares each metric: direction, lossless tolerance, unit (issue 12).
            "metric_rules": {k: rule.to_dict() for k, rule in metric_rules(spec, keys).items()},
            "members": rows,
            "config": to_dict(spec),
        }
        if dist.is_main():
            _write_json(root / "summary.json", summary)
    return summary


def _train_members(spec: ChainSpec, individual: bool, retrain: bool, root: Path) -> list[dict[str, Any]]:
    """Train (or reuse) each member in chain order; their summary rows."""
    members = spec.resolved_members()
    paradigm = members[0].paradigm
    rows: list[dict[str, Any]] = []
    acc_macs = acc_wall = 0.0
    for i, member in enumerate(members):
        cfg = member_train_config(spec, i, individual)
        role = f"link from {members[i - 1].name}" if cfg.teacher else "from scratch"
        _LOG.info("%s/%s: %s, member %d/%d, %s, %g epochs", spec.name, root.name, member.name, i + 1,
                  len(members), role, cfg.epochs)  # fmt: skip
        if i == 0 and dist.is_main():
            _reuse_first_member(spec, individual, cfg)
        dist.barrier()
        until = spec.until_lossless.enabled and i > 0 and not individual
        should_stop = _lossless_stop(spec, member) if until else None
        result: TrainResult = train_member(
            cfg,
            evaluate=_evaluator(spec, member),
            should_stop=should_stop,
            retrain=retrain,
            periodic_evaluate=_periodic_evaluator(spec, member, until),
        )
        acc_macs += result.train_macs
        acc_wall += result.wall_s
        export_dir = Path(cfg.out_dir) / "export"
        # The config is written after the weights: only with it is an export complete (a kill
        # between the two must not leave a folder that open_clip cannot load).
        if dist.is_main() and not paradigm.is_export_dir(export_dir):
            paradigm.export(result.final_checkpoint, export_dir)
        rows.append(_summary_row(spec, cfg, result, i, individual, acc_macs, acc_wall, root))
        dist.barrier()
    return rows


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
