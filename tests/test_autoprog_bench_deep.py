"""AutoProg-One's depth ramp on bench-S4 (benchmarks/results/autoprog-bench/deep.py): runs/ is not
committed, so a table written in a fresh checkout keeps the committed seeds, and a new seed's runs
join them with gaps to that seed's own baselines."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("ap_deep", ROOT / "benchmarks/results/autoprog-bench/deep.py")
deep = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(deep)


def _record(runs: Path, key: str, loss: float, macs: int) -> None:
    """The fields of a run's result.json that the table reads (recipe_lib.run_job writes them)."""
    test = {"val_loss": loss} | {f"zeroshot/{t}/top1": 50.0 for t in ("shape", "colour", "count", "binding")}
    record = {"metrics": {"test": test, "val": {"val_loss": loss - 0.01}}, "train_macs": macs, "wall_s": 10.0}
    (runs / key).mkdir(parents=True)
    (runs / key / "result.json").write_text(json.dumps(record))


@pytest.fixture
def record(tmp_path: Path) -> Path:
    shutil.copy(deep.RECORD, tmp_path / "deep.json")
    return tmp_path / "deep.json"


def test_a_fresh_checkout_keeps_the_committed_seeds(record: Path):
    committed = json.loads(record.read_text())
    assert deep.table(record, record.parent / "runs") == committed


def test_a_new_seed_is_scored_against_its_own_baselines(record: Path):
    committed = json.loads(record.read_text())
    runs = record.parent / "runs"
    base, ramp, equal = (j.key for j in deep.jobs(7) if j.arm in ("", "ap-depth", "base-equal-macs"))
    _record(runs, base, 2.0, 8000)
    _record(runs, ramp, 2.1, 6000)
    _record(runs, equal, 2.05, 6000)
    _record(runs, "ap-depth_bench-S4_8000_s8", 1.0, 1)  # no finished baseline for seed 8: not a row
    result = deep.table(record, runs)
    assert list(result["seeds"]) == [*committed["seeds"], "7"]
    assert result["seeds"]["0"] == committed["seeds"]["0"]
    row = result["seeds"]["7"]["ap-depth"]
    assert row["gap"] == pytest.approx(0.1) and row["macs_x"] == pytest.approx(8000 / 6000)
    assert "ap-depth-plain" not in result["seeds"]["7"]  # not run for that seed: no row
    summary = result["summary"]["ap-depth"]
    gaps = [rows["ap-depth"]["gap"] for rows in committed["seeds"].values()] + [0.1]
    assert summary["seeds"] == [*committed["summary"]["ap-depth"]["seeds"], "7"]
    assert summary["gap"]["mean"] == pytest.approx(sum(gaps) / len(gaps))
    assert summary["minus_equal_macs"]["7"] == pytest.approx(0.05)
    assert result["summary"]["ap-depth-plain"]["seeds"] == committed["summary"]["ap-depth-plain"]["seeds"]
    assert deep.plot(result, record.parent / "deep.png").stat().st_size > 10_000
