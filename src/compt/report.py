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
          "metrics": {"mean_zeroshot_top1": 30.2, ...},  # final evaluation (compt.evaluate keys)
          "metrics_file": "ViT-S-16/metrics.jsonl" | null, # relative to the summary's folder
          "export": "ViT-S-16/export" | null,              # open_clip local-dir export, relative
          "until_lossless": {"stopped_at_step": 900, "epochs_needed": 17.1} | null
        }
      ],
      "config": {...}                     # the run's config as a plain dict
    }

Unknown extra keys are allowed and ignored. ``metrics.jsonl`` (one per member, written by the engine)
holds one JSON object per line; training lines carry ``step``, ``epoch``, ``samples_seen``,
``train_macs`` and ``wall_s`` (both cumulative within the member), ``loss``, ``task_loss``,
``distill_loss``, ``lr``; evaluation lines carry ``step`` and metric keys (``zeroshot/<task>/top1``,
``mean_zeroshot_top1``, ``retrieval/<set>/i2t_r1``, ...), and ``train_macs`` where known (otherwise it
is interpolated from the training lines by step). All metrics are percentages.

Outputs in the report folder: ``report.md``, ``metric_vs_macs.png`` (Fig. 1: metric against the
pipeline's cumulative training MACs, chain vs baseline), ``epochs_per_link.png`` (Fig. 8) and, with a
baseline, ``acceleration.png`` (Fig. 5: individual and accumulated acceleration ratios).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compt.families import normalize_name

__all__ = [
    "Run", "load_run", "read_metrics", "member_curve", "render_markdown", "resolve_runs", "write_report", "MAIN_METRICS",
]

SUMMARY_NAME = "summary.json"
# The Table 2 columns, in order, when present: ImageNet/VTAB+-style zero-shot top-1 and COCO-style R@1.
MAIN_METRICS = {"mean_zeroshot_top1": "Zero-shot top-1", "mean_retrieval_r1": "Retrieval R@1"}
LOSSLESS_POINTS = 0.5  # paper §4: lossless = less than 0.5 points below the baseline
_MEMBER_KEYS = {
    "name": str, "teacher": (str, type(None)), "epochs": (int, float), "steps": int, "samples_seen": int,
    "train_macs": (int, float), "accumulated_train_macs": (int, float), "wall_s": (int, float),
    "accumulated_wall_s": (int, float), "metrics": dict,
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
        raise ValueError(f"{file}: top-level 'kind' must be \"chain\" or \"individual\"")
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
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
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
    return 10.0**exp, (f"×10^{exp}" if exp else "")


def _macs(v: float, scale: float) -> str:
    return f"{v / scale:#.3g}"


def _num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ratio(base: float | None, ours: float | None) -> str:
    return f" ({base / ours:.2f}×)" if base is not None and ours else ""


def _hours(v: float) -> str:
    h = v / 3600
    return f"{h:#.3g}" if h < 100 else f"{h:.0f}"


def _metrics_present(runs: list[Run]) -> list[str]:
    seen = {k for r in runs for m in r.members for k in m["metrics"]}
    return [k for k in MAIN_METRICS if k in seen]


def render_markdown(run: Run, baseline: Run | None = None, figures: list[str] = ()) -> str:
    """The Markdown report: Table 2 (metrics, gaps, individual/accumulated MACs and hours with ratios),
    a baseline cost table, per-task results, and links to ``figures`` (file names next to the report)."""
    runs = [run] + ([baseline] if baseline else [])
    mains = _metrics_present(runs)
    scale, unit = _macs_unit([m[k] for r in runs for m in r.members for k in ("train_macs", "accumulated_train_macs")])
    title = f"{run.summary.get('family', '?')} family — {run.label}" + (" vs baseline" if baseline else "")
    out = [f"# {title}", ""]
    if baseline:
        out.append(f"Run: `{run.root}`; baseline: `{baseline.root}`. Metrics in %, Δ in points; "
                   f"ratios are baseline / {run.label} cost. Lossless: Δ ≥ −{LOSSLESS_POINTS} on every metric.")
    else:
        out.append(f"Run: `{run.root}`. Metrics in %. No baseline given: no gaps or ratios.")
    out += ["", "## Table 2", ""]

    head = ["Model", "Teacher", "Epochs"]
    for k in mains:
        head += [MAIN_METRICS[k]] + ([f"{MAIN_METRICS[k]} baseline", f"{MAIN_METRICS[k]} Δ"] if baseline else [])
    head += [f"MACs indiv. ({unit or '1'})", "MACs accum.", "Wall-clock h indiv.", "Wall-clock h accum."]
    if baseline and mains:
        head.append("Lossless")
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lossless_all = True
    for m in run.members:
        b = baseline.member(m["name"]) if baseline else None
        row = [m["name"], m["teacher"] or "—", f"{m['epochs']:.4g}"]
        ok = b is not None
        for k in mains:
            ours, base = m["metrics"].get(k), (b["metrics"].get(k) if b else None)
            row.append(_num(ours))
            if baseline:
                gap = ours - base if ours is not None and base is not None else None
                row += [_num(base), "—" if gap is None else f"{gap:+.2f}"]
                ok = ok and gap is not None and gap >= -LOSSLESS_POINTS
        for key in ("train_macs", "accumulated_train_macs", "wall_s", "accumulated_wall_s"):
            cell = _hours(m[key]) if key.endswith("wall_s") else _macs(m[key], scale)
            row.append(cell + _ratio(b[key] if b else None, m[key]))
        if baseline and mains:
            row.append("yes" if ok else "no")
            lossless_all &= ok
        out.append("| " + " | ".join(row) + " |")

    if baseline:
        out += ["", "### Baseline cost", "",
                f"| Model | Epochs | MACs indiv. ({unit or '1'}) | MACs accum. | Wall-clock h indiv. | Wall-clock h accum. |",
                "|---|---|---|---|---|---|"]
        for b in baseline.members:
            out.append(f"| {b['name']} | {b['epochs']:.4g} | {_macs(b['train_macs'], scale)} | "
                       f"{_macs(b['accumulated_train_macs'], scale)} | {_hours(b['wall_s'])} | "
                       f"{_hours(b['accumulated_wall_s'])} |")
        last, blast = run.members[-1], baseline.member(run.members[-1]["name"])
        total_b = max(x["accumulated_train_macs"] for x in baseline.members)
        total_h = max(x["accumulated_wall_s"] for x in baseline.members)
        out += ["", f"Whole family: {_macs(last['accumulated_train_macs'], scale)} training MACs ({unit or '1'}) "
                f"for {run.label} vs {_macs(total_b, scale)} for the baseline "
                f"({total_b / last['accumulated_train_macs']:.2f}× less), {_hours(last['accumulated_wall_s'])} vs "
                f"{_hours(total_h)} wall-clock hours."
                + (f" Training only the largest member alone costs {_macs(blast['train_macs'], scale)}."
                   if blast else "")]
        if mains:
            out.append(f"Lossless for every member: {'yes' if lossless_all else 'no'}.")

    keys = sorted({k for r in runs for m in r.members for k in m["metrics"] if k not in MAIN_METRICS})
    if keys:
        names = [m["name"] for m in run.members]
        out += ["", "## Per-task results", "", "| Metric | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for k in keys:
            cells = []
            for m in run.members:
                b = baseline.member(m["name"]) if baseline else None
                base = b["metrics"].get(k) if b else None
                cells.append(_num(m["metrics"].get(k)) + (f" ({_num(base)})" if base is not None else ""))
            out.append(f"| `{k}` | " + " | ".join(cells) + " |")
        if baseline:
            out.append("\nBaseline values in parentheses.")

    if figures:
        out += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(out) + "\n"


# --- figures ----------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.5):
    # A bare Figure renders with the Agg canvas and never touches pyplot's global backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def plot_metric_vs_macs(run: Run, baseline: Run | None, metric: str, path: Path) -> Path:
    """Fig. 1: ``metric`` against the pipeline's cumulative training MACs, one line per run."""
    fig = _figure()
    ax = fig.add_subplot()
    for r, style in ((run, "-"), (baseline, "--")):
        if r is None:
            continue
        for i, m in enumerate(r.members):
            pts = member_curve(r, m, metric)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, marker="o", ms=3, color=f"C{i}", label=f"{r.label} {m['name']}")
            ax.annotate(m["name"], (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("cumulative training MACs")
    ax.set_ylabel(f"{MAIN_METRICS.get(metric, metric)} (%)")
    ax.set_title(f"{metric} vs training cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_epochs_per_link(run: Run, baseline: Run | None, path: Path) -> Path:
    """Fig. 8: epochs trained per member (and the baseline's, and epochs needed to reach it if known)."""
    fig = _figure()
    ax = fig.add_subplot()
    names = [m["name"] for m in run.members]
    width = 0.4 if baseline else 0.6
    xs = range(len(names))
    bars = ax.bar([x - (width / 2 if baseline else 0) for x in xs], [m["epochs"] for m in run.members],
                  width, label=run.label, color="C0")
    ax.bar_label(bars, fmt="%.3g", fontsize=7)
    if baseline:
        base = [(baseline.member(n) or {}).get("epochs", 0) for n in names]
        ax.bar_label(ax.bar([x + width / 2 for x in xs], base, width, label="Baseline", color="C7"), fmt="%.3g", fontsize=7)
    shift = width / 2 if baseline else 0.0
    needed = [(x - shift, (m.get("until_lossless") or {}).get("epochs_needed")) for x, m in zip(xs, run.members)]
    needed = [(x, e) for x, e in needed if isinstance(e, (int, float))]
    if needed:
        ax.plot(*zip(*needed), "k*", ms=9, label="epochs needed (lossless)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("epochs")
    ax.set_title("Training epochs per link")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_acceleration(run: Run, baseline: Run, path: Path) -> Path:
    """Fig. 5: individual and accumulated acceleration ratios (baseline / chain) in MACs and wall-clock."""
    fig = _figure(9.0, 4.0)
    pairs = [(m, baseline.member(m["name"])) for m in run.members]
    pairs = [(m, b) for m, b in pairs if b is not None]
    names = [m["name"] for m, _ in pairs]
    for j, (title, macs_key, wall_key) in enumerate((
        ("individual", "train_macs", "wall_s"), ("accumulated", "accumulated_train_macs", "accumulated_wall_s"),
    )):
        ax = fig.add_subplot(1, 2, j + 1)
        for k, (label, key) in enumerate((("training MACs", macs_key), ("wall-clock", wall_key))):
            ratios = [b[key] / m[key] if m[key] else 0.0 for m, b in pairs]
            bars = ax.bar([x + (k - 0.5) * 0.4 for x in range(len(names))], ratios, 0.4, label=label, color=f"C{k}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("acceleration ratio (×)")
        ax.set_title(f"{title} acceleration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


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

    ``metric`` is the curve's y axis (default: the first of ``MAIN_METRICS`` that the run has).
    """
    run = run if isinstance(run, Run) else load_run(run)
    baseline = baseline if isinstance(baseline, Run) or baseline is None else load_run(baseline)
    out = Path(out_dir) if out_dir is not None else run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = [run] + ([baseline] if baseline else [])
    if metric is None:  # the run's headline metric, else the first Table 2 metric it has
        present = [k for k in [run.summary.get("metric")] + _metrics_present(runs)
                   if k and any(k in m["metrics"] for m in run.members)]
        metric = present[0] if present else None
    elif not any(metric in m["metrics"] for r in runs for m in r.members):
        known = sorted({k for r in runs for m in r.members for k in m["metrics"]})
        raise ValueError(f"metric {metric!r} is in no member's final metrics; known: {', '.join(known) or 'none'}")
    figures = []
    if metric is not None:
        figures.append(plot_metric_vs_macs(run, baseline, metric, out / "metric_vs_macs.png").name)
    figures.append(plot_epochs_per_link(run, baseline, out / "epochs_per_link.png").name)
    if baseline:
        figures.append(plot_acceleration(run, baseline, out / "acceleration.png").name)
    report = out / "report.md"
    report.write_text(render_markdown(run, baseline, figures), encoding="utf-8")
    return report
