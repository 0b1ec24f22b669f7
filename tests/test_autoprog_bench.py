"""AutoProg-One on the issue-12 benchmark (benchmarks/autoprog_bench.py): a shrunk protocol, real runs.

The adapter adopts reproduce.py's baselines, first member and plain chain (weights included) and
trains only the AutoProg runs; on the one-layer bench family AutoProg-One grows the resolution only.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import autoprog  # noqa: E402
import reproduce  # noqa: E402
from autoprog_bench import autoprog_bench  # noqa: E402
from reproduce_lib import Protocol, replace_proto  # noqa: E402

SMALL = dict(batch=8, num_samples=64, eval_images=8, eval_retrieval=8, val_images=16, val_batch=8)


def test_it_adopts_reproduces_runs_and_trains_only_autoprog(tmp_path):
    members, steps = ("bench-XS", "bench-S"), 40  # a searched run needs 40
    proto = replace_proto(
        Protocol(), **SMALL, members=members, three=(), seeds=(0,), baseline_steps=(steps,),
        reference_steps=steps, link_fractions=(1.0,),
    )  # fmt: skip
    reproduce.run(proto, tmp_path / "bench", workers=1, log=lambda *a: None)
    # a restored checkout (reproduce.py --restore) holds the records of runs that teach nothing, no weights
    (tmp_path / "bench" / "runs" / f"base_bench-S_{steps}_s0" / "final.pt").unlink()
    bench = dataclasses.replace(
        autoprog_bench(), members=members, baseline_steps=steps, seeds=(0,), link_fraction=1.0,
        protocol=proto, baseline_dir=str(tmp_path / "bench"),
    )  # fmt: skip
    res = autoprog.run(bench, tmp_path / "ap", workers=1, log=lambda *a: None)
    runs = res["runs"]
    for key in (f"base_bench-XS_{steps}_s0", "chain_f1_bench-S_s0"):
        assert "adopted_from" in runs[key], key  # reproduce's, scored on both splits from its weights
        assert set(runs[key]["metrics"]) == {"val", "test"}
    record_only = runs[f"base_bench-S_{steps}_s0"]
    assert "adopted_from" in record_only and set(record_only["metrics"]) == {"test"}
    assert res["val_tables"] is None  # not every run has a validation score: no half table
    # the first member is adopted with its weights (it teaches)
    assert (tmp_path / "ap" / "runs" / f"base_bench-XS_{steps}_s0" / "final.pt").is_file()
    ap = runs[f"ap_bench-S_{steps}_s0"]
    assert "adopted_from" not in ap
    shapes = list(ap["schedule"].values())
    assert {c["vision_layers"] for c in shapes} == {1}  # one layer: nothing to grow in depth
    assert min(c["image_size"] for c in shapes) < 32  # ... but the resolution grows
    # the manual ramp (16 -> 32 px, no search phase) costs fewer MACs than the plain member
    manual = res["tables"]["ablations"]["ap-manual"]
    assert manual["versus"]["macs_x"] > 1
    base = res["tables"]["members"]["bench-S"]["baseline"]
    assert base["loss"]["mean"] == runs[f"base_bench-S_{steps}_s0"]["metrics"]["test"]["val_loss"]
