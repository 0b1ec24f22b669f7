"""What would let the top members separate at convergence? Pilots for issue 12's next regime.

On the benchmark's data the deep family's two largest members converge to about the same val_loss
(docs/reproduce.md, "Where the family stops being a family"), 0.38 nats above the oracle floor.
Each pilot changes one thing the two members share and trains them on the benchmark's protocol
otherwise (batch, lr, cosine, evaluation on both splits), seed 0:

* ``embed``: the joint embedding is 64-d instead of 32 (``embed_family.yaml``): is the 32-d dot
  product, shared by every member, the plateau?
* ``binding``: two-object scenes are 80 % of the scenes and there are 4 shapes, so a scene's
  colour-swapped twin is likely in a batch and the loss pays for binding (worth 0.166 nats of the
  oracle's loss here, 0.056 on the benchmark's data).
* ``sincos``: open_clip's fixed 2-D sin-cos position embedding instead of the learned one
  (``sincos_family.yaml``): every member is blind to where an object is (``position.py``); does a
  position code the members need not learn let them see it?
* ``grid3``: objects centred in the cells of a 3 x 3 grid, one cell per region a caption names,
  instead of one 8 px patch each: an object's region then shows in its pixels (the centre one is
  split across four patches, a side one sits off its patch's centre), at the cost of shapes that
  cross patches. Does a member that sees where objects are separate from the smaller one? Its
  family (``grid3_family.yaml``) adds bench-XS four blocks deep, so that the chain bench-XS -> XS4
  -> S4 -> M4 (``CHAINS``) has depth wherever shape needs it; ``table`` writes criterion 1 for it.

From the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench-pilot/pilot.py run embed bench-M4-e64@8000@0
    ... pilot.py run binding bench-M4@8000@0 bench-S4@8000@0
    ... pilot.py run sincos bench-S4-sc@4000@0 bench-M4-sc@4000@0
    ... pilot.py run grid3 bench-M4@8000@0 bench-S4@8000@0 bench-XS@8000@0 bench-S@8000@0
    ... pilot.py run grid3 bench-S4@32000@0 bench-XS4@8000@0 bench-M4@8000@1 ...   # COMMANDS.md #10
    ... pilot.py table   # -> pilot.json

``run PILOT`` trains the given ``member@steps@seed`` baselines on 2 workers into ``PILOT/runs``
(resumable).
"""

import json
import sys
from collections import defaultdict
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent / "bench-deep"))
from bench_floor import val_floor  # noqa: E402
from family import BENCH  # noqa: E402
from recipe_lib import Job, baseline_key, run_job  # noqa: E402
from reproduce import family_table  # noqa: E402
from reproduce_lib import BENCH_SPEC, Protocol, mean_std, run_jobs  # noqa: E402

from compt.families import load_family_yaml  # noqa: E402

BINDING = replace(BENCH_SPEC, shapes=("circle", "square", "triangle", "cross"), p_pair=0.8, p_multi=0.1)
GRID3 = replace(BENCH_SPEC, grid=3)
EMBED_FAMILY = str((HERE / "embed_family.yaml").relative_to(HERE.parents[2]))
SINCOS_FAMILY = str((HERE / "sincos_family.yaml").relative_to(HERE.parents[2]))
GRID3_FAMILY = str((HERE / "grid3_family.yaml").relative_to(HERE.parents[2]))
PILOTS = {
    "embed": replace(BENCH, name="bench-pilot-embed", family=EMBED_FAMILY),
    "sincos": replace(BENCH, name="bench-pilot-sincos", family=SINCOS_FAMILY),
    "binding": replace(BENCH, name="bench-pilot-binding", protocol=replace(BENCH.protocol, spec=BINDING)),
    "grid3": replace(
        BENCH, name="bench-pilot-grid3", family=GRID3_FAMILY, protocol=replace(BENCH.protocol, spec=GRID3)
    ),
}
# a pilot's 4-member chain, ~4x training MACs a step between neighbours, for criterion 1
CHAINS = {"grid3": ("bench-XS", "bench-XS4", "bench-S4", "bench-M4")}
KEYS = (
    "val_loss",
    "zeroshot/shape/top1",
    "zeroshot/colour/top1",
    "zeroshot/count/top1",
    "zeroshot/binding/top1",
)


