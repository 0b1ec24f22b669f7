"""Does the chain pay, and by how much? Baselines vs chains on the embedded data (§5, Tables 2/4, Fig. 4-7).

Run from the repository root::

    .venv/bin/python benchmarks/reproduce.py --out benchmarks/results          # full run (resumable)
    .venv/bin/python benchmarks/reproduce.py --quick --out /tmp/reproduce-quick  # 3-member chain, < 10 min

The protocol (issue 12, docs/reproduce.md):

1. Baselines: every member trained with growing schedules (seed 0) and, at the reference schedule,
   over every seed; the baseline of every comparison is the reference, mean and spread over seeds.
   Converged: doubling the reference changes the metric by less than the lossless tolerance.
2. Chains: the first member is its baseline twin; every link k trains its own complete cosine
   schedule of ``fraction * reference steps``, for each swept fraction (seed 0). The shortest fraction
   with every member lossless (else the longest) is rerun on every seed.
3. Optionally (``ablations=true``), at that fraction (seed 0): alpha 0 (IWI only) / 50 / auto, every
   member grown from the smallest (Table 4a), 3 vs 4 members (Fig. 7), a smaller first member (Fig. 6).

The headline metric is ``val_loss`` (lower is better); percentages can be chosen with ``--set
metric=...``. Results: ``<out>/results.json`` (raw runs and tables), ``<out>/README.md`` and PNG
figures. The last line printed is ``<mode>: metric=<m> baselines=<b1>/<b2>/... acceleration=<x>x
worst_gap=<gap> lossless=<yes|no>`` (gap in the metric's units, positive when the chain is worse).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce_lib import (  # noqa: E402
    Protocol,
    baseline_jobs,
    baseline_key,
    chain_jobs,
    chain_name,
    mean_std,
    metric_value,
    replace_proto,
    restore_runs,
    run_jobs,
)

from compt.lossless import shortfall as _shortfall  # noqa: E402
from compt.paradigms.clip.evaluate import higher_is_better  # noqa: E402

# Three members, one short schedule (no sweep), links at 1/4: a < 10 min check that the members
# differ and the chain runs end to end; the full run is the benchmark.
QUICK = dict(
    members=("bench-XS", "bench-S", "bench-M"),
    three=(),
    baseline_steps=(600,),
    reference_steps=600,
    link_fractions=(0.25,),
    eval_images=1000,
    eval_retrieval=500,
)


def shortfall(metric: str, reference: float, value: float) -> float:
    """How much worse ``value`` is than ``reference`` on ``metric``, in its units (positive: worse)."""
    return _shortfall(reference, value, higher_is_better(metric))


def _metric(res: dict, name: str) -> float:
    return metric_value(res["metrics"], name)


def baseline_table(proto: Protocol, res: dict[str, dict]) -> dict[str, dict]:
    """Per member: the schedule sweep (seed 0), the reference schedule's mean/std over seeds, and the
    convergence check (issue 12, criterion 2): doubling the reference changes the metric by less
    than the lossless tolerance."""
    ref, table = proto.reference, {}
    for m in proto.members:
        sweep = {
            s: _metric(res[baseline_key(m, s, proto.seeds[0])], proto.metric) for s in proto.baseline_steps
        }
        runs = [res[baseline_key(m, ref, seed)] for seed in proto.seeds]
        vals = [_metric(r, proto.metric) for r in runs]
        mean, std = mean_std(vals)
        tolerance = max(proto.base_tolerance(), 2 * std)  # the lossless rule a chain is judged by
        # What doubling the reference bought at seed 0, in the metric's units (positive: better).
        doubling = -shortfall(proto.metric, sweep[ref], sweep[2 * ref]) if 2 * ref in sweep else math.nan
        table[m] = {
            "sweep": sweep,
            "mean": mean,
            "std": std,
            "per_seed": vals,
            "tolerance": tolerance,
            "doubling_gain": doubling,
            # criterion 2 as the issue words it: a change the lossless verdict could not tell from noise
            "converged": None if math.isnan(doubling) else bool(abs(doubling) < tolerance),
            "train_macs": runs[0]["train_macs"],
            "wall_s": mean_std([r["wall_s"] for r in runs])[0],
            "tasks": {k: mean_std([r["metrics"][k] for r in runs]) for k in runs[0]["metrics"]},
        }
    return table


def family_table(proto: Protocol, base: dict[str, dict]) -> list[dict]:
    """Criterion 1 of issue 12: each member better than the next smaller one by >= 3 seed stds."""
    rows, members = [], list(base)
    for small, large in zip(members, members[1:], strict=False):
        a, b = base[small], base[large]
        gap = shortfall(proto.metric, b["mean"], a["mean"])  # how much worse the smaller one is
        noise = max(a["std"], b["std"])
        rows.append(
            {
                "pair": f"{small} -> {large}",
                "gap": gap,
                "std": noise,
                "sigmas": gap / noise if noise > 0 else math.inf,
                "separated": bool(gap > 0 and gap >= 3 * noise),
                "macs_x": b["train_macs"] / a["train_macs"],
            }
        )
    return rows


def chance_levels(proto: Protocol) -> dict[str, float]:
    """Zero-shot top-1 of a uniform guess on each embedded task (100 / number of classes)."""
    from compt.paradigms.clip.data.evalsets import embedded_eval_sets

    tasks, _ = embedded_eval_sets(8, num_images=1, num_retrieval=0, tasks=proto.eval_tasks, spec=proto.spec)
    return {f"zeroshot/{t.name}/top1": 100.0 / len(t.classnames) for t in tasks}


def informative_tasks(proto: Protocol, base: dict[str, dict]) -> dict[str, bool]:
    """Criterion 4 of issue 12, per zero-shot task: the smallest member clearly above chance and the
    largest clearly below 100 (each by max(5 pt, 3 seed std)); the others belong out of a headline."""
    small, large = base[proto.members[0]]["tasks"], base[proto.members[-1]]["tasks"]
    out = {}
    for key, chance in chance_levels(proto).items():
        (lo, lo_std), (hi, hi_std) = small[key], large[key]
        out[key] = bool(lo - chance >= max(5.0, 3 * lo_std) and 100 - hi >= max(5.0, 3 * hi_std))
    return out


def chain_rows(
    proto: Protocol,
    base: dict,
    members: tuple[str, ...],
    keys_by_seed: dict[int, list[str]],
    res: dict[str, dict],
    first_key: dict[int, str],
) -> list[dict]:
    """Table 2 rows of one chain variant: metric vs baseline, individual and accumulated acceleration."""
    rows, acc_base, acc_chain, acc_base_w, acc_chain_w = [], 0.0, 0.0, 0.0, 0.0
    seeds = sorted(keys_by_seed)
    for i, m in enumerate(members):
        runs = [res[first_key[s]] if i == 0 else res[keys_by_seed[s][i - 1]] for s in seeds]
        vals = [_metric(r, proto.metric) for r in runs]
        mean, std = mean_std(vals)
        macs = sum(r["train_macs"] for r in runs) / len(runs)
        wall = sum(r["wall_s"] for r in runs) / len(runs)
        b = base.get(m)
        b_macs = b["train_macs"] if b else macs
        b_wall = b["wall_s"] if b else wall
        acc_base, acc_chain = acc_base + b_macs, acc_chain + macs
        acc_base_w, acc_chain_w = acc_base_w + b_wall, acc_chain_w + wall
        gap = shortfall(proto.metric, b["mean"], mean) if b else math.nan
        rows.append(
            {
                "member": m,
                "chain_mean": mean,
                "chain_std": std,
                "per_seed": vals,
                "seeds": seeds,
                "baseline_mean": b["mean"] if b else math.nan,
                "baseline_std": b["std"] if b else math.nan,
                "gap": gap,
                "tolerance": b["tolerance"] if b else math.nan,
                "lossless": bool(b and gap <= b["tolerance"]),
                "steps": runs[0]["steps"],
                "train_macs": macs,
                "individual_macs_x": b_macs / macs,
                "accumulated_macs_x": acc_base / acc_chain,
                "individual_wall_x": b_wall / wall,
                "accumulated_wall_x": acc_base_w / acc_chain_w,
                "first": i == 0,
            }
        )
    return rows


def summarize(rows: list[dict]) -> dict[str, Any]:
    scored = [r for r in rows if not r["first"] and not math.isnan(r["gap"])]
    worst = max((r["gap"] for r in scored), default=math.nan)
    return {
        "accumulated_macs_x": rows[-1]["accumulated_macs_x"],
        "accumulated_wall_x": rows[-1]["accumulated_wall_x"],
        "worst_gap": worst,
        "lossless": all(r["lossless"] for r in scored),
    }


def _variant(proto, base, res, tag, members, fraction, alpha, seeds, first_of, **kw) -> dict:
    keys = {
        s: [
            j.key
            for j in chain_jobs(
                proto,
                chain_name(tag, fraction, alpha, members[0]),
                members,
                first_of(s),
                fraction,
                s,
                alpha,
                **kw,
            )
        ]
        for s in seeds
    }
    rows = chain_rows(proto, base, members, keys, res, {s: first_of(s) for s in seeds})
    return {
        "tag": tag,
        "members": list(members),
        "fraction": fraction,
        "alpha": alpha,
        "seeds": list(seeds),
        "rows": rows,
        "summary": summarize(rows),
    }


def run(
    proto: Protocol, out: Path, workers: int, log=print, report_dir: Path | None = None
) -> dict[str, Any]:
    """All phases (runs under ``out/runs``); returns the results dict and writes it to ``report_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    report_dir = report_dir or out
    report_dir.mkdir(parents=True, exist_ok=True)
    t0, ref, s0 = time.perf_counter(), proto.reference, proto.seeds[0]
    first = lambda m: lambda s: baseline_key(m, ref, s)  # noqa: E731
    jobs = baseline_jobs(proto, proto.members)
    if proto.prepend and proto.ablations:
        jobs.append(baseline_key_job(proto.prepend, ref, s0))
    for f in proto.link_fractions:
        jobs += chain_jobs(
            proto,
            chain_name("chain", f, proto.alpha, proto.members[0]),
            proto.members,
            first(proto.members[0])(s0),
            f,
            s0,
            proto.alpha,
        )
    log(f"phase 1: {len(jobs)} runs (baselines, chain sweep over link fractions)")
    res = run_jobs(proto, jobs, str(out), workers, log)
    base = baseline_table(proto, res)
    sweep = [
        _variant(proto, base, res, "chain", proto.members, f, proto.alpha, [s0], first(proto.members[0]))
        for f in proto.link_fractions
    ]
    ok = [v for v in sweep if v["summary"]["lossless"]]
    chosen = (ok[0] if ok else sweep[-1])["fraction"]
    log(f"chosen link fraction {chosen:g} ({'lossless at seed 0' if ok else 'none lossless: the longest'})")

    jobs = []
    for s in proto.seeds[1:]:
        jobs += chain_jobs(
            proto,
            chain_name("chain", chosen, proto.alpha, proto.members[0]),
            proto.members,
            first(proto.members[0])(s),
            chosen,
            s,
            proto.alpha,
        )
    studies = []  # (tag, members, alpha, first_of, kwargs)
    if proto.ablations:
        studies += [("chain", proto.members, a, first(proto.members[0]), {}) for a in proto.alphas]
        studies.append(
            (
                "from-smallest",
                proto.members,
                proto.alpha,
                first(proto.members[0]),
                {"grow_all_from_first": True},
            )
        )
        if proto.three:
            studies.append(("three", proto.three, proto.alpha, first(proto.three[0]), {}))
        if proto.prepend:
            studies.append(
                ("prepend", (proto.prepend, *proto.members), proto.alpha, first(proto.prepend), {})
            )
    for tag, members, alpha, first_of, kw in studies:
        jobs += chain_jobs(
            proto, chain_name(tag, chosen, alpha, members[0]), members, first_of(s0), chosen, s0, alpha, **kw
        )
    log(f"phase 2: {len(jobs)} runs (chain seeds at fraction {chosen:g}, ablations)")
    res |= run_jobs(proto, jobs, str(out), workers, log)

    main = _variant(
        proto,
        base,
        res,
        "chain",
        proto.members,
        chosen,
        proto.alpha,
        list(proto.seeds),
        first(proto.members[0]),
    )
    ablations = [
        _variant(proto, base, res, tag, members, chosen, alpha, [s0], first_of, **kw)
        for tag, members, alpha, first_of, kw in studies
    ]
    results = {
        "protocol": proto.to_dict(),
        "metric": proto.metric,
        "higher_is_better": higher_is_better(proto.metric),
        "reference_steps": proto.reference,
        "base_tolerance": proto.base_tolerance(),
        "baselines": base,
        "family": family_table(proto, base),
        "chance": chance_levels(proto),
        "informative": informative_tasks(proto, base),
        "sweep": sweep,
        "chosen_fraction": chosen,
        "main": main,
        "ablations": ablations,
        "runs": res,
        "wall_minutes": (time.perf_counter() - t0) / 60,
        # Every run's CPU time (runs finished in earlier sittings included): the benchmark's compute,
        # independent of whatever else loaded the machine (issue 12, criterion 6: <= 3 h on 2 cores).
        "cpu_hours": sum(r.get("cpu_s", r["total_s"]) for r in res.values()) / 3600,
        "workers": workers,
    }
    (report_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def baseline_key_job(member: str, steps: int, seed: int):
    from reproduce_lib import Job

    return Job(baseline_key(member, steps, seed), member, steps, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="results folder (rerun to resume)")
    p.add_argument(
        "--quick", action="store_true", help="3-member chain vs its baselines, < 10 min on 2 cores"
    )
    p.add_argument(
        "--report-dir",
        help="where results.json, README.md and PNGs go (default: --out); "
        "e.g. to score finished runs with another --set metric=... without retraining",
    )
    p.add_argument(
        "--restore",
        metavar="RESULTS_JSON",
        help="first write the runs recorded in a committed results.json into --out/runs (records only, "
        "no weights), so a new checkout resumes the benchmark without retraining what it finished",
    )
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (1 torch thread each)")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=JSON",
        help="override a Protocol field, e.g. baseline_steps=[100,200] seeds=[0,1]",
    )
    args = p.parse_args(argv)
    proto = replace_proto(Protocol(), **QUICK) if args.quick else Protocol()
    changes = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in proto.to_dict():
            raise SystemExit(
                f"reproduce: unknown protocol field {name!r}; fields: {', '.join(proto.to_dict())}"
            )
        v = json.loads(value)
        changes[name] = tuple(v) if isinstance(v, list) else v
    proto = replace_proto(proto, **changes)
    out = Path(args.out)
    report = Path(args.report_dir) if args.report_dir else out
    if args.restore:
        kept, skipped = restore_runs(Path(args.restore), out, proto)
        print(f"restored {kept} runs from {args.restore} ({skipped} of another setup skipped: retrained)")
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/reproduce.py", *(argv or sys.argv[1:])]
    )
    results = run(proto, out, args.workers, report_dir=report)
    results["command"] = command
    (report / "results.json").write_text(json.dumps(results, indent=1, default=str))
    from reproduce_report import write_report

    write_report(results, report)
    print(
        f"wrote {report / 'README.md'} ({results['wall_minutes']:.1f} min wall, "
        f"{results['cpu_hours']:.2f} CPU hours over all runs)"
    )
    print(summary_line(results, "quick" if args.quick else "full"))
    return 0


def summary_line(results: dict[str, Any], mode: str) -> str:
    """``<mode>: metric=<m> baselines=<b1>/<b2>/... acceleration=<x>x worst_gap=<gap> lossless=<yes|no>``.

    Baselines: each member's reference baseline, mean over seeds, smallest first; the gap is in the
    metric's own units, positive when the chain is worse (issue 12).
    """
    s, metric = results["main"]["summary"], results["metric"]
    digits = 2 if higher_is_better(metric) else 3
    base = "/".join(f"{b['mean']:.{digits}f}" for b in results["baselines"].values())
    return (
        f"{mode}: metric={metric} baselines={base} acceleration={s['accumulated_macs_x']:.2f}x "
        f"worst_gap={s['worst_gap']:.{digits}f} lossless={'yes' if s['lossless'] else 'no'}"
    )


if __name__ == "__main__":
    sys.exit(main())
