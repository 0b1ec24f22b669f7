"""The deep bench family's baselines (issue 12, criteria 1-2; docs/reproduce.md "The deep family").

``benchmarks/bench_deep_family.yaml`` keeps bench-XS and bench-S and replaces bench-M / bench-L by
bench-S4 / bench-M4 (the same widths four blocks deep). Its upper members are trained here on the
benchmark's protocol (data, batch, lr; both splits, `recipe_bench.IssueTwelveBench`); bench-XS and
bench-S are the one-block family's, whose runs are in ``reference16k.json``. From the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench-deep/family.py run bench-M4@8000@0 ...
    PYTHONPATH=src .venv/bin/python benchmarks/results/bench-deep/family.py table   # -> family.json
    ... family.py --out benchmarks/results/bench-deep/epyc run ...   # a sitting's own runs/ and table

``run`` trains the given ``member@steps@seed`` baselines and ``ARM:member@steps@seed<TEACHER``
links in that order on 2 workers (resumable). ``ARM`` is an arm of the recipe harness or one of
:data:`ABLATIONS`, the paper's Table 4 rerun with the recipe chosen on this family.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from recipe_bench import IssueTwelveBench  # noqa: E402
from recipe_lib import ARMS, Job, baseline_key, run_job  # noqa: E402
from reproduce_lib import Protocol, mean_std, run_jobs  # noqa: E402

from compt.families import load_family_yaml  # noqa: E402
from compt.report.figures import Curve, CurvePanel, plot_curve_panels  # noqa: E402

OUT = Path(__file__).resolve().parent
ONE_BLOCK = OUT.parent / "bench" / "reference16k.json"  # bench-XS / bench-S: the one-block family's runs
FAMILY = "benchmarks/bench_deep_family.yaml"
MEMBERS = tuple(m.name for m in load_family_yaml(ROOT / FAMILY).members)
TRAINED_HERE = MEMBERS[2:]  # bench-S4, bench-M4; the first two are the one-block family's
# The paper's Table 4 with the recipe chosen on the validation split (alpha 0 at 1/2 links,
# docs/reproduce.md). The arm's name tells the run apart; its teacher, given after '<', is the study:
ABLATIONS = {
    # 4(b), one link from the paper link's bench-S: IWI without IFD (beside IWI + IFD, the paper arm,
    # and neither, the baseline of the link's steps) ...
    "iwi-only": {"alpha": 0.0},
    # ... and IFD without IWI: the student as member.create() made it, distilled at the paper's alpha
    "ifd-only": {"width": "none", "depth": "none"},
    # 4(a): grown straight from the first member (bench-XS), not along the chain
    "from-first": {"alpha": 0.0},
}
LINK_ARMS = {arm: options for arm, (_, options) in ARMS.items()} | ABLATIONS


@dataclass(frozen=True)
class DeepFamilyBench(IssueTwelveBench):
    """The issue-12 protocol on the deep family; nothing adopted from reproduce's runs."""

    name: str = "bench-deep"
    family: str = FAMILY
    members: tuple[str, ...] = MEMBERS
    baseline_dir: str = ""


BENCH = DeepFamilyBench()


def link_key(arm: str, member: str, steps: int, seed: int) -> str:
    return f"link-{arm}_{member}_{steps}_s{seed}"


def parse(spec: str) -> Job:
    """``member@steps@seed`` (a baseline) or ``ARM:member@steps@seed<TEACHER`` (a chain link of the
    recipe harness's arm ``ARM``, grown from the finished run ``TEACHER`` in runs/)."""
    arm, _, rest = spec.rpartition(":")
    rest, _, teacher = rest.partition("<")
    parts = rest.split("@")
    if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
        raise SystemExit(f"{spec!r}: expected member@steps@seed, e.g. bench-M4@8000@0")
    member, steps, seed = parts
    if member not in MEMBERS:
        raise SystemExit(f"unknown member {member!r} in {spec!r}: one of {', '.join(MEMBERS)}")
    if not arm:
        return Job(baseline_key(member, int(steps), int(seed)), member, int(steps), int(seed))
    if arm not in LINK_ARMS or not teacher:
        raise SystemExit(
            f"{spec!r}: a link needs a known arm ({', '.join(LINK_ARMS)}) and a teacher after '<'"
        )
    options = tuple(sorted(LINK_ARMS[arm].items()))
    key = link_key(arm, member, int(steps), int(seed))
    return Job(key, member, int(steps), int(seed), teacher, arm, options, deps=(teacher,))


def _run(_: Protocol, job: Job, out: str) -> dict:
    return run_job(BENCH, job, out)


REFERENCE = {"bench-XS": 16000, "bench-S": 16000, "bench-S4": 8000, "bench-M4": 8000}  # each baseline's


def _test(record: dict) -> dict:
    return record["metrics"].get("test", record["metrics"])  # a reproduce run has the test split only


