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
      "metric": "mean_zeroshot_top1",     # optional: headline metric, the default y axis of Fig. 1
      "paradigm": "clip",                 # optional (default clip): who answers metric_rules' questions
      "metric_rules": {                   # optional: how each metric compares (issue 12), else the paradigm's
        "val_loss": {"higher_is_better": false, "tolerance": {"absolute": 0.01, "relative": 0.0},
                     "unit": "nats"}
      }
    }

Other keys (e.g. ``name``, a member's ``planned_epochs``) are allowed and ignored.

``metrics.jsonl`` (one per member, written by ``compt.engine.train``) holds one JSON object per line. Training
lines (``"kind": "train"``) carry ``step``, ``epoch``, ``samples_seen``, ``train_macs`` and ``wall_s``
(both cumulative within the member), the losses (``loss``, ``loss_task``, ``loss_ifd``) and ``lr``;
evaluation lines (``"kind": "eval"``) carry ``step`` and the metric keys of the paradigm's evaluation
(``zeroshot/<task>/top1``, ``mean_zeroshot_top1``, ``retrieval/<set>/i2t_r1``, ...), and
``train_macs`` where known (otherwise it is interpolated from the other lines by step). The report
reads only ``step``, ``train_macs`` and metric keys.

A gap is how much worse a member is than its twin, in the metric's own units, positive when worse
(:func:`compt.lossless.shortfall`: an accuracy below, a loss above). Either side may be several seeds
(:mod:`compt.report.runs`): the tables show means ± seed standard deviation.

Outputs in the report folder: ``report.md``, ``metric_vs_macs.png`` (Fig. 1, :mod:`compt.report.curves`:
each member's metric against the pipeline's cumulative training MACs, chain vs baseline, seed bands),
``epochs_per_link.png`` (Fig. 8) and, with a baseline, ``acceleration.png`` (Fig. 5: individual and
accumulated acceleration ratios).
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compt.lossless import (
    CHANCE_MARGIN_FRACTION,
    CHANCE_MARGIN_LOSS_FRACTION,
    CHANCE_MARGIN_POINTS,
    CHANCE_PREFIX,
    MetricRule,
    at_chance,
    chance_level,
    comparable,
    comparison_warnings,
    gap,
    verdict,
)
from compt.report.finetune import finetune_section
from compt.report.runs import Run, load_run, pool_seeds, seed_warnings

__all__ = ["render_markdown", "write_report", "report_warnings", "MAIN_METRICS"]

# The Table 2 columns, in order, when present: ImageNet/VTAB+-style zero-shot top-1 and COCO-style R@1,
# and the held-out validation loss (issue 12: the low-noise metric, lower is better).
# An LM's: validation loss (nats per token) and bits per byte, both lower-is-better.
MAIN_METRICS = {
    "mean_zeroshot_top1": "Zero-shot top-1",
    "mean_retrieval_r1": "Retrieval R@1",
    "val_loss": "Val. loss",
    "val_bpb": "Val. bits/byte",
}


# --- Markdown ------------------------------------------------------------------------------------


def _macs_unit(values: list[float]) -> tuple[float, str]:
    top = max((v for v in values if v > 0), default=1.0)
    exp = 3 * max(0, int(math.floor(math.log10(top))) // 3)
    return 10.0**exp, (f"×10^{exp}" if exp else "1")


def _macs(v: float, scale: float) -> str:
    return f"{v / scale:#.3g}".rstrip(".")  # 3 significant digits, kept (1.50), no bare point (113)


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


def _rules(run: Run, keys: Sequence[str]) -> dict[str, MetricRule]:
    """How each metric compares: the run's ``metric_rules`` (its headline's tolerance is the spec's)."""
    return {k: run.rule(k) for k in keys}


def _digits(rule: MetricRule) -> int:
    return 2 if rule.unit == "%" else 3  # a loss moves in the third decimal


def _cell(m: dict[str, Any], key: str, rule: MetricRule) -> str:
    """A member's metric (± its seed std when pooled), marked when no better than a blind guess."""
    d = _digits(rule)
    std = (m.get("metrics_std") or {}).get(key)
    spread = f" ± {std:.{d}f}" if m.get("num_seeds", 1) > 1 and std is not None else ""
    marked = " (at chance)" if at_chance(m["metrics"], key, rule.higher_is_better) else ""
    return _num(m["metrics"].get(key), d) + spread + marked


def _table2(run: Run, baseline: Run | None, mains: list[str], scale: float, unit: str, tu) -> list[str]:
    """Table 2 rows: per member its metrics (with the baseline's and the gap), cost and ratios."""
    rules = _rules(run, mains)
    head = ["Model", "Teacher", "Epochs"]
    for k in mains:
        head += [MAIN_METRICS[k]] + (
            [f"{MAIN_METRICS[k]} baseline", f"{MAIN_METRICS[k]} gap"] if baseline else []
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
            row.append(_cell(m, k, rules[k]))
            if baseline:
                d = gap(m, b, k, rules[k].higher_is_better)
                gap_cell = "—" if d is None else f"{d:+.{_digits(rules[k])}f}"
                row += [_cell(b, k, rules[k]) if b else "—", gap_cell]
        for key in ("train_macs", "accumulated_train_macs", "wall_s", "accumulated_wall_s"):
            cell = _time(m[key], tu) if key.endswith("wall_s") else _macs(m[key], scale)
            row.append(cell + _ratio(b[key] if b else None, m[key]))
        if baseline and mains:
            row.append(verdict(m, b, mains, comparable(run.summary, baseline.summary), rules))
        out.append("| " + " | ".join(row) + " |")
    return out


def _chance(runs: list[Run], key: str) -> float | None:
    """The chance level of ``key`` (the same eval sets give every member the same one)."""
    return next(
        (c for r in runs for m in r.members if (c := chance_level(m["metrics"], key)) is not None), None
    )


def _shortfalls(run: Run, baseline: Run, mains: list[str]) -> list[str]:
    """``tiny-M: Val. loss 0.024 nats worse (tolerance 0.01 nats)`` for each metric not lossless."""
    rules = _rules(run, mains)
    out = []
    for m in run.members:
        b = baseline.member(m["name"])
        for k in mains:
            d, rule = gap(m, b, k, rules[k].higher_is_better), rules[k]
            if d is None or b is None or d <= rule.tolerance.allowed(b["metrics"][k]):
                continue
            if all(at_chance(x["metrics"], k, rule.higher_is_better) for x in (m, b)):
                continue  # left out of the verdict (compt.lossless.verdict)
            unit = {"%": " points", "": ""}.get(rule.unit, f" {rule.unit}")
            out.append(
                f"{m['name']}: {MAIN_METRICS[k]} {d:.{_digits(rule)}f}{unit} worse "
                f"(tolerance {rule.tolerance.describe(rule.unit)})"
            )
    return out


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
    lossless = _lossless_clause(run, baseline, mains)
    if lossless:
        out.append(f"{lossless}.")
    return out


def _lossless_clause(run: Run, baseline: Run, mains: list[str], on: str = "") -> str | None:
    """``Lossless for every member<on>: yes`` / ``no (why)`` / ``not established (...)``; None without
    metrics."""
    if not mains:
        return None
    head = f"Lossless for every member{on}"
    same, rules = comparable(run.summary, baseline.summary), _rules(run, mains)
    verdicts = {m["name"]: verdict(m, baseline.member(m["name"]), mains, same, rules) for m in run.members}
    unknown = [name for name, v in verdicts.items() if v.startswith("n/a")]
    if unknown:
        return f"{head}: not established ({', '.join(unknown)}: see the warnings)"
    if all(v.startswith("yes") for v in verdicts.values()):
        return f"{head}: yes"
    worse = _shortfalls(run, baseline, mains) or ["a member lacks a metric its baseline has"]
    return f"{head}: no ({'; '.join(worse)})"


def verdict_sentence(run: Run, baseline: Run | None) -> str | None:
    """One sentence: was ``run`` lossless against ``baseline`` on its headline metric (``eval.metric``;
    every Table 2 metric when it has none), and at what saving in training MACs (issue 12: the demo's
    report says both at once); None without a baseline."""
    if baseline is None or not run.members:
        return None
    mains, on = _metrics_present([run, baseline]), ""
    headline = run.summary.get("metric")
    if headline in mains:
        mains, on = [headline], f" on {MAIN_METRICS[headline]}"
    ours = run.members[-1]["accumulated_train_macs"]
    theirs = max(x["accumulated_train_macs"] for x in baseline.members)
    saving = f"{theirs / ours:.2f}× fewer training MACs than its baseline" if ours else "no MACs counted"
    lossless = _lossless_clause(run, baseline, mains, on) or "Lossless: no metric to judge"
    return f"{run.label}: {lossless[0].lower()}{lossless[1:]}, at {saving}."


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
    rules = _rules(run, sorted(keys))
    for k in sorted(keys, key=_natural):
        cells, d = [], _digits(rules[k])
        for m in run.members:
            b = baseline.member(m["name"]) if baseline else None
            base = b["metrics"].get(k) if b else None
            cells.append(_cell(m, k, rules[k]) + (f" ({_num(base, d)})" if base is not None else ""))
        out.append(f"| `{k}` | " + " | ".join(cells) + f" | {_num(_chance(runs, k), d)} |")
    if baseline:
        out.append("\nBaseline values in parentheses.")
    return out


def _intro(run: Run, baseline: Run | None, mains: list[str]) -> str:
    """Which runs, units, the gap's sign, the lossless tolerances, chance levels and seeds, in words."""
    runs = [run] + ([baseline] if baseline else [])
    rules = _rules(run, mains)
    units = [f"{MAIN_METRICS[k]} in {rules[k].unit}" for k in mains if rules[k].unit]
    where = lambda r: ", ".join(f"`{s.root}`" for s in r.seed_runs)  # noqa: E731
    text = f"Run: {where(run)}" + (f"; baseline: {where(baseline)}." if baseline else ".")
    text += f" Metrics: {', '.join(units)}." if units else ""
    if baseline:
        tolerances = ", ".join(
            f"{MAIN_METRICS[k]} {rules[k].tolerance.describe(rules[k].unit)}" for k in mains
        )
        text += (
            f" Gap: how much worse than the baseline, in the metric's units (positive: worse; an accuracy "
            f"lower, a loss higher); ratios are baseline / {run.label} cost. Lossless: the gap at most the "
            f"tolerance on every metric (paper §4: 0.5 points)" + (f": {tolerances}." if tolerances else ".")
        )
    else:
        text += " No baseline given: no gaps or ratios."
    seeded = [r for r in runs if r.seeds]
    if seeded:
        text += " " + " ".join(
            f"{r.label}: the mean ± standard deviation over {len(r.seeds)} seeds." for r in seeded
        )
    chance = [
        f"{MAIN_METRICS[k]} {_num(c, _digits(rules[k]))}"
        for k in mains
        if (c := _chance(runs, k)) is not None
    ]
    if chance:
        text += (
            f" Chance level (a blind guess): {', '.join(chance)}; a value less than "
            f"max({CHANCE_MARGIN_POINTS:g}, {CHANCE_MARGIN_FRACTION:g} × chance) points above it (a loss: "
            f"less than {100 * CHANCE_MARGIN_LOSS_FRACTION:g} % below it) is marked 'at chance'."
        )
    return text


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
    out = [f"# {title}", ""]
    sentence = verdict_sentence(run, baseline)
    out += [f"**{sentence}**", ""] if sentence else []
    out += [_intro(run, baseline, mains), ""]
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
    """Why gaps or verdicts of this report may mean nothing, each cause named (compt.lossless), and
    why a seed spread may not be one."""
    mains = _metrics_present([run] + ([baseline] if baseline else []))
    out = comparison_warnings(run, baseline, mains, _rules(run, mains))
    return out + seed_warnings(run) + (seed_warnings(baseline) if baseline else [])


def _write_figures(run: Run, baseline: Run | None, metric: str | None, out: Path) -> list[str]:
    """Fig. 1 (metric vs cumulative MACs), Fig. 8 (epochs per link), Fig. 5 (acceleration ratios)."""
    from compt.report.curves import write_curves
    from compt.report.figures import BarPanel, plot_bar_panels

    names = [m["name"] for m in run.members]
    written = []
    label = lambda key: MAIN_METRICS.get(key, key)  # noqa: E731
    if metric is not None and write_curves(run, baseline, metric, out / "metric_vs_macs.png", label):
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


_RunLike = str | Path | Run


def _as_run(run: _RunLike | Sequence[_RunLike]) -> Run:
    if isinstance(run, (str, Path, Run)):
        return run if isinstance(run, Run) else load_run(run)
    return pool_seeds([_as_run(r) for r in run])


def write_report(
    run: _RunLike | Sequence[_RunLike],
    baseline: _RunLike | Sequence[_RunLike] | None = None,
    out_dir: str | Path | None = None,
    metric: str | None = None,
) -> Path:
    """Write ``report.md`` and its PNG figures into ``out_dir`` (default ``<run>/report``); return report.md.

    ``metric`` is the y axis of Fig. 1 (default: the summary's ``metric``, else the first of
    ``MAIN_METRICS`` that the run has). ``run``/``baseline`` are run folders, summary files or :class:`Run`,
    or a list of them: seeds of one experiment, pooled (:func:`compt.report.runs.pool_seeds`).
    """
    run = _as_run(run)
    baseline = None if baseline is None else _as_run(baseline)
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
