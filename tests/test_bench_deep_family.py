"""The deep family's table (benchmarks/results/bench-deep/family.py): runs/ is not committed, so a
table written in a fresh checkout must keep the committed rows and chains and add the new runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("deep_family", ROOT / "benchmarks/results/bench-deep/family.py")
family = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(family)


def _record(
    folder: Path, member: str, steps: int, seed: int, loss: float, teacher: str = "", arm: str = ""
) -> None:
    """The fields of a run's result.json that the table reads (recipe_lib.run_job writes them)."""
    job = {"member": member, "steps": steps, "seed": seed, "teacher": teacher, "arm": arm}
    record = {
        "job": job,
        "train_macs": 1000 * steps,
        "metrics": {"test": {"val_loss": loss}, "val": {"val_loss": loss}},
    }
    (folder / "result.json").parent.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(record))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    shutil.copy(family.OUT / "family.json", tmp_path / "family.json")
    return tmp_path


def test_a_fresh_checkout_keeps_the_committed_rows_and_chains(out: Path):
    committed = json.loads((out / "family.json").read_text())
    assert family.table(out) == committed


def test_a_new_seed_joins_its_committed_row_and_a_new_link_gets_its_chain(out: Path):
    committed = json.loads((out / "family.json").read_text())
    runs = out / "runs"
    _record(runs / "base_bench-XS_16000_s1", "bench-XS", 16000, 1, 2.9)
    _record(runs / "chain16k-paper_f0p25_bench-S_s1", "bench-S", 4000, 1, 2.7, "base_bench-XS_16000_s1")
    _record(
        runs / "link-paper_bench-S4_2000_s1",
        "bench-S4",
        2000,
        1,
        2.5,
        "chain16k-paper_f0p25_bench-S_s1",
        "paper",
    )
    result = family.table(out)
    row = result["rows"]["paper:bench-S4@2000"]["test"]
    assert row["seeds"] == committed["rows"]["paper:bench-S4@2000"]["test"]["seeds"] | {"1": 2.5}
    assert row["mean"] == pytest.approx(sum(row["seeds"].values()) / len(row["seeds"]))
    chain = result["chains"]["link-paper_bench-S4_2000_s1"]
    assert chain["lineage"] == [
        "link-paper_bench-S4_2000_s1",
        "chain16k-paper_f0p25_bench-S_s1",
        "base_bench-XS_16000_s1",
    ]
    assert chain["train_macs"] == 1000 * (2000 + 4000 + 16000)
    assert chain["lineage_test_val_loss"] == [2.5, 2.7, 2.9]
    # individually: each member at its reference schedule, at the committed per-step MACs
    step = result["step_train_macs"]
    expected = sum(family.REFERENCE[m] * step[m] for m in ("bench-S4", "bench-S", "bench-XS"))
    assert chain["accumulated_x"] == pytest.approx(expected / chain["train_macs"])
    assert (
        result["chains"]["link-paper_bench-M4_2000_s0"] == committed["chains"]["link-paper_bench-M4_2000_s0"]
    )


def test_the_figure_puts_a_chain_at_its_lineage_s_macs_and_a_baseline_at_its_own(out: Path):
    result = family.table(out)
    baseline = family.cost_points(result, "bench-M4", "baseline")
    assert [m for m, *_ in baseline] == sorted(m for m, *_ in baseline)
    row = result["rows"]["bench-M4@8000"]["test"]
    assert (8000 * result["step_train_macs"]["bench-M4"], row["mean"], row["std"], 3) in baseline
    (macs, mean, std, seeds), *_ = family.cost_points(result, "bench-M4", "paper")
    keys = [f"link-paper_bench-M4_2000_s{s}" for s in range(3)]
    assert macs == pytest.approx(sum(result["chains"][k]["train_macs"] for k in keys) / 3)
    assert (mean, std, seeds) == (
        result["rows"]["paper:bench-M4@2000"]["test"]["mean"],
        result["rows"]["paper:bench-M4@2000"]["test"]["std"],
        3,
    )
    assert family.plot(result, out / "chain.png").stat().st_size > 10_000


def test_an_ablation_arm_is_a_run_of_its_own_beside_the_chain_arm_of_the_same_options():
    chain = family.parse("alpha0:bench-S4@4000@1<link-alpha0_bench-S_s1")
    iwi = family.parse("iwi-only:bench-S4@4000@1<chain16k-paper_f0p25_bench-S_s1")
    assert iwi.options == chain.options == (("alpha", 0.0),)
    assert iwi.key != chain.key and iwi.deps == ("chain16k-paper_f0p25_bench-S_s1",)
    ifd = family.parse("ifd-only:bench-S4@4000@1<chain16k-paper_f0p25_bench-S_s1")
    assert dict(ifd.options) == {"width": "none", "depth": "none"}  # alpha stays the paper's
    with pytest.raises(SystemExit, match="ifd-only"):
        family.parse("iwi:bench-S4@4000@1<x")  # a typo: the message lists the arms