def table(out: Path = OUT) -> dict:
    """Per member and schedule (``arm:member@steps`` for a link): each seed's test-split val_loss
    (and the validation split's where the run has it) with mean and std, bench-XS and bench-S from
    the one-block family's reference16k.json. Per link: its lineage's accumulated training MACs
    (the engine's counts) against the family trained individually at ``REFERENCE`` steps. runs/ is
    not committed, so the runs found there are merged into ``out/family.json``'s rows and chains:
    a table written in a fresh checkout keeps every committed number."""
    committed = json.loads((out / "family.json").read_text()) if (out / "family.json").exists() else {}
    rows: dict = {k: v for k, v in committed.get("rows", {}).items() if "source" not in v}
    for key, r in json.loads(ONE_BLOCK.read_text())["rows"].items():
        if key.split("@")[0] in MEMBERS:
            rows[key] = {"test": r, "source": "bench/reference16k.json"}
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))}
    # one step of each member's baseline (the engine's count): kept, since its runs are not committed
    step_macs = committed.get("step_train_macs", {}) | {
        r["job"]["member"]: r["train_macs"] // r["job"]["steps"]
        for r in runs.values()
        if not r["job"]["teacher"]
    }
    chains = dict(committed.get("chains", {}))
    for key, r in runs.items():
        job = r["job"]
        if job["member"] not in TRAINED_HERE:
            continue  # a teacher copied from ../bench/runs
        name = f"{job.get('arm') or 'baseline'}:{job['member']}@{job['steps']}".removeprefix("baseline:")
        row = rows.setdefault(name, {"test": {"seeds": {}}})
        row["test"]["seeds"][str(job["seed"])] = _test(r)["val_loss"]
        if "val" in r["metrics"]:
            row.setdefault("val", {"seeds": {}})["seeds"][str(job["seed"])] = r["metrics"]["val"]["val_loss"]
        if job["teacher"]:
            lineage, teacher = [(key, r)], job["teacher"]
            while teacher:
                lineage.append((teacher, runs[teacher]))
                teacher = runs[teacher]["job"]["teacher"]
            members = [t["job"]["member"] for _, t in lineage]
            accum = sum(t["train_macs"] for _, t in lineage)
            individual = sum(REFERENCE[m] * step_macs[m] for m in members)
            chains[key] = {
                "lineage": [k for k, _ in lineage],
                "train_macs": accum,
                "accumulated_x": individual / accum,
                # each ancestor's score: its run is not committed, and the docs compare teachers
                "lineage_test_val_loss": [_test(t)["val_loss"] for _, t in lineage],
            }
    for row in rows.values():
        for split in ("test", "val"):
            if split in row and "source" not in row:
                row[split]["seeds"] = dict(sorted(row[split]["seeds"].items()))
                row[split]["mean"], row[split]["std"] = mean_std(list(row[split]["seeds"].values()))
    head = {
        "family": BENCH.family,
        "metric": "val_loss (nats, lower is better)",
        "reference_steps": REFERENCE,
        "step_train_macs": dict(sorted(step_macs.items())),
    }
    return head | {"rows": rows, "chains": dict(sorted(chains.items()))}


ARM_COLORS = {"baseline": 7, "paper": 0, "alpha0": 1}


def cost_points(result: dict, member: str, arm: str) -> list[tuple[float, float, float, int]]:
    """``(training MACs, mean, std, seeds)`` of ``member``'s test val_loss at each schedule, sorted by
    MACs: for the baseline its own MACs, for a chain arm its lineage's accumulated MACs (``chains``)."""
    prefix = "" if arm == "baseline" else f"{arm}:"
    out = []
    for name, row in result["rows"].items():
        if "source" in row or not name.startswith(f"{prefix}{member}@"):
            continue
        steps, seeds = int(name.split("@")[1]), row["test"]["seeds"]
        if arm == "baseline":
            macs = steps * result["step_train_macs"][member]
        else:
            keys = [link_key(arm, member, steps, int(s)) for s in seeds]
            macs = sum(result["chains"][k]["train_macs"] for k in keys) / len(keys)
        out.append((macs, row["test"]["mean"], row["test"]["std"], len(seeds)))
    return sorted(out)


def plot(result: dict, path: Path) -> Path:
    """Fig. 1 of the paper, per grown member: test val_loss against the training MACs it took, the
    baseline at each schedule and each chain arm at each link length. Error bars: the seed std of a
    point with three seeds (the others have one)."""
    panels = []
    for member in TRAINED_HERE:
        curves = []
        for arm, color in ARM_COLORS.items():
            pts = cost_points(result, member, arm)
            label = "baseline (the member alone)" if arm == "baseline" else f"chain, {arm} (accumulated)"
            dashed = arm == "baseline"
            curves.append(Curve(label, [(m / 1e12, y) for m, y, _, _ in pts], color, dashed))
            curves += [
                Curve(label, [(m / 1e12, y)], color, dashed, spread=[sd]) for m, y, sd, n in pts if n > 1
            ]
        panels.append(CurvePanel(member, "test val_loss (nats, lower is better)", curves))
    return plot_curve_panels(panels, path, xlabel="training MACs (x 1e12)", band_label="seed std (3 seeds)")


if __name__ == "__main__":
    # ``--out DIR``: a sitting of its own (its runs/ and family.json), e.g. one machine's lineages
    args, out = sys.argv[1:], OUT
    if args[0] == "--out":
        out, args = Path(args[1]), args[2:]
    if args[0] == "run":
        run_jobs(Protocol(), [parse(s) for s in args[1:]], str(out), workers=2, runner=_run)
    else:
        result = table(out)
        text = json.dumps(result, indent=1)
        (out / "family.json").write_text(text + "\n")
        print(text)
        print(plot(result, out / "chain.png"))
