"""The AutoProg benchmark harness (benchmarks/autoprog*.py, issue 15): its runs and its tables.

The measurement itself (micro family, 3 seeds, ~1 h) is not part of the suite; ``benchmarks/autoprog.py
--smoke`` trains every arm for real. Here: which runs the protocol holds, and the tables' arithmetic on
made-up results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import autoprog  # noqa: E402
from autoprog_lib import ABLATIONS, AutoProgBench, jobs, tables  # noqa: E402

BENCH = AutoProgBench(members=("micro-XS", "micro-S", "micro-M"), seeds=(0, 1), baseline_steps=400)


def test_the_protocol_holds_every_arm_on_every_seed():
    todo = {j.key: j for j in jobs(BENCH)}
    assert len(todo) == len(jobs(BENCH))  # unique keys
    for s in (0, 1):
        for m in BENCH.members:
            assert (
                f"base_{m}_400_s{s}" in todo and dict(todo[f"ap_{m}_400_s{s}"].options)["progressive"] == {}
            )
        # The chain grows from the plain first member, the chain + AutoProg from its AutoProg run.
        assert todo[f"chain_f0.25_micro-S_s{s}"].teacher == f"base_micro-XS_400_s{s}"
        assert todo[f"chainap_f0.25_micro-S_s{s}"].teacher == f"ap_micro-XS_400_s{s}"
        link = todo[f"chainap_f0.25_micro-M_s{s}"]
        assert link.teacher == f"chainap_f0.25_micro-S_s{s}" in link.deps and link.steps == 100
        assert not todo[f"chain_f0.25_micro-M_s{s}"].options
        for arm in ABLATIONS:
            job = todo[f"{arm}_micro-M_400_s{s}"]
            assert dict(job.options)["progressive"]["schedule"] == "manual"
    assert dict(todo["ap-manual-plain_micro-M_400_s0"].options)["progressive"]["mogrow"] is False


def _runs(losses: dict[str, list[float]], macs: dict[str, float]) -> dict[str, dict]:
    """Made-up results: each job's loss by its arm prefix and seed, its MACs by arm prefix."""
    out = {}
    for job in jobs(BENCH):
        arm = job.key.split("_")[0]
        loss = losses[arm][job.seed]
        out[job.key] = {"metrics": {"val": {"val_loss": loss + 1}, "test": {"val_loss": loss}},
                        "train_macs": macs[arm] * (1 + BENCH.members.index(job.member)), "wall_s": macs[arm],
                        "schedule": {}}  # fmt: skip
    return out


def test_tables_compare_against_the_baselines_on_the_test_split():
    losses = {"base": [1.0, 1.2], "ap": [1.2, 1.2], "chain": [1.0, 1.0], "chainap": [1.5, 1.5]}
    losses |= {arm: [1.1, 1.1] for arm in ABLATIONS}
    macs = {"base": 4.0, "ap": 2.0, "chain": 1.0, "chainap": 0.5} | {arm: 2.5 for arm in ABLATIONS}
    t = tables(BENCH, _runs(losses, macs), "test")
    member = t["members"]["micro-S"]
    # baseline 1.1 +- 0.141: AutoProg's 1.2 is within 2 std (lossless), at half the MACs and wall time
    assert member["versus"]["gap"] == pytest.approx(0.1) and member["versus"]["lossless"]
    assert member["versus"]["macs_x"] == pytest.approx(2.0) and member["versus"]["wall_x"] == pytest.approx(
        2.0
    )
    family = t["family"]
    # chain: the first member's baseline (4) plus links of 1 x (2, 3): (4 + 8 + 12) / (4 + 2 + 3)
    assert family["chain"]["macs_x"] == pytest.approx(24 / 9) and family["chain"]["lossless"]
    assert family["chainap"]["macs_x"] == pytest.approx(24 / (2 + 1 + 1.5))
    assert not family["chainap"]["lossless"] and family["chainap"]["worst_gap"] == pytest.approx(0.4)
    assert family["ap-only"]["macs_x"] == pytest.approx(2.0) and family["individual"]["macs_x"] == 1
    ablation = t["ablations"]
    assert ablation["ap-manual-reset"]["versus"]["macs_x"] == pytest.approx(4.0 / 2.5)
    assert tables(BENCH, _runs(losses, macs), "val")["members"]["micro-S"]["ap"]["loss"]["mean"] == 2.2


def test_the_readme_holds_every_table(tmp_path):
    losses = {"base": [1.0, 1.2], "ap": [1.2, 1.2], "chain": [1.0, 1.0], "chainap": [1.5, 1.5]}
    losses |= {arm: [1.1, 1.1] for arm in ABLATIONS}
    macs = {"base": 4.0, "ap": 2.0, "chain": 1.0, "chainap": 0.5} | {arm: 2.5 for arm in ABLATIONS}
    results = {"bench": BENCH.to_dict(), "arms": autoprog.ARMS, "wall_minutes": 1.0, "command": "x",
               "tables": tables(BENCH, _runs(losses, macs), "test")}  # fmt: skip
    text = autoprog.write_readme(results, tmp_path).read_text()
    assert text.count("\n| micro-") == 3 and "| chainap |" in text and "| ap-manual-plain |" in text
    assert autoprog.plot(results, tmp_path / "autoprog.png").stat().st_size > 0
