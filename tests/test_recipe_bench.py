"""The issue-12 benchmark as a recipe bench (benchmarks/recipe_bench.py): a few seconds on a shrunk protocol.

The adapter must train what benchmarks/reproduce.py trains, score ``val_loss`` lower-is-better and keep
the validation split (where recipes are chosen) apart from the test split (what is reported).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import recipe  # noqa: E402
from reproduce_lib import Protocol, replace_proto  # noqa: E402

SMALL = dict(batch=8, num_samples=64, eval_images=8, eval_retrieval=8, val_images=16, val_batch=8)


@pytest.fixture(scope="module")
def bench():
    full = recipe.load_bench(f"{BENCH / 'recipe_bench.py'}:recipe_bench")  # the --bench FILE:FACTORY path
    return full, dataclasses.replace(
        full,
        members=("bench-XS", "bench-S"),
        baseline_steps=4,
        seeds=(0,),
        link_fraction=0.5,
        arms=("paper", "alpha0"),
        combine=False,
        protocol=replace_proto(Protocol(), **SMALL),
        baseline_dir="",  # adopt nothing (the adoption test sets it)
    )


def test_it_trains_what_reproduce_trains_and_splits_by_eval_seed(bench):
    full, _ = bench
    proto = Protocol()
    assert (full.family, full.members, full.baseline_steps) == (proto.family, proto.members, proto.reference)
    fields = full.train_fields()
    assert (fields["global_batch_size"], fields["lr"]) == (proto.batch, proto.lr)
    assert fields["data"]["num_samples"] == proto.num_samples and fields["data"]["synthetic"]["grid"] == 4
    # test = the seed reproduce.py reports; val = the other one, where settings are chosen
    assert full.split_seeds["test"] == proto.eval_seed != full.split_seeds["val"]
    assert full.metric == "val_loss" and not full.higher_is_better


def test_recipe_runs_on_it_and_chooses_lower_loss_on_validation(bench, tmp_path):
    _, small = bench
    res = recipe.run(small, tmp_path, workers=1, log=lambda *a: None)
    runs = res["runs"]
    link, base = runs["paper_f0.5_bench-S_s0"], runs["base_bench-S_4_s0"]
    for split in ("val", "test"):
        assert 0 < link["metrics"][split]["val_loss"] < 10 and "zeroshot/shape/top1" in link["metrics"][split]
    assert link["metrics"]["val"]["val_loss"] != link["metrics"]["test"]["val_loss"]  # other scenes
    # the score a recipe is chosen by: how much lower its chain's validation loss is than the paper's
    other = runs["alpha0_f0.5_bench-S_s0"]
    want = link["metrics"]["val"]["val_loss"] - other["metrics"]["val"]["val_loss"]
    assert res["choice"]["val_scores"] == pytest.approx({"paper": 0.0, "alpha0": want})
    row = res["tables"]["paper"]["members"]["bench-S"]
    test_gap = link["metrics"]["test"]["val_loss"] - base["metrics"]["test"]["val_loss"]
    assert row["gap"] == pytest.approx(test_gap)  # positive when the chain is worse
    assert row["lossless"] == (row["gap"] <= row["tolerance"])
    assert row["tolerance"] >= Protocol().loss_tolerance
    res["command"] = "test"
    text = recipe.write_readme(res, tmp_path).read_text()
    assert f"{row['chain']:.3f}" in text  # nats to 3 decimals, not a percentage's 1


def test_it_adopts_the_runs_reproduce_finished_and_trains_the_first_member(bench, tmp_path):
    """The 8000-step baselines and the paper's chain are reproduce.py's (2-3 CPU hours): the recipe
    harness scores them, it does not retrain them; the first member teaches and keeps its AdamW
    moments, so it is trained here."""
    import reproduce

    _, small = bench
    proto = replace_proto(
        small.protocol, members=small.members, three=(), seeds=(0,), baseline_steps=(4,),
        reference_steps=4, link_fractions=(0.5,),
    )  # fmt: skip
    reproduce.run(proto, tmp_path / "bench", workers=1, log=lambda *a: None)
    finished = json.loads((tmp_path / "bench" / "runs" / "base_bench-S_4_s0" / "result.json").read_text())
    adopting = dataclasses.replace(small, baseline_dir=str(tmp_path / "bench"))
    res = recipe.run(adopting, tmp_path / "recipe", workers=1, log=lambda *a: None)
    runs = res["runs"]
    adopted, trained = runs["base_bench-S_4_s0"], runs["base_bench-XS_4_s0"]
    assert adopted["adopted_from"].endswith("base_bench-S_4_s0/result.json") and "adopted_from" not in trained
    assert adopted["metrics"]["test"] == finished["metrics"]
    assert adopted["train_macs"] == finished["train_macs"]
    assert adopted["metrics"]["val"]["val_loss"] != adopted["metrics"]["test"]["val_loss"]  # from its weights
    assert res["tables"]["paper"]["members"]["bench-S"]["baseline"] == finished["metrics"]["val_loss"]
    # the paper arm's link is reproduce's chain link, weights included (a next link grows from them) ...
    link = runs["paper_f0.5_bench-S_s0"]
    assert link["adopted_from"].endswith("chain-bench-XS_f0p5_a500_bench-S_s0/result.json")
    assert (tmp_path / "recipe" / "runs" / "paper_f0.5_bench-S_s0" / "final.pt").is_file()
    assert "adopted_from" not in runs["alpha0_f0.5_bench-S_s0"]  # other arms are trained here
    # ... and the same run as the harness trains itself: CPU training is deterministic
    alone = recipe.run(small, tmp_path / "alone", workers=1, log=lambda *a: None)  # adopts nothing
    assert alone["runs"]["paper_f0.5_bench-S_s0"]["metrics"] == link["metrics"]
    # another protocol's finished baseline is an error, never a silent mix
    other = dataclasses.replace(adopting, protocol=replace_proto(small.protocol, lr=1e-3))
    with pytest.raises(RuntimeError, match=r"another protocol \(lr differ"):
        recipe.run(other, tmp_path / "recipe2", workers=1, log=lambda *a: None)


def test_a_link_of_another_schedule_is_neither_adopted_nor_reused(bench, tmp_path):
    """A bench whose baselines are longer than reproduce's reference (e.g. 16000 steps against its 8000)
    must train its own links: reproduce's chain grew from another first member for other steps. And a
    finished link of one schedule in ``--out`` is an error for another, never a silent reuse (the run
    keys name the link fraction, not the steps)."""
    import reproduce

    _, small = bench
    proto = replace_proto(
        small.protocol, members=small.members, three=(), seeds=(0,), baseline_steps=(4, 8),
        reference_steps=4, link_fractions=(0.5,),
    )  # fmt: skip
    reproduce.run(proto, tmp_path / "bench", workers=1, log=lambda *a: None)
    longer = dataclasses.replace(small, baseline_steps=8, baseline_dir=str(tmp_path / "bench"))
    runs = recipe.run(longer, tmp_path / "recipe", workers=1, log=lambda *a: None)["runs"]
    assert runs["base_bench-S_8_s0"]["adopted_from"].endswith("base_bench-S_8_s0/result.json")
    link = runs["paper_f0.5_bench-S_s0"]
    assert "adopted_from" not in link and link["steps"] == 4  # trained here, from the 8-step first member
    assert link["job"]["teacher"] == "base_bench-XS_8_s0"
    shorter = dataclasses.replace(longer, baseline_steps=4)
    with pytest.raises(RuntimeError, match=r"paper_f0.5_bench-S_s0.*another job \(steps, teacher, deps"):
        recipe.run(shorter, tmp_path / "recipe", workers=1, log=lambda *a: None)