def parse(pilot: str, spec: str) -> Job:
    """``member@steps@seed``: a baseline of the pilot's family."""
    members = [m.name for m in load_family_yaml(HERE.parents[2] / PILOTS[pilot].family).members]
    parts = spec.split("@")
    if len(parts) != 3 or parts[0] not in members or not all(p.isdigit() for p in parts[1:]):
        raise SystemExit(f"{spec!r}: expected member@steps@seed with a member of {', '.join(members)}")
    return Job(baseline_key(parts[0], int(parts[1]), int(parts[2])), parts[0], int(parts[1]), int(parts[2]))


def _run(pilot: str, _: Protocol, job: Job, out: str) -> dict:
    return run_job(PILOTS[pilot], job, out)


def _json(value):
    return list(value) if isinstance(value, tuple) else value


def family(rows: dict, chain: tuple[str, ...]) -> dict:
    """Criterion 1 on a pilot's chain, per schedule where every member has 2 seeds or more: test
    val_loss mean and seed std per member, each adjacent gap in the pair's larger std (as reproduce.py)."""
    runs = defaultdict(list)
    for name, row in rows.items():
        member, steps, _ = name.split("@")
        runs[member, int(steps)].append(row)
    out = {}
    for steps in sorted({s for m, s in runs if m in chain}):
        # rows recorded before pilot.json kept training MACs have none: such a schedule waits for a new run
        if any(len(runs[m, steps]) < 2 or all("train_macs" not in r for r in runs[m, steps]) for m in chain):
            continue
        base = {}
        for m in chain:
            mean, std = mean_std([r["test"]["val_loss"] for r in runs[m, steps]])
            macs = next(r["train_macs"] for r in runs[m, steps] if "train_macs" in r)
            base[m] = {"mean": mean, "std": std, "seeds": len(runs[m, steps]), "train_macs": macs}
        out[str(steps)] = {"members": base, "pairs": family_table(Protocol(), base)}
    return out


def table() -> dict:
    """Per pilot and run: val_loss and zero-shot top-1 on both splits, the run's wall seconds and MACs.

    Runs' folders are not committed: rows and floors already in ``pilot.json`` are kept (a new
    checkout has only the runs trained in it), and a run on disk replaces its row."""
    path = HERE / "pilot.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    out["metric"] = "val_loss (nats, lower is better)"
    # a changed data's own floor on the test split (its val set is drawn from its spec): a few
    # CPU-minutes each, so a floor is kept while the spec recorded beside it is still the pilot's
    for name, spec, blind in (("binding", BINDING, "binding"), ("grid3", GRID3, "position")):
        changed = {f.name: _json(getattr(spec, f.name)) for f in fields(spec)}
        changed = {k: v for k, v in changed.items() if v != _json(getattr(BENCH_SPEC, k))}
        if out.get(f"{name}_spec") != changed or f"{name}_floor_test" not in out:
            test = (BENCH.protocol.eval_seed, spec, BENCH.protocol.val_images, BENCH.protocol.val_batch)
            out[f"{name}_floor_test"] = {
                "oracle": val_floor(*test)["best"],
                f"{blind}-blind oracle": val_floor(*test, blind)["best"],
            }
        out[f"{name}_spec"] = changed
    for pilot in PILOTS:
        out.setdefault(pilot, {"rows": {}})["family"] = PILOTS[pilot].family
        rows = out[pilot]["rows"]
        for p in sorted((HERE / pilot / "runs").glob("*/result.json")):
            r = json.loads(p.read_text())
            name = f"{r['job']['member']}@{r['job']['steps']}@{r['job']['seed']}"
            rows[name] = {split: {k: m[k] for k in KEYS} for split, m in r["metrics"].items()}
            rows[name]["wall_s"] = round(r["wall_s"], 1)
            rows[name]["train_macs"] = r["train_macs"]
        if pilot in CHAINS:
            out[pilot]["family_by_steps"] = family(rows, CHAINS[pilot])
    return out


if __name__ == "__main__":
    if sys.argv[1] == "run":
        pilot = sys.argv[2]
        jobs = [parse(pilot, s) for s in sys.argv[3:]]
        run_jobs(Protocol(), jobs, str(HERE / pilot), workers=2, runner=partial(_run, pilot))
    else:
        text = json.dumps(table(), indent=1)
        (HERE / "pilot.json").write_text(text + "\n")
        print(text)
