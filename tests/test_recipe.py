"""Smoke test of the recipe harness (benchmarks/recipe.py, issue 13) on the debug family: a few seconds.

The real measurement (micro family, 3 seeds) is not part of the suite; this runs every phase --
baselines, arms of every group, the choice on validation, the combination, the test-split report.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import recipe  # noqa: E402
from recipe_lib import ARMS, MicroBench, choose  # noqa: E402

DEBUG = MicroBench(
    name="debug",
    family="debug",
    members=("debug-S", "debug-L"),
    baseline_steps=4,
    seeds=(0,),
    link_fraction=0.5,
    batch=8,
    num_samples=64,
    eval_images=8,
    eval_retrieval=8,
    arms=("paper", "alpha0", "salt-step", "msg", "staged"),
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    res = recipe.run(DEBUG, out, workers=1, log=lambda *a: None)
    return res, out


def test_every_arm_trains_the_same_links_and_is_scored_on_both_splits(results):
    res, out = results
    runs = res["runs"]
    for arm in DEBUG.arms:
        link = runs[f"{arm}_f0.5_debug-L_s0"]
        assert link["steps"] == 2 and link["job"]["teacher"] == "base_debug-S_4_s0"
        assert (out / "runs" / f"{arm}_f0.5_debug-L_s0" / "final.pt").is_file()
        assert set(link["metrics"]) == {"val", "test"}
    # val and test are different held-out scenes
    assert any(r["metrics"]["val"] != r["metrics"]["test"] for r in runs.values())
    # SALT's step schedule runs the teacher for half the link only: fewer MACs than the paper's link
    assert runs["salt-step_f0.5_debug-L_s0"]["train_macs"] < runs["paper_f0.5_debug-L_s0"]["train_macs"]
    assert set(res["tables"]) >= set(DEBUG.arms)
    row = res["tables"]["paper"]["members"]["debug-L"]
    assert row["macs_x_accumulated"] > 0 and isinstance(row["lossless"], bool)


def test_the_choice_reads_validation_only(results):
    res, _ = results
    runs = copy.deepcopy(res["runs"])
    choice = choose(DEBUG, runs, list(DEBUG.arms))
    for run in runs.values():  # any test-split change leaves the choice alone
        run["metrics"]["test"] = {k: -v for k, v in run["metrics"]["test"].items()}
    assert choose(DEBUG, runs, list(DEBUG.arms)) == choice
    for key, run in runs.items():  # the validation split decides: make msg win the growth group
        if key.startswith("msg_"):
            run["metrics"]["val"] = {k: v + 1000 for k, v in run["metrics"]["val"].items()}
    forced = choose(DEBUG, runs, list(DEBUG.arms))
    assert forced["group_winners"]["growth"] == "msg" and forced["best_options"]["width"] == "msg"


def test_main_writes_the_report_and_its_last_line(results, tmp_path, capsys, monkeypatch):
    res, out = results
    monkeypatch.setattr(recipe, "load_bench", lambda spec: DEBUG)
    assert recipe.main(["--out", str(out), "--workers", "1"]) == 0  # every run is finished: reused
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("recipe: best=") and "lossless=" in last
    saved = json.loads((out / "results.json").read_text())
    assert (
        saved["command"].startswith("python benchmarks/recipe.py")
        and "Choice (validation split)" in (out / "README.md").read_text()
    )
    with pytest.raises(SystemExit, match="unknown bench field 'seed'"):
        recipe.main(["--out", str(tmp_path), "--set", "seed=[1]"])
    assert "paper" in ARMS and ARMS["paper"][1] == {}
