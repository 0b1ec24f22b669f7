"""The validation-split probes behind bench-XS's two heads (docs/reproduce.md, issue 12): 3 seeds of one
member at one schedule for each (member, lr), evaluated on evaluation seed 0 (the validation split).

From the repository root (FAMILY: a family YAML, default the benchmark's)::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/probes/probe.py 4000 \
        '[["bench-XS", 2e-3], ["bench-XS", 5e-3], ["bench-XS", 1e-2]]' /tmp/probe-lr

The ``lr-h2/`` entries (a higher lr for the two-head bench-XS and for bench-S, 3 Dec 2026)::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/probes/probe.py 4000 \
        '[["bench-XS", 1e-2], ["bench-XS", 2e-2], ["bench-S", 1e-2]]' benchmarks/results/bench/probes/runs/lr

Results (3 Dec 2026): ``probes.json`` (its ``val_loss`` and ``cpu_s`` are what this script prints).
Families probed besides the benchmark's: ``family_xs_one_head.yaml``
(the family before: bench-XS with one head of width 8), ``family_s_heads4.yaml`` (bench-S with 4 heads of 4).
"""

import json
import os
import sys

sys.path.insert(0, "benchmarks")
from reproduce_lib import Job, Protocol, baseline_key, replace_proto, run_job, run_jobs  # noqa: E402

steps, grid, out = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]


def runner(proto, job, out):
    return run_job(replace_proto(proto, lr=float(job.key.split("_lr")[-1])), job, out)


family = os.environ.get("FAMILY", Protocol().family)
proto = replace_proto(Protocol(), family=family, eval_seed=0, baseline_steps=(steps,), reference_steps=steps)
jobs = [Job(f"{baseline_key(m, steps, s)}_lr{lr:g}", m, steps, s) for m, lr in grid for s in (0, 1, 2)]
for key, r in sorted(run_jobs(proto, jobs, out, workers=2, runner=runner).items()):
    print(key, round(r["metrics"]["val_loss"], 3), round(r["cpu_s"]))
