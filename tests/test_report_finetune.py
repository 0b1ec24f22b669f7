"""compt.report.finetune: the fine-tuning table from result.json files beside a chain/individual tree."""

from __future__ import annotations

import json
from pathlib import Path

from compt.cli import main as cli_main
from compt.report import load_run, render_markdown


def _tree(root: Path) -> None:
    """runs/<x>/{chain,individual}/summary.json with two members, as compt chain run writes them."""
    for kind in ("chain", "individual"):
        members = []
        for i, name in enumerate(["tiny-XS", "tiny-S"]):
            (root / kind / name).mkdir(parents=True)
            (root / kind / name / "metrics.jsonl").write_text("")
            teacher = "tiny-XS" if kind == "chain" and i else None
            cost = {"train_macs": 1e9, "accumulated_train_macs": 1e9 * (i + 1), "wall_s": 1.0,
                    "accumulated_wall_s": i + 1.0}  # fmt: skip
            members.append(
                {"name": name, "teacher": teacher, "epochs": 1.0, "steps": 10, "samples_seen": 80, **cost,
                 "metrics": {"mean_zeroshot_top1": 30.0}, "metrics_file": f"{name}/metrics.jsonl"}
            )  # fmt: skip
        doc = {"kind": kind, "family": "tiny", "members": members}
        (root / kind / "summary.json").write_text(json.dumps(doc))


def _result(root: Path, kind: str, member: str, label: str, seed: int, top1: float) -> None:
    out = root / kind / member / "finetune" / "shape" / f"{label}-seed{seed}"
    out.mkdir(parents=True)
    doc = {"kind": "finetune", "set": "shape", "label": label, "seed": seed, "test_top1": top1,
           "num_classes": 6, "num_train": 2000, "num_test": 1000, "member": member}  # fmt: skip
    (out / "result.json").write_text(json.dumps(doc))


def test_the_table_has_each_variant_per_member_over_seeds_with_the_baseline_in_parentheses(tmp_path):
    _tree(tmp_path)
    for seed, top1 in enumerate([30.0, 32.0, 34.0]):
        _result(tmp_path, "chain", "tiny-S", "full", seed, top1)
    _result(tmp_path, "individual", "tiny-S", "full", 0, 28.0)
    _result(tmp_path, "chain", "tiny-S", "linear-probe", 0, 25.0)
    _result(tmp_path, "chain", "tiny-XS", "autoprog-zero-search", 0, 20.0)
    md = render_markdown(load_run(tmp_path / "chain"), load_run(tmp_path / "individual"))
    section = md[md.index("## Fine-tuning") :]
    assert "Set `shape`: 6 classes, 2000 training / 1000 test images" in section
    assert "| Model | linear-probe | full | autoprog-zero-search |" in section  # probe, full, then the rest
    assert "| tiny-S | 25.0 [1] | 32.0 ± 2.0 [3] (28.0 [1]) | — |" in section
    assert "| tiny-XS | — | — | 20.0 [1] |" in section


def test_no_results_no_section_and_the_cli_renders_it_from_the_tree(tmp_path, capsys):
    _tree(tmp_path)
    assert "Fine-tuning" not in render_markdown(
        load_run(tmp_path / "chain"), load_run(tmp_path / "individual")
    )
    _result(tmp_path, "individual", "tiny-XS", "full", 0, 40.0)
    assert cli_main(["report", str(tmp_path)]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| tiny-XS | — (40.0 [1]) |" in report
