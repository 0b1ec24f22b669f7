"""The two plot shapes of the paper's figures (Fig. 1/5/8), drawn from plain numbers for ``compt.report``.

- :func:`plot_curves`: metric against cumulative training MACs, one line per member and run (Fig. 1);
- :func:`plot_bar_panels`: grouped bars per member, optionally with star markers and a reference line
  (epochs per link, Fig. 8; acceleration ratios, Fig. 5).

The functions know nothing about runs or files other than the PNG they write. They draw on a bare
matplotlib ``Figure`` (Agg canvas) and never touch pyplot's global backend, so importing compt in a
notebook changes nothing there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Curve", "BarPanel", "plot_curves", "plot_bar_panels"]


@dataclass(frozen=True)
class Curve:
    """One line: ``points`` are ``(x, y)``; ``color`` indexes matplotlib's cycle (C0, C1, ...)."""

    label: str
    points: Sequence[tuple[float, float]]
    color: int = 0
    dashed: bool = False
    annotation: str = ""  # written next to the last point


@dataclass(frozen=True)
class BarPanel:
    """Grouped bars: one group per name in ``groups``, one bar per ``series`` entry ``(label, values)``."""

    title: str
    groups: Sequence[str]
    series: Sequence[tuple[str, Sequence[float]]]
    ylabel: str
    value_fmt: str = "%.3g"
    hline: float | None = None  # a reference line (1x for acceleration ratios)
    # (label, {group index: value}) drawn as stars over the first series' bars
    markers: tuple[str, dict[int, float]] | None = None
    colors: Sequence[int] = field(default=(0, 7, 1, 2))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def plot_curves(curves: Sequence[Curve], path: str | Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """Write a line plot of ``curves`` to ``path`` (PNG); curves without points are left out."""
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    for c in curves:
        if not c.points:
            continue
        xs, ys = zip(*c.points, strict=True)
        ax.plot(xs, ys, "--" if c.dashed else "-", marker="o", ms=3, color=f"C{c.color}", label=c.label)
        if c.annotation:
            ax.annotate(c.annotation, (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(c.points for c in curves):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_bar_panels(panels: Sequence[BarPanel], path: str | Path) -> Path:
    """Write ``panels`` side by side as grouped bar charts to ``path`` (PNG)."""
    fig = _figure(4.5 * len(panels) if len(panels) > 1 else 7.0, 4.5 if len(panels) == 1 else 4.0)
    for j, p in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        width = 0.8 / max(len(p.series), 1)
        offsets = [(k - (len(p.series) - 1) / 2) * width for k in range(len(p.series))]
        for k, (label, values) in enumerate(p.series):
            xs = [g + offsets[k] for g in range(len(p.groups))]
            bars = ax.bar(xs, values, width, label=label, color=f"C{p.colors[k % len(p.colors)]}")
            ax.bar_label(bars, fmt=p.value_fmt, fontsize=7)
        if p.markers and p.markers[1]:
            label, at = p.markers
            first = offsets[0] if offsets else 0.0
            ax.plot([g + first for g in at], list(at.values()), "k*", ms=9, label=label)
        if p.hline is not None:
            ax.axhline(p.hline, color="k", lw=0.8)
        ax.margins(y=0.12)  # room for the value labels above the tallest bar
        ax.set_xticks(range(len(p.groups)), list(p.groups))
        ax.set_ylabel(p.ylabel)
        ax.set_title(p.title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
