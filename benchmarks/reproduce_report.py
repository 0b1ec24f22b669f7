"""Markdown tables and PNG figures of ``benchmarks/reproduce.py`` results (Tables 2/4, Fig. 4, 6, 7)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from compt.report.figures import BarPanel, Curve, plot_bar_panels, plot_curves


def _n(v: float, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _digits(results: dict[str, Any]) -> int:
    """Decimals of the headline metric: 3 for a loss (nats), 1 for a percentage."""
    return 1 if results.get("higher_is_better", True) else 3


def _pm(mean: float, std: float, seeds: int, digits: int = 1) -> str:
    return _n(mean, digits) if seeds < 2 else f"{_n(mean, digits)} ± {_n(std, digits)}"


def _chain_table(v: dict[str, Any], d: int = 1) -> list[str]:
    lines = [
        "| member | steps | baseline | chain | gap | tolerance | lossless | MACs x (indiv.) | "
        "MACs x (accum.) | wall x (indiv.) | wall x (accum.) |",
        "|" + "---|" * 11,
    ]
    n = len(v["seeds"])
    for r in v["rows"]:
        if r["first"]:
            lines.append(
                f"| {r['member']} | {r['steps']} | {_pm(r['baseline_mean'], r['baseline_std'], 3, d)} | "
                f"= baseline (first member) | | | | 1.00 | 1.00 | 1.00 | 1.00 |"
            )
            continue
        lines.append(
            f"| {r['member']} | {r['steps']} | {_pm(r['baseline_mean'], r['baseline_std'], 3, d)} | "
            f"{_pm(r['chain_mean'], r['chain_std'], n, d)} | {_n(r['gap'], d + 1)} | "
            f"{_n(r['tolerance'], d + 1)} | "
            f"{'yes' if r['lossless'] else 'no'} | {_n(r['individual_macs_x'], 2)} | "
            f"{_n(r['accumulated_macs_x'], 2)} | {_n(r['individual_wall_x'], 2)} | "
            f"{_n(r['accumulated_wall_x'], 2)} |"
        )
    return lines


def _summary_line(v: dict[str, Any], d: int = 1) -> str:
    s = v["summary"]
    return (
        f"accumulated MACs acceleration {_n(s['accumulated_macs_x'], 2)}x, "
        f"wall {_n(s['accumulated_wall_x'], 2)}x, "
        f"worst gap {_n(s['worst_gap'], d + 1)}, lossless: {'yes' if s['lossless'] else 'no'}"
    )


def _variants_table(variants: list[dict[str, Any]], label, d: int = 1) -> list[str]:
    lines = [
        "| variant | members | per-member metric (gap to baseline) | accum. MACs x | worst gap | lossless |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        cells = ", ".join(
            f"{r['member']} {_n(r['chain_mean'], d)} ({'first' if r['first'] else _n(r['gap'], d)})"
            for r in v["rows"]
        )
        s = v["summary"]
        lines.append(
            f"| {label(v)} | {len(v['members'])} | {cells} | {_n(s['accumulated_macs_x'], 2)} | "
            f"{_n(s['worst_gap'], d + 1)} | {'yes' if s['lossless'] else 'no'} |"
        )
    return lines


def _baseline_tables(results: dict[str, Any]) -> list[str]:
    proto, base, d = results["protocol"], results["baselines"], _digits(results)
    steps, ref = proto["baseline_steps"], results["reference_steps"]
    lines = [
        "| member | " + " | ".join(f"{s} steps" for s in steps) + f" | doubling {ref} -> {2 * ref} | "
        f"converged | {len(proto['seeds'])} seeds at {ref} | per seed |",
        "|" + "---|" * (len(steps) + 5),
    ]
    for m, b in base.items():
        sweep = " | ".join(
            _n(b["sweep"][str(s)] if str(s) in b["sweep"] else b["sweep"][s], d) for s in steps
        )
        conv = {True: "yes", False: "**no**", None: "–"}[b["converged"]]
        lines.append(
            f"| {m} | {sweep} | {_n(b['doubling_gain'], d)} | {conv} | "
            f"{_pm(b['mean'], b['std'], len(b['per_seed']), d)} | "
            + " / ".join(_n(v, d) for v in b["per_seed"])
            + " |"
        )
    lines += [
        "",
        "Doubling: what twice the reference schedule bought at seed 0 (positive: better); converged "
        f"when its size is below the member's lossless tolerance, max({results['base_tolerance']:g}, "
        "2 x its seed std at the reference).",
    ]
    return lines


def _family_table(results: dict[str, Any]) -> list[str]:
    d = _digits(results)
    lines = [
        "| pair | MACs x per step | gap (smaller worse by) | max seed std | gap / std | >= 3 std |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["family"]:
        lines.append(
            f"| {r['pair']} | {_n(r['macs_x'], 2)} | {_n(r['gap'], d)} | {_n(r['std'], d + 1)} | "
            f"{_n(r['sigmas'], 1)} | {'yes' if r['separated'] else '**no**'} |"
        )
    return lines


def _task_table(results: dict[str, Any]) -> list[str]:
    base, chance = results["baselines"], results.get("chance", {})
    first = next(iter(base.values()))["tasks"]
    keys = [k for k in first if k.startswith("zeroshot/") or k.startswith("mean_") or k.endswith("_r10")]
    keys += [k for k in first if k == "val_loss"]  # val/synthetic/loss is the same number
    keys = [k for k in keys if not k.startswith("chance/")]  # chance levels: the table's last row
    lines = [
        "| member | " + " | ".join(k.removeprefix("zeroshot/").removesuffix("/top1") for k in keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]
    for m, b in base.items():
        cells = [_pm(*b["tasks"][k], len(b["per_seed"]), 3 if "loss" in k else 1) for k in keys]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("| chance | " + " | ".join(_n(chance.get(k)) for k in keys) + " |")
    verdicts = results.get("informative", {})
    if verdicts:
        lines += [
            "",
            "Informative tasks (smallest member clearly above chance and largest clearly below 100: "
            "by max(5 pt, 3 seed std) each): "
            + ", ".join(f"{k.split('/')[1]} {'yes' if v else 'no'}" for k, v in verdicts.items())
            + ".",
        ]
    return lines


def render(results: dict[str, Any], figures: list[str]) -> str:
    proto, main, d = results["protocol"], results["main"], _digits(results)
    direction = "higher is better" if results.get("higher_is_better", True) else "lower is better"
    lines = [
        "# compt reproduce: does the chain pay on the embedded data?",
        "",
        f"Command: `{results.get('command', '')}` ({results['workers']} workers, "
        f"{results['wall_minutes']:.1f} min wall this sitting; {results.get('cpu_hours', 0):.2f} CPU hours "
        "over all runs). Raw numbers: `results.json`. Findings and caveats: "
        "`docs/reproduce.md`.",
        "",
        f"Family `{Path(proto['family']).name}`, chain {' -> '.join(proto['members'])}; headline metric "
        f"`{results['metric']}` ({direction}); zero-shot tasks {', '.join(proto['eval_tasks'])} "
        f"({proto['eval_images']} images each), validation loss on {proto['val_images']} held-out images "
        f"in batches of {proto['val_batch']}; batch {proto['batch']}, lr {proto['lr']}, "
        f"{proto['num_samples']} training scenes, alpha {proto['alpha']}.",
        "",
        f"## Headline: {len(proto['members'])}-member chain at link fraction {results['chosen_fraction']:g}, "
        f"seeds {main['seeds']}",
        "",
        _summary_line(main, d) + ".",
        "",
        *_chain_table(main, d),
        "",
        "Gap = how much worse the chain is than its baseline's mean, in the metric's units (positive: "
        f"worse). Tolerance = max({results['base_tolerance']:g}, 2 x baseline seed std). MACs: the "
        "engine's count (teacher forward included).",
        "",
        f"## The family (issue 12, criterion 1): baselines at {results['reference_steps']} steps",
        "",
        *_family_table(results),
        "",
        f"## Baselines (Fig. 4): schedule sweep at seed 0, every seed at {results['reference_steps']} steps",
        "",
        *_baseline_tables(results),
        "",
        "Per task (mean ± std over seeds, reference schedule):",
        "",
        *_task_table(results),
        "",
        "## Link length sweep (seed 0): each link its own complete cosine schedule",
        "",
        *_variants_table(results["sweep"], lambda v: f"fraction {v['fraction']:g}", d),
    ]
    groups = {
        "alpha": (
            "Alpha (alpha 0 = IWI only, Table 4b)",
            lambda v: v["tag"] == "chain",
            lambda v: f"alpha {v['alpha']}",
        ),
        "4a": (
            "Chain vs every member grown from the smallest (Table 4a)",
            lambda v: v["tag"] == "from-smallest",
            lambda v: "all from " + v["members"][0],
        ),
        "fig7": (
            "Fewer members over the same size range (Fig. 7)",
            lambda v: v["tag"] == "three",
            lambda v: " -> ".join(v["members"]),
        ),
        "fig6": (
            "Prepending a smaller first member (Fig. 6)",
            lambda v: v["tag"] == "prepend",
            lambda v: " -> ".join(v["members"]),
        ),
    }
    main0 = {**main, "rows": [{**r, "chain_mean": r["per_seed"][0]} for r in main["rows"]]}
    for title, pick, label in groups.values():
        chosen = [v for v in results["ablations"] if pick(v)]
        if chosen:
            lines += [
                "",
                f"## {title}, seed 0, link fraction {results['chosen_fraction']:g}",
                "",
                *_variants_table(
                    [_reseed(results, main0)] + chosen,
                    lambda v, label=label: "main chain (seed 0)" if v.get("is_main") else label(v),
                    d,
                ),
            ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _reseed(results: dict[str, Any], main0: dict[str, Any]) -> dict[str, Any]:
    """The main chain's seed-0 row set, for side-by-side comparison with seed-0 ablations."""
    sweep = [v for v in results["sweep"] if v["fraction"] == results["chosen_fraction"]]
    base = sweep[0] if sweep else main0
    return {**base, "is_main": True}


