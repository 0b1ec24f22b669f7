"""Fig. 1 of the paper: each member's metric against the cumulative training MACs, chain vs baseline.

A member's points are the eval lines of its ``metrics.jsonl`` (the evaluations during training,
``eval.every_steps``, and the final one), placed at the pipeline's cumulative training MACs: the
member's own ``train_macs`` at that step (interpolated by step from the train lines where an eval
line lacks it) plus the MACs of the members trained before it, so a chain reads as one relay.
Without a metrics file the member's curve is its final point. Over seeds (:func:`seed_curves`), the
points of one step are averaged and their sample standard deviation becomes a band.

The figure has one panel for the report's metric and one for each other metric the evaluations
during training computed (``eval.periodic``, e.g. the validation loss), each with its chance level.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compt.lossless import chance_level
from compt.report.runs import Run, read_metrics

__all__ = ["member_points", "member_curve", "SeedCurve", "seed_curves", "curve_metrics", "write_curves"]


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if x <= xs[0]:
        return ys[0] * x / xs[0] if xs[0] > 0 else ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


def member_points(run: Run, member: dict[str, Any], metric: str) -> list[tuple[int, float, float]]:
    """``(step, cumulative pipeline training MACs, metric)`` of one member, by step.

    Of two eval lines at one step (the cheap evaluation that stopped a link, then the full one) the
    later counts. Without a metrics file or eval lines: the member's final point.
    """
    offset = member["accumulated_train_macs"] - member["train_macs"]
    by_step: dict[int, tuple[float, float]] = {}
    rel = member.get("metrics_file")
    if rel and (run.root / rel).is_file():
        records = read_metrics(run.root / rel)
        known = sorted({(r["step"], r["train_macs"]) for r in records if "step" in r and "train_macs" in r})
        steps, macs = [s for s, _ in known], [m for _, m in known]
        for r in records:
            value = r.get(metric)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "step" not in r:
                continue
            if "train_macs" in r:
                x = r["train_macs"]
            elif steps:
                x = _interp(r["step"], steps, macs)
            else:
                continue
            by_step[int(r["step"])] = (offset + x, float(value))
    if not by_step and isinstance(member["metrics"].get(metric), (int, float)):
        by_step[member["steps"]] = (member["accumulated_train_macs"], float(member["metrics"][metric]))
    return [(s, x, y) for s, (x, y) in sorted(by_step.items())]


def member_curve(run: Run, member: dict[str, Any], metric: str) -> list[tuple[float, float]]:
    """``(cumulative pipeline training MACs, metric)`` points of one member (:func:`member_points`)."""
    return [(x, y) for _, x, y in member_points(run, member, metric)]


@dataclass(frozen=True)
class SeedCurve:
    """One member's curve over the seeds of a run: per evaluated step, ``(x, mean, std, seeds)``.

    ``x`` is the mean cumulative MACs, ``std`` the sample standard deviation of the metric over the
    seeds that evaluated that step (0 with one seed).
    """

    member: str
    points: tuple[tuple[float, float, float, int], ...]


def seed_curves(run: Run, metric: str) -> list[SeedCurve]:
    """The curve of each member of ``run`` (in its order), pooled over its seeds by step."""
    out = []
    for m in run.members:
        by_step: dict[int, list[tuple[float, float]]] = {}
        for seed in run.seed_runs:
            row = seed.member(m["name"])
            for step, x, y in member_points(seed, row, metric) if row else ():
                by_step.setdefault(step, []).append((x, y))
        points = []
        for _, xy in sorted(by_step.items()):
            ys = [y for _, y in xy]
            std = statistics.stdev(ys) if len(ys) > 1 else 0.0
            points.append((statistics.fmean(x for x, _ in xy), statistics.fmean(ys), std, len(ys)))
        out.append(SeedCurve(m["name"], tuple(points)))
    return out


def curve_metrics(runs: Sequence[Run], metric: str) -> list[str]:
    """The figure's panels: ``metric``, then the other metrics of the evaluations during training."""
    periodic = [
        k
        for r in runs
        for k in ((r.summary.get("config") or {}).get("eval") or {}).get("periodic") or ()
        if isinstance(k, str)
    ]
    seen = {k for r in runs for s in r.seed_runs for m in s.members for k in m["metrics"]}
    return list(dict.fromkeys([metric] + [k for k in periodic if k in seen]))


def _scale(values: list[float]) -> tuple[float, str]:
    top = max((v for v in values if v > 0), default=1.0)
    exp = 3 * max(0, int(math.floor(math.log10(top))) // 3)
    return 10.0**exp, (f" ($\\times 10^{{{exp}}}$)" if exp else "")  # mathtext: ×10¹²


def write_curves(
    run: Run, baseline: Run | None, metric: str, path: str | Path, label: Callable[[str], str]
) -> Path | None:
    """Write Fig. 1 to ``path`` (PNG): a panel per metric of :func:`curve_metrics`; None if nothing to draw.

    Colour: the member; solid: ``run``, dashed: ``baseline``; band: ±1 seed standard deviation;
    dotted: the chance level. ``label(key)`` names a metric on its axis.
    """
    from compt.report.figures import Curve, CurvePanel, plot_curve_panels

    runs = [r for r in (run, baseline) if r is not None]
    names = list(dict.fromkeys(m["name"] for r in runs for m in r.members))
    panels, xs, seeds = [], [], 1
    for key in curve_metrics(runs, metric):
        curves = []
        for r in runs:
            for c in seed_curves(r, key):
                if c.points:
                    curves.append((r, c))
                    xs += [p[0] for p in c.points]
                    seeds = max(seeds, max(p[3] for p in c.points))
        if curves:
            panels.append((key, curves))
    if not panels:
        return None
    scale, unit = _scale(xs)
    drawn = []
    for key, curves in panels:
        rule = run.rule(key)
        chance = next(
            (c for r in runs for m in r.members if (c := chance_level(m["metrics"], key)) is not None), None
        )
        lines = [
            Curve(
                c.member,
                [(x / scale, y) for x, y, _, _ in c.points],
                color=names.index(c.member),
                dashed=r is baseline,
                spread=[s for _, _, s, _ in c.points],
            )
            for r, c in curves
        ]
        direction = "higher is better" if rule.higher_is_better else "lower is better"
        ylabel = label(key) + (f" ({rule.unit})" if rule.unit else "")
        drawn.append(CurvePanel(f"{label(key)} ({direction})", ylabel, lines, chance))
    return plot_curve_panels(
        drawn,
        path,
        xlabel=f"cumulative training MACs{unit}",
        styles=[(r.label, r is baseline) for r in runs],
        band_label=f"±1 s.d. over {seeds} seeds" if seeds > 1 else "",
    )
