"""compt.report.figures: the legend names what is drawn (issue 12: legend entries only for what is drawn)."""

from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from compt.report.figures import Curve, CurvePanel, _curve_figure, plot_curve_panels

BAND = "seed std (3 seeds)"


def _spread_glyph(curves: list[Curve]):
    fig = _curve_figure([CurvePanel("m", "val_loss", curves)], xlabel="MACs", styles=(), band_label=BAND)
    legend = fig.axes[-1].get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    return legend.legend_handles[labels.index(BAND)] if BAND in labels else None


def test_error_bars_only_get_an_error_bar_glyph_not_a_band():
    glyph = _spread_glyph(
        [Curve("chain", [(1.0, 2.0)], spread=[0.1]), Curve("base", [(1.0, 2.5), (2.0, 2.2)], 1)]
    )
    assert isinstance(glyph, Line2D) and glyph.get_marker() == "|"


def test_a_band_gets_a_band_glyph():
    glyph = _spread_glyph([Curve("base", [(1.0, 2.5), (2.0, 2.2)], spread=[0.1, 0.2])])
    assert isinstance(glyph, Patch)


def test_no_spread_no_entry(tmp_path):
    assert _spread_glyph([Curve("base", [(1.0, 2.5), (2.0, 2.2)])]) is None
    path = plot_curve_panels(
        [CurvePanel("m", "val_loss", [Curve("b", [(1.0, 2.0)])])], tmp_path / "f.png", xlabel="x"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_panel_may_name_its_own_x_axis():
    curves = [Curve("b", [(1.0, 2.0), (2.0, 1.5)])]
    panels = [CurvePanel("cost", "val_loss", curves), CurvePanel("per seed", "diff", curves, xlabel="seed")]
    fig = _curve_figure(panels, xlabel="MACs", styles=(), band_label="")
    assert [ax.get_xlabel() for ax in fig.axes] == ["MACs", "seed"]
    assert not all(t == int(t) for t in fig.axes[1].get_xticks())  # float points: float ticks
    seeds = [CurvePanel("per seed", "diff", [Curve("b", [(0, 0.1), (1, -0.1), (2, 0.05)])])]
    ticks = _curve_figure(seeds, xlabel="seed", styles=(), band_label="").axes[0].get_xticks()
    assert len(ticks) > 1 and all(t == int(t) for t in ticks)