def write_figures(results: dict[str, Any], out: Path) -> list[str]:
    proto, files = results["protocol"], []
    curves = [
        Curve(m, [(float(s), v) for s, v in sorted((int(k), x) for k, x in b["sweep"].items())], color=i)
        for i, (m, b) in enumerate(results["baselines"].items())
    ]
    plot_curves(
        curves,
        out / "baselines.png",
        xlabel="baseline schedule (optimizer steps)",
        ylabel=results["metric"],
        title="Baseline schedule sweep (seed 0)",
    )
    files.append("baselines.png")
    curves = []
    for i, m in enumerate(proto["members"][1:]):
        pts = [(v["fraction"], r["gap"]) for v in results["sweep"] for r in v["rows"] if r["member"] == m]
        curves.append(Curve(m, pts, color=i + 1))
    plot_curves(
        curves,
        out / "link_sweep.png",
        xlabel="link steps / baseline steps",
        ylabel="gap to baseline mean (>0: chain worse)",
        title="Chain link length sweep (seed 0)",
    )
    files.append("link_sweep.png")
    rows = results["main"]["rows"]
    names = [r["member"] for r in rows]
    panels = [
        BarPanel(
            "metric (mean over seeds)",
            names,
            [("baseline", [r["baseline_mean"] for r in rows]), ("chain", [r["chain_mean"] for r in rows])],
            results["metric"],
        ),
        BarPanel(
            "training-MAC acceleration",
            names,
            [
                ("individual", [r["individual_macs_x"] for r in rows]),
                ("accumulated", [r["accumulated_macs_x"] for r in rows]),
            ],
            "x",
            hline=1.0,
        ),
    ]
    plot_bar_panels(panels, out / "headline.png")
    files.append("headline.png")
    if results["ablations"]:
        variants = [v for v in results["ablations"]]
        labels = [f"{v['tag']} a={v['alpha']}" if v["tag"] == "chain" else v["tag"] for v in variants]
        panels = [
            BarPanel(
                "ablations: worst gap",
                labels,
                [("worst gap", [v["summary"]["worst_gap"] for v in variants])],
                results["metric"],
                hline=0.0,
            ),
            BarPanel(
                "ablations: accumulated MACs x",
                labels,
                [("accel.", [v["summary"]["accumulated_macs_x"] for v in variants])],
                "x",
                hline=1.0,
            ),
        ]
        plot_bar_panels(panels, out / "ablations.png")
        files.append("ablations.png")
    return files


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write ``out/README.md`` and the PNG figures; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(results, out)
    path = out / "README.md"
    path.write_text(render(results, figures))
    return path
