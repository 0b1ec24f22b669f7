"""The two plot shapes of the paper's figures (Fig. 1/5/8), drawn from plain numbers for ``compt.report``.

- :func:`plot_curve_panels` (one panel: :func:`plot_curves`): metric against cumulative training MACs,
  one line per member and run, seed spread as a band, chance level as a line (Fig. 1);
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn, not with compt
    from matplotlib.figure import Figure

__all__ = ["Curve", "CurvePanel", "BarPanel", "plot_curves", "plot_curve_panels", "plot_bar_panels"]


@dataclass(frozen=True)
class Curve:
    """One line: ``points`` are ``(x, y)``; ``color`` indexes matplotlib's cycle (C0, C1, ...).

    Curves of one label share a legend entry (e.g. a member's chain and baseline lines).
    """

    label: str
    points: Sequence[tuple[float, float]]
    color: int = 0
    dashed: bool = False
    annotation: str = ""  # written next to the last point
    spread: Sequence[float] = ()  # per point, the half-width of a band around it (e.g. a seed std)


@dataclass(frozen=True)
class CurvePanel:
    """One plot of :func:`plot_curve_panels`."""

    title: str
    ylabel: str
    curves: Sequence[Curve]
    chance: float | None = None  # drawn as a dotted line: what a blind guess scores
    xlabel: str = ""  # this panel's own x axis (e.g. seeds beside a MACs panel); empty: the figure's


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
    return plot_curve_panels([CurvePanel(title, ylabel, curves)], path, xlabel=xlabel)


def plot_curve_panels(
    panels: Sequence[CurvePanel],
    path: str | Path,
    *,
    xlabel: str,
    styles: Sequence[tuple[str, bool]] = (),
    band_label: str = "",
) -> Path:
    """Write ``panels`` side by side to ``path`` (PNG), with one legend for what is drawn.

    The legend has one entry per curve label (its colour), then each ``(label, dashed)`` of
    ``styles`` whose line style some curve has (e.g. chain solid, baseline dashed), ``band_label``
    when a spread is drawn (its glyph a band, an error bar on a curve of one point, or both, as
    drawn) and "chance" when a chance line is. Curves without points are left out.
    """
    fig = _curve_figure(panels, xlabel=xlabel, styles=styles, band_label=band_label)
    fig.savefig(path)
    return Path(path)


def _curve_figure(
    panels: Sequence[CurvePanel], *, xlabel: str, styles: Sequence[tuple[str, bool]], band_label: str
) -> Figure:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig = _figure(6.0 * len(panels) if len(panels) > 1 else 7.0, 4.5)
    entries: dict[str, Line2D] = {}
    dashed_drawn, banded, barred, chance_drawn = set(), False, False, False
    for j, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for c in panel.curves:
            if not c.points:
                continue
            xs, ys = zip(*c.points, strict=True)
            style = "--" if c.dashed else "-"
            marker = "s" if c.dashed and styles else "o"  # with styles, the marker tells them apart too
            ax.plot(xs, ys, style, marker=marker, ms=3, color=f"C{c.color}")
            dashed_drawn.add(c.dashed)
            if c.spread and any(c.spread) and len(xs) > 1:
                lo = [y - d for y, d in zip(ys, c.spread, strict=True)]
                hi = [y + d for y, d in zip(ys, c.spread, strict=True)]
                ax.fill_between(xs, lo, hi, color=f"C{c.color}", alpha=0.18, lw=0)
                banded = True
            elif c.spread and any(c.spread):  # a lone point (a final evaluation): an error bar
                ax.errorbar(xs, ys, yerr=list(c.spread), fmt="none", ecolor=f"C{c.color}", capsize=3, lw=1)
                barred = True
            if c.annotation:
                ax.annotate(
                    c.annotation, (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
            if c.label not in entries:  # with styles, the colour alone names the label
                entries[c.label] = Line2D(
                    [], [], color=f"C{c.color}", ls="-" if styles else style, marker="o", ms=3
                )
        if panel.chance is not None and any(c.points for c in panel.curves):
            ax.axhline(panel.chance, color="0.45", ls=":", lw=1.2)
            chance_drawn = True
        ax.set_xlabel(panel.xlabel or xlabel)
        if all(isinstance(x, int) for c in panel.curves for x, _ in c.points):  # seeds, steps: no 0.25
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = list(entries.values()), list(entries)
    for label, dashed in styles:
        if dashed in dashed_drawn:
            handles.append(
                Line2D([], [], color="k", ls="--" if dashed else "-", marker="s" if dashed else "o", ms=3)
            )
            labels.append(label)
    glyphs = []  # the glyph of what was drawn: a band, an error bar, or both (a tuple handle)
    if banded:
        glyphs.append(Patch(color="0.5", alpha=0.3))
    if barred:
        glyphs.append(Line2D([], [], color="0.5", ls="none", marker="|", ms=9))
    if glyphs and band_label:
        handles.append(glyphs[0] if len(glyphs) == 1 else tuple(glyphs))
        labels.append(band_label)
    if chance_drawn:
        handles.append(Line2D([], [], color="0.45", ls=":", lw=1.2))
        labels.append("chance")
    if handles:
        fig.axes[-1].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    return fig


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
