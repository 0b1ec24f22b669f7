"""Render a run's structured results as the paper's Table 2 and Figures 1/5/8 (paper §5.2, §5.3).

``report`` only renders files the chain runner and the training engine wrote; it never reads logs.

``summary.json`` (one per run, written by ``compt chain run``)::

    {
      "kind": "chain" | "individual",     # a CoM-PT chain, or members trained alone (the baseline)
      "family": "vit",                    # family name
      "members": [                        # in training order, smallest first
        {
          "name": "ViT-S/16",
          "teacher": "ViT-T/16" | null,   # null for the first link and for individual runs
          "epochs": 23.45,                # epochs actually trained (fractional if stopped early)
          "steps": 1234,                  # optimizer steps
          "samples_seen": 157952,
          "train_macs": 3.2e18,           # this member's training MACs: student fwd+bwd, teacher fwd, updates
          "accumulated_train_macs": 9.4e18,  # sum of train_macs of this and all earlier members
          "wall_s": 1873.2,               # this member's wall-clock seconds
          "accumulated_wall_s": 7416.0,
          "metrics": {"mean_zeroshot_top1": 30.2, ...},  # final evaluation (the paradigm's keys)
          "metrics_file": "ViT-S-16/metrics.jsonl" | null, # relative to the summary's folder
          "export": "ViT-S-16/export" | null,              # open_clip local-dir export, relative
          "until_lossless": {"stopped_at_step": 900, "epochs_needed": 17.1} | null
        }
      ],
      "config": {...},                    # the run's config as a plain dict
      "metric": "mean_zeroshot_top1"      # optional: headline metric, the default y axis of Fig. 1
    }

Other keys (e.g. ``name``, a member's ``planned_epochs``) are allowed and ignored.

``metrics.jsonl`` (one per member, written by ``compt.engine.train``) holds one JSON object per line. Training
lines (``"kind": "train"``) carry ``step``, ``epoch``, ``samples_seen``, ``train_macs`` and ``wall_s``
(both cumulative within the member), the losses (``loss``, ``loss_task``, ``loss_ifd``) and ``lr``;
evaluation lines (``"kind": "eval"``) carry ``step`` and the metric keys of the paradigm's evaluation
(``zeroshot/<task>/top1``, ``mean_zeroshot_top1``, ``retrieval/<set>/i2t_r1``, ...), and
``train_macs`` where known (otherwise it is interpolated from the other lines by step). The report
reads only ``step``, ``train_macs`` and metric keys. All metrics are percentages.

Outputs in the report folder: ``report.md``, ``metric_vs_macs.png`` (Fig. 1: metric against the
pipeline's cumulative training MACs, chain vs baseline), ``epochs_per_link.png`` (Fig. 8) and, with a
baseline, ``acceleration.png`` (Fig. 5: individual and accumulated acceleration ratios).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compt.families import normalize_name
from compt.lossless import (
    CHANCE_MARGIN_FRACTION,
    CHANCE_MARGIN_POINTS,
    CHANCE_PREFIX,
    LOSSLESS_POINTS,
    at_chance,
    chance_level,
    comparable,
    comparison_warnings,
    gap,
    verdict,
)
from compt.report.finetune import finetune_section

__all__ = [
    "Run",
    "load_run",
    "read_metrics",
    "member_curve",
    "render_markdown",
    "resolve_runs",
    "write_report",
    "report_warnings",
    "MAIN_METRICS",
]

SUMMARY_NAME = "summary.json"
# The Table 2 columns, in order, when present: ImageNet/VTAB+-style zero-shot top-1 and COCO-style R@1.
MAIN_METRICS = {"mean_zeroshot_top1": "Zero-shot top-1", "mean_retrieval_r1": "Retrieval R@1"}
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


@dataclass(frozen=True)
class Run:
    """A loaded ``summary.json``: its folder (metrics files are relative to it) and its content."""

    root: Path
    summary: dict[str, Any]

    @property
    def members(self) -> list[dict[str, Any]]:
        return self.summary["members"]

    @property
    def label(self) -> str:
        return "CoM-PT" if self.summary["kind"] == "chain" else "Baseline"

    def member(self, name: str) -> dict[str, Any] | None:
        key = normalize_name(name)
        return next((m for m in self.members if normalize_name(m["name"]) == key), None)


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


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if x <= xs[0]:
        return ys[0] * x / xs[0] if xs[0] > 0 else ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


def member_curve(run: Run, member: dict[str, Any], metric: str) -> list[tuple[float, float]]:
    """``(cumulative pipeline training MACs, metric)`` points of one member, from its metrics.jsonl.

    x is offset by the MACs of the members trained before it, so a chain is one curve along the x
    axis. Without a metrics file or eval lines, the curve is the member's final point.
    """
    offset = member["accumulated_train_macs"] - member["train_macs"]
    points: list[tuple[float, float]] = []
    rel = member.get("metrics_file")
    if rel and (run.root / rel).is_file():
        records = read_metrics(run.root / rel)
        known = sorted({(r["step"], r["train_macs"]) for r in records if "step" in r and "train_macs" in r})
        steps, macs = [s for s, _ in known], [m for _, m in known]
        for r in records:
            if not isinstance(r.get(metric), (int, float)):
                continue
            if "train_macs" in r:
                x = r["train_macs"]
            elif steps and "step" in r:
                x = _interp(r["step"], steps, macs)
            else:
                continue
            points.append((offset + x, float(r[metric])))
    if not points and isinstance(member["metrics"].get(metric), (int, float)):
        points = [(member["accumulated_train_macs"], float(member["metrics"][metric]))]
    return sorted(points)


# --- Markdown ------------------------------------------------------------------------------------


def _macs_unit(values: list[float]) -> tuple[float, str]:
    top = max((v for v in values if v > 0), default=1.0)
    exp = 3 * max(0, int(math.floor(math.log10(top))) // 3)
    return 10.0**exp, (f"×10^{exp}" if exp else "1")


def _macs(v: float, scale: float) -> str:
    return f"{v / scale:#.3g}"


def _num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ratio(base: float | None, ours: float | None) -> str:
    return f" ({base / ours:.2f}×)" if base is not None and ours else ""


def _time_unit(values: list[float]) -> tuple[float, str]:
    """Hours as in the paper, unless the whole table is shorter (a CPU demo): then minutes or seconds."""
    top = max(values, default=0.0)
    return (3600.0, "h") if top >= 3600 else (60.0, "min") if top >= 60 else (1.0, "s")


def _time(v: float, unit: tuple[float, str]) -> str:
    return f"{v / unit[0]:#.3g}"


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _metrics_present(runs: list[Run]) -> list[str]:
    seen = {k for r in runs for m in r.members for k in m["metrics"]}
    return [k for k in MAIN_METRICS if k in seen]


def _table2(run: Run, baseline: Run | None, mains: list[str], scale: float, unit: str, tu) -> list[str]:
    """Table 2 rows: per member its metrics (with the baseline's and the gap), cost and ratios."""
    head = ["Model", "Teacher", "Epochs"]
    for k in mains:
        head += [MAIN_METRICS[k]] + (
            [f"{MAIN_METRICS[k]} baseline", f"{MAIN_METRICS[k]} Δ"] if baseline else []
        )
    head += [
        f"MACs indiv. ({unit})",
        "MACs accum.",
        f"Wall-clock {tu[1]} indiv.",
        f"Wall-clock {tu[1]} accum.",
    ]
    if baseline and mains:
        head.append("Lossless")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in run.members:
        b = baseline.member(m["name"]) if baseline else None
        row = [m["name"], m["teacher"] or "—", f"{m['epochs']:.4g}"]
        for k in mains:
            row.append(_cell(m["metrics"], k))
            if baseline:
                d = gap(m, b, k)
                row += [_cell(b["metrics"], k) if b else "—", "—" if d is None else f"{d:+.2f}"]
        for key in ("train_macs", "accumulated_train_macs", "wall_s", "accumulated_wall_s"):
            cell = _time(m[key], tu) if key.endswith("wall_s") else _macs(m[key], scale)
            row.append(cell + _ratio(b[key] if b else None, m[key]))
        if baseline and mains:
            row.append(verdict(m, b, mains, comparable(run.summary, baseline.summary)))
        out.append("| " + " | ".join(row) + " |")
    return out


def _chance(runs: list[Run], key: str) -> float | None:
    """The chance level of ``key`` (the same eval sets give every member the same one)."""
    return next(
        (c for r in runs for m in r.members if (c := chance_level(m["metrics"], key)) is not None), None
    )


def _cell(metrics: dict[str, Any], key: str) -> str:
    """A metric, marked when it is no better than a blind guess (compt.caveats)."""
    return _num(metrics.get(key)) + (" (at chance)" if at_chance(metrics, key) else "")


def _baseline_section(run: Run, baseline: Run, mains: list[str], scale: float, unit: str, tu) -> list[str]:
    out = [
        "",
        "### Baseline cost",
        "",
        f"| Model | Epochs | MACs indiv. ({unit}) | MACs accum. | "
        f"Wall-clock {tu[1]} indiv. | Wall-clock {tu[1]} accum. |",
        "|---|---|---|---|---|---|",
    ]
    for b in baseline.members:
        out.append(
            f"| {b['name']} | {b['epochs']:.4g} | {_macs(b['train_macs'], scale)} | "
            f"{_macs(b['accumulated_train_macs'], scale)} | {_time(b['wall_s'], tu)} | "
            f"{_time(b['accumulated_wall_s'], tu)} |"
        )
    last, largest = run.members[-1], baseline.member(run.members[-1]["name"])
    total_macs = max(x["accumulated_train_macs"] for x in baseline.members)
    total_s = max(x["accumulated_wall_s"] for x in baseline.members)
    ours = last["accumulated_train_macs"]
    line = (
        f"Whole family: {_macs(ours, scale)} training MACs ({unit}) for {run.label} vs "
        f"{_macs(total_macs, scale)} for the baseline ({total_macs / ours:.2f}× less), "
        f"{_time(last['accumulated_wall_s'], tu)} vs {_time(total_s, tu)} wall-clock {tu[1]}."
    )
    if largest:  # the paper's point: the whole chain costs less than the largest member alone
        line += f" Training only the largest member alone costs {_macs(largest['train_macs'], scale)}."
    out += ["", line]
    if mains:
        same = comparable(run.summary, baseline.summary)
        verdicts = {m["name"]: verdict(m, baseline.member(m["name"]), mains, same) for m in run.members}
        unknown = [name for name, v in verdicts.items() if v.startswith("n/a")]
        if unknown:
            out.append(
                f"Lossless for every member: not established ({', '.join(unknown)}: see the warnings)."
            )
        else:
            ok = all(v.startswith("yes") for v in verdicts.values())
            out.append(f"Lossless for every member: {'yes' if ok else 'no'}.")
    return out


def _per_task_section(run: Run, baseline: Run | None) -> list[str]:
    runs = [run] + ([baseline] if baseline else [])
    keys = {
        k
        for r in runs
        for m in r.members
        for k in m["metrics"]
        if k not in MAIN_METRICS and not k.startswith(CHANCE_PREFIX)
    }
    if not keys:
        return []
    names = [m["name"] for m in run.members]
    out = [
        "",
        "## Per-task results",
        "",
        "| Metric | " + " | ".join(names) + " | Chance |",
        "|" + "---|" * (len(names) + 2),
    ]
    for k in sorted(keys, key=_natural):
        cells = []
        for m in run.members:
            b = baseline.member(m["name"]) if baseline else None
            base = b["metrics"].get(k) if b else None
            cells.append(_cell(m["metrics"], k) + (f" ({_num(base)})" if base is not None else ""))
        out.append(f"| `{k}` | " + " | ".join(cells) + f" | {_num(_chance(runs, k))} |")
    if baseline:
        out.append("\nBaseline values in parentheses.")
    return out


def render_markdown(run: Run, baseline: Run | None = None, figures: Sequence[str] = ()) -> str:
    """The Markdown report: Table 2 (metrics, gaps, individual/accumulated MACs and time with ratios),
    the baseline's cost, per-task results, and links to ``figures`` (file names next to the report)."""
    runs = [run] + ([baseline] if baseline else [])
    mains = _metrics_present(runs)
    scale, unit = _macs_unit(
        [m[k] for r in runs for m in r.members for k in ("train_macs", "accumulated_train_macs")]
    )
    tu = _time_unit([m["accumulated_wall_s"] for r in runs for m in r.members])
    title = f"{run.summary.get('family', '?')} family — {run.label}" + (" vs baseline" if baseline else "")
    if baseline:
        intro = (
            f"Run: `{run.root}`; baseline: `{baseline.root}`. Metrics in %, Δ in points; ratios are "
            f"baseline / {run.label} cost. Lossless: Δ ≥ −{LOSSLESS_POINTS} on every metric (paper §4)."
        )
    else:
        intro = f"Run: `{run.root}`. Metrics in %. No baseline given: no gaps or ratios."
    chance = [f"{MAIN_METRICS[k]} {_num(_chance(runs, k))}" for k in mains if _chance(runs, k) is not None]
    if chance:
        intro += (
            f" Chance level (a blind guess): {', '.join(chance)}; a value less than "
            f"max({CHANCE_MARGIN_POINTS:g}, {CHANCE_MARGIN_FRACTION:g} × chance) points above it is marked "
            "'at chance'."
        )
    out = [f"# {title}", "", intro, ""]
    out += [f"> **Warning:** {w}" for w in report_warnings(run, baseline)]
    out += ["", "## Table 2", ""] + _table2(run, baseline, mains, scale, unit, tu)
    if baseline:
        out += _baseline_section(run, baseline, mains, scale, unit, tu)
    out += _per_task_section(run, baseline)
    out += finetune_section(run, baseline)  # issue 16: transfer of each member, when fine-tuned
    if figures:
        out += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(out) + "\n"


def report_warnings(run: Run, baseline: Run | None = None) -> list[str]:
    """Why gaps or verdicts of this report may mean nothing, each cause named (compt.lossless)."""
    return comparison_warnings(run, baseline, _metrics_present([run] + ([baseline] if baseline else [])))


def _write_figures(run: Run, baseline: Run | None, metric: str | None, out: Path) -> list[str]:
    """Fig. 1 (metric vs cumulative MACs), Fig. 8 (epochs per link), Fig. 5 (acceleration ratios)."""
    from compt.report.figures import BarPanel, Curve, plot_bar_panels, plot_curves

    runs = [r for r in (run, baseline) if r is not None]
    names = [m["name"] for m in run.members]
    written = []
    if metric is not None:
        curves = [
            Curve(f"{r.label} {m['name']}", member_curve(r, m, metric), i, r is baseline, m["name"])
            for r in runs
            for i, m in enumerate(r.members)
        ]
        # Each run's members' final points joined: the family's metric/cost frontier of Fig. 1.
        for r, color in zip(runs, (7, 8), strict=False):
            ends = [pts[-1] for m in r.members if (pts := member_curve(r, m, metric))]
            curves.append(Curve(f"{r.label} (family)", ends, color, r is baseline))
        label = f"{MAIN_METRICS.get(metric, metric)} (%)"
        plot_curves(
            curves,
            out / "metric_vs_macs.png",
            xlabel="cumulative training MACs",
            ylabel=label,
            title=f"{metric} vs training cost",
        )
        written.append("metric_vs_macs.png")
    series = [(run.label, [m["epochs"] for m in run.members])]
    if baseline:
        series.append(("Baseline", [(baseline.member(n) or {}).get("epochs", 0.0) for n in names]))
    needed = {i: (m.get("until_lossless") or {}).get("epochs_needed") for i, m in enumerate(run.members)}
    needed = {i: float(e) for i, e in needed.items() if isinstance(e, (int, float))}
    epochs = BarPanel(
        "Training epochs per link", names, series, "epochs", markers=("epochs needed (lossless)", needed)
    )
    plot_bar_panels([epochs], out / "epochs_per_link.png")
    written.append("epochs_per_link.png")
    if baseline:
        pairs = [(m, baseline.member(m["name"])) for m in run.members]
        pairs = [(m, b) for m, b in pairs if b is not None]
        panels = []
        for title, macs_key, wall_key in (
            ("individual", "train_macs", "wall_s"),
            ("accumulated", "accumulated_train_macs", "accumulated_wall_s"),
        ):
            ratios = [
                (label, [b[key] / m[key] if m[key] else 0.0 for m, b in pairs])
                for label, key in (("training MACs", macs_key), ("wall-clock", wall_key))
            ]
            panels.append(
                BarPanel(
                    f"{title} acceleration",
                    [m["name"] for m, _ in pairs],
                    ratios,
                    "acceleration ratio (×)",
                    value_fmt="%.2f",
                    hline=1.0,
                    colors=(0, 1),
                )
            )
        plot_bar_panels(panels, out / "acceleration.png")
        written.append("acceleration.png")
    return written


def resolve_runs(run: str | Path, baseline: str | Path | None = None) -> tuple[Path, Path | None]:
    """The summary files to render: ``run`` may also be a ``compt chain run`` output tree holding
    ``chain/summary.json`` (then ``individual/summary.json`` is the default baseline)."""
    run = Path(run)
    if run.is_dir() and not (run / SUMMARY_NAME).is_file() and (run / "chain" / SUMMARY_NAME).is_file():
        if baseline is None and (run / "individual" / SUMMARY_NAME).is_file():
            baseline = run / "individual"
        run = run / "chain"
    return run, (Path(baseline) if baseline is not None else None)


def write_report(
    run: str | Path | Run,
    baseline: str | Path | Run | None = None,
    out_dir: str | Path | None = None,
    metric: str | None = None,
) -> Path:
    """Write ``report.md`` and its PNG figures into ``out_dir`` (default ``<run>/report``); return report.md.

    ``metric`` is the y axis of Fig. 1 (default: the summary's ``metric``, else the first of
    ``MAIN_METRICS`` that the run has). ``run``/``baseline`` are run folders, summary files or :class:`Run`.
    """
    run = run if isinstance(run, Run) else load_run(run)
    baseline = baseline if isinstance(baseline, Run) or baseline is None else load_run(baseline)
    out = Path(out_dir) if out_dir is not None else run.root / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(out))
    except OSError as e:  # a bare errno traceback before (issue 11 item 10)
        raise ValueError(
            f"report folder {out} cannot be written ({e.strerror or e}); pass --out with a writable folder"
        ) from None
    runs = [run] + ([baseline] if baseline else [])
    if metric is None:  # the run's headline metric, else the first Table 2 metric it has
        present = [
            k
            for k in [run.summary.get("metric")] + _metrics_present(runs)
            if k and any(k in m["metrics"] for m in run.members)
        ]
        metric = present[0] if present else None
    elif not any(metric in m["metrics"] for r in runs for m in r.members):
        known = sorted({k for r in runs for m in r.members for k in m["metrics"]})
        raise ValueError(
            f"metric {metric!r} is in no member's final metrics; known: {', '.join(known) or 'none'}"
        )
    figures = _write_figures(run, baseline, metric, out)
    report = out / "report.md"
    report.write_text(render_markdown(run, baseline, figures), encoding="utf-8")
    return report
