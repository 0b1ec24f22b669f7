"""The runs a report renders: ``summary.json`` files, loaded, validated and pooled over seeds.

A report compares a run (usually a CoM-PT chain) with a baseline (its individually trained twins).
Either side may be several runs of one experiment that differ only in their seed: :func:`pool_seeds`
makes them one :class:`Run` whose members hold the mean over seeds (and ``metrics_std``, the seed
standard deviation), keeping the seeds' own runs for the curves (Fig. 1's bands).
:func:`collect_runs` turns the paths given to ``compt report`` into the two sides.

How a metric compares (direction, lossless tolerance, unit) is the run's :meth:`Run.rule`:
``summary.json``'s ``metric_rules`` (written by ``compt chain run`` from the paradigm's hooks), else,
for summaries written before them, the paradigm's own answer (``summary.json``'s ``paradigm``,
default CLIP).
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compt.families import normalize_name
from compt.lossless import MetricRule, config_differences

__all__ = ["SUMMARY_NAME", "Run", "load_run", "read_metrics", "pool_seeds", "collect_runs", "seed_warnings"]

SUMMARY_NAME = "summary.json"
_MEMBER_KEYS = {
    "name": str,
    "teacher": (str, type(None)),
    "epochs": (int, float),
    "steps": int,
    "samples_seen": int,
    "train_macs": (int, float),
    "accumulated_train_macs": (int, float),
    "wall_s": (int, float),
    "accumulated_wall_s": (int, float),
    "metrics": dict,
}
_MEAN_KEYS = ("epochs", "train_macs", "accumulated_train_macs", "wall_s", "accumulated_wall_s")


@dataclass(frozen=True)
class Run:
    """A loaded ``summary.json``: its folder (metrics files are relative to it) and its content.

    A run pooled over seeds (:func:`pool_seeds`) has its seeds' runs in ``seeds``; its members'
    numbers are their means, ``metrics_std`` their standard deviations.
    """

    root: Path
    summary: dict[str, Any]
    seeds: tuple[Run, ...] = ()

    @property
    def members(self) -> list[dict[str, Any]]:
        return self.summary["members"]

    @property
    def label(self) -> str:
        return "CoM-PT" if self.summary["kind"] == "chain" else "Baseline"

    @property
    def seed_runs(self) -> tuple[Run, ...]:
        """The runs behind this one: its seeds, or itself."""
        return self.seeds or (self,)

    def member(self, name: str) -> dict[str, Any] | None:
        key = normalize_name(name)
        return next((m for m in self.members if normalize_name(m["name"]) == key), None)

    def rule(self, key: str) -> MetricRule:
        """How metric ``key`` is compared: ``summary.json``'s ``metric_rules``, else the paradigm's."""
        doc = (self.summary.get("metric_rules") or {}).get(key)
        if isinstance(doc, dict):
            return MetricRule.from_dict(doc)
        from compt.paradigms import get_paradigm, list_paradigms

        name = self.summary.get("paradigm")  # None: a summary older than paradigms, i.e. CLIP
        if name is not None and name not in list_paradigms():
            return MetricRule()  # a paradigm this install lacks: read as a percentage, higher better
        return get_paradigm(name).metric_rule(key)


def load_run(path: str | Path) -> Run:
    """Load and validate a run's ``summary.json`` (``path`` is the file or the run folder)."""
    path = Path(path)
    file = path / SUMMARY_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; pass a run folder written by `compt chain run`")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("kind") not in ("chain", "individual"):
        raise ValueError(f'{file}: top-level \'kind\' must be "chain" or "individual"')
    members = doc.get("members")
    if not isinstance(members, list) or not members:
        raise ValueError(f"{file}: 'members' must be a non-empty list")
    for i, m in enumerate(members):
        for key, tp in _MEMBER_KEYS.items():
            if not isinstance(m, dict) or key not in m:
                raise ValueError(f"{file}: members[{i}] lacks {key!r} (see the schema in compt.report)")
            if not isinstance(m[key], tp) or isinstance(m[key], bool):
                raise ValueError(f"{file}: members[{i}].{key} = {m[key]!r} has the wrong type")
    return Run(root=file.parent, summary=doc)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a truncated last line (a run killed mid-write) is skipped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pool_member(group: list[dict[str, Any]]) -> dict[str, Any]:
    """One member's row over seeds: means of costs and metrics, the seed std of each metric."""
    pooled = dict(group[0])
    for key in _MEAN_KEYS:
        pooled[key] = statistics.fmean(m[key] for m in group)
    for key in ("steps", "samples_seen"):
        pooled[key] = round(statistics.fmean(m[key] for m in group))
    values: dict[str, list[float]] = {}
    for m in group:
        for k, v in m["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(k, []).append(float(v))
    stats = {k: _mean_std(v) for k, v in values.items()}
    pooled["metrics"] = {k: mean for k, (mean, _) in stats.items()}
    pooled["metrics_std"] = {k: std for k, (_, std) in stats.items()}
    pooled["num_seeds"] = len(group)
    stopped = [m for m in group if m.get("until_lossless")]
    # A seed that did not stop early needed all of its epochs.
    pooled["until_lossless"] = (
        {
            "stopped_at_step": round(statistics.fmean(m["steps"] for m in group)),
            "epochs_needed": statistics.fmean(m["epochs"] for m in group),
        }
        if stopped
        else None
    )
    pooled["metrics_file"] = pooled["export"] = None  # per seed: the seeds' own runs hold them
    return pooled


def pool_seeds(runs: Sequence[Run]) -> Run:
    """One run from several seeds of one experiment (same kind, same members); one run is itself.

    Members' costs and metrics are the means over seeds, ``metrics_std`` the sample standard
    deviations; ``root`` is the seeds' common folder (the default place of their report).
    """
    if not runs:
        raise ValueError("pool_seeds: no runs given")
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    names = [m["name"] for m in first.members]
    for r in runs[1:]:
        if r.summary["kind"] != first.summary["kind"] or [m["name"] for m in r.members] != names:
            raise ValueError(
                f"{r.root} is not a seed of {first.root}: it holds a {r.summary['kind']} run of "
                f"{', '.join(m['name'] for m in r.members)}, not a {first.summary['kind']} run of "
                f"{', '.join(names)}; pass seeds of one experiment (and its baseline with --baseline)"
            )
    members = [_pool_member([r.members[i] for r in runs]) for i in range(len(names))]
    root = Path(os.path.commonpath([str(r.root.resolve()) for r in runs]))
    summary = {**first.summary, "members": members, "seeds": [str(r.root) for r in runs]}
    return Run(root=root, summary=summary, seeds=tuple(runs))


def seed_warnings(run: Run) -> list[str]:
    """Why a pooled run's seed spread may not be one: seeds trained on other data, or the same seed."""
    if not run.seeds:
        return []
    out = []
    first = run.seeds[0]
    for r in run.seeds[1:]:
        diff = config_differences(first.summary.get("config") or {}, r.summary.get("config") or {})
        if diff:
            out.append(
                f"the seeds {first.root} and {r.root} were trained or evaluated on other data "
                f"({'; '.join(diff)}): their spread is not a seed spread."
            )
    seeds = [((r.summary.get("config") or {}).get("train") or {}).get("seed", 0) for r in run.seeds]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        out.append(
            f"{run.label} runs {', '.join(str(r.root) for r in run.seeds)} have train.seed "
            f"{', '.join(map(str, seeds))}: runs of the same seed repeat one result, not a spread."
        )
    return out


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _expand(path: Path) -> list[tuple[Path, Path | None]]:
    """``(summary folder, its tree's individual/ or None)`` for a run folder, a tree or a folder of them."""
    if path.is_file() or (path / SUMMARY_NAME).is_file():
        return [(path, None)]
    if (path / "chain" / SUMMARY_NAME).is_file():
        twins = path / "individual"
        return [(path / "chain", twins if (twins / SUMMARY_NAME).is_file() else None)]
    children = sorted(path.iterdir(), key=lambda p: _natural(p.name)) if path.is_dir() else []
    found = [
        c
        for c in children
        if c.is_dir() and ((c / SUMMARY_NAME).is_file() or (c / "chain" / SUMMARY_NAME).is_file())
    ]
    if not found:
        raise FileNotFoundError(
            f"{path} holds no {SUMMARY_NAME}, no chain/{SUMMARY_NAME} and no run folders; pass a run "
            "folder or an output tree written by `compt chain run` (or a folder of them, one per seed)"
        )
    return [x for c in found for x in _expand(c)]


def collect_runs(paths: Sequence[str | Path], baselines: Sequence[str | Path] = ()) -> tuple[Run, Run | None]:
    """The run and the baseline that ``compt report PATH... [--baseline PATH...]`` renders.

    Each path is a run folder (``summary.json``), a ``compt chain run`` output tree (its ``chain/``,
    with its ``individual/`` as baseline) or a folder of those (one per seed). Without ``baselines``,
    the run folders of another kind than the first one given are the baseline (``compt report
    CHAIN INDIVIDUAL``, as before seeds); several of one kind are seeds, pooled (:func:`pool_seeds`).
    """
    pairs = [x for p in paths for x in _expand(Path(p))]
    runs = [load_run(p) for p, _ in pairs]
    kind = runs[0].summary["kind"]
    ours = [r for r in runs if r.summary["kind"] == kind]
    if baselines:
        theirs = [load_run(p) for b in baselines for p, _ in _expand(Path(b))]
    else:
        theirs = [r for r in runs if r.summary["kind"] != kind] + [
            load_run(t) for _, t in pairs if t is not None
        ]
    return pool_seeds(ours), (pool_seeds(theirs) if theirs else None)
