"""Smoke test of the benchmark machinery (benchmarks/reproduce.py) on the debug family: a few seconds.

The --quick mode and the full run are not part of the suite (minutes to an hour); this runs every
phase -- baseline sweep, link-length sweep, seeds, ablations, report -- with a handful of steps.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import reproduce  # noqa: E402
from reproduce_lib import METRIC, Protocol, metric_value, replace_proto  # noqa: E402

DEBUG = dict(
    family="debug",
    members=("debug-S", "debug-L"),
    three=(),
    prepend="",
    seeds=(0, 1),
    baseline_steps=(2, 4),
    link_fractions=(0.5, 1.0),
    alphas=(0.0,),
    batch=8,
    num_samples=64,
    eval_images=8,
    eval_retrieval=8,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    proto = replace_proto(Protocol(), **DEBUG)
    res = reproduce.run(proto, out, workers=1, log=lambda *a: None)
    reproduce_report_path = __import__("reproduce_report").write_report(res, out)
    return res, out, reproduce_report_path


def test_every_phase_ran_with_the_engine(results):
    res, out, _ = results
    runs = res["runs"]
    # baselines: seed 0 at both lengths, seed 1 at the longest
    assert {"base_debug-S_2_s0", "base_debug-S_4_s0", "base_debug-S_4_s1", "base_debug-L_4_s1"} <= set(runs)
    for key, run in runs.items():
        assert (out / "runs" / key / "final.pt").is_file()  # the engine wrote it
        assert run["train_macs"] > 0 and 0 <= run["metrics"][METRIC] <= 100
    # a link trains fraction x the member's longest baseline schedule and costs its teacher's forward too
    link = runs["chain-debug-S_f0p5_a500_debug-L_s0"]
    base = runs["base_debug-L_4_s0"]
    assert link["steps"] == 2 and link["job"]["teacher"] == "base_debug-S_4_s0"
    assert link["train_macs"] > base["train_macs"] / 2


def test_tables_are_consistent(results):
    res, _, _ = results
    b = res["baselines"]["debug-L"]
    assert len(b["per_seed"]) == 2 and b["tolerance"] >= 0.5
    rows = res["main"]["rows"]
    assert rows[0]["first"] and rows[0]["accumulated_macs_x"] == pytest.approx(1.0)
    last = rows[-1]
    assert last["gap"] == pytest.approx(b["mean"] - last["chain_mean"])
    assert last["lossless"] == (last["gap"] <= last["tolerance"])
    assert math.isclose(res["main"]["summary"]["worst_gap"], last["gap"])
    assert res["chosen_fraction"] in (0.5, 1.0)
    tags = {(v["tag"], str(v["alpha"])) for v in res["ablations"]}
    assert ("chain", "0.0") in tags and ("from-smallest", "500.0") in tags


def test_report_and_rerun_resumes(results, tmp_path):
    res, out, md = results
    text = md.read_text()
    assert "Headline" in text and "Table 4a" in text and "baselines.png" in text
    for png in ("baselines.png", "link_sweep.png", "headline.png", "ablations.png"):
        assert (out / png).stat().st_size > 1000
    json.dumps(res, default=str)  # serializable
    again = reproduce.run(replace_proto(Protocol(), **DEBUG), out, workers=1, log=lambda *a: None)
    assert again["runs"] == json.loads(json.dumps(res["runs"]))  # every run read back, none retrained


def test_unknown_protocol_field_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown protocol field 'bogus'"):
        reproduce.main(["--set", "bogus=1"])


def test_rescoring_with_a_derived_metric_reuses_the_runs(results, tmp_path):
    res, out, _ = results
    proto = replace_proto(Protocol(), **DEBUG, metric="mean_retrieval_r10")
    again = reproduce.run(proto, out, workers=1, log=lambda *a: None, report_dir=tmp_path)
    assert again["metric"] == "mean_retrieval_r10" and (tmp_path / "results.json").is_file()
    run = again["runs"]["base_debug-L_4_s0"]["metrics"]
    expected = (run["retrieval/synthetic/i2t_r10"] + run["retrieval/synthetic/t2i_r10"]) / 2
    assert again["baselines"]["debug-L"]["sweep"][4] == pytest.approx(expected)
    with pytest.raises(KeyError, match="neither in the run's metrics"):
        metric_value(run, "bogus")
