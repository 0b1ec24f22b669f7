"""Tests for the chain plan (compt.plan.plan_chain) and the ``compt plan`` command."""

from __future__ import annotations

import json

import pytest
import torch

from compt.cli import main
from compt.cost import member_cost
from compt.engine.progressive import Progression, ProgressiveConfig
from compt.engine.progressive_cost import progressive_macs
from compt.engine.train import TrainConfig, train_member
from compt.families import get_family, get_member
from compt.paradigms.clip.data import DataConfig
from compt.plan import plan_chain

torch.set_num_threads(1)

TINY = [m.name for m in get_family("tiny").members]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- arithmetic ----------------------------------------------------------------------------------


def test_plan_arithmetic_matches_member_costs():
    samples, base_epochs, epochs, m, batch = 10_000, 20, [20, 6, 4, 3], 3, 128
    plan = plan_chain(TINY, samples, base_epochs, epochs, sample={"num_captions": m}, batch_size=batch)
    costs = [member_cost(n, m) for n in TINY]
    steps = samples // batch  # per epoch: the loader drops the last partial batch
    base_acc = chain_acc = 0
    for i, (row, c, e) in enumerate(zip(plan.rows, costs, epochs, strict=False)):
        teacher_fwd = costs[i - 1].forward_macs if i else 0
        base = base_epochs * steps * (batch * c.train_macs + c.update_macs)
        chain = e * steps * (batch * (c.train_macs + teacher_fwd) + c.update_macs)
        base_acc, chain_acc = base_acc + base, chain_acc + chain
        assert (row.baseline_macs, row.chain_macs) == (base, chain)
        assert (row.baseline_accumulated_macs, row.chain_accumulated_macs) == (base_acc, chain_acc)
        assert row.individual_acceleration == pytest.approx(base / chain)
        assert row.accumulated_acceleration == pytest.approx(base_acc / chain_acc)
        assert row.teacher == (TINY[i - 1] if i else None)
    assert plan.rows[0].individual_acceleration == pytest.approx(1.0)  # first member: same run
    assert (plan.baseline_total_macs, plan.chain_total_macs) == (base_acc, chain_acc)
    assert plan.acceleration == pytest.approx(base_acc / chain_acc)
    assert not plan.allocated


def test_plan_without_epochs_allocates_them():
    plan = plan_chain(TINY, 10_000, 20, batch_size=100)
    assert plan.allocated and plan.target_ratio is not None
    assert plan.rows[0].epochs == 20
    assert [r.epochs for r in plan.rows[1:]] == sorted((r.epochs for r in plan.rows[1:]), reverse=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": [20, 6, 0, 3]}, "epochs of tiny-M must be a positive number"),
        ({"epochs": [20, 6, 4]}, r"3 epoch values for 4 members"),
        ({"samples": 0}, "samples"),
        ({"baseline_epochs": -1}, "baseline_epochs"),
        ({"batch_size": 100_000}, "batch_size"),
    ],
)
def test_plan_bad_arguments(kwargs, match):
    args = {"members": TINY, "samples": 10_000, "baseline_epochs": 20, "epochs": [20, 6, 4, 3]} | kwargs
    with pytest.raises(ValueError, match=match):
        plan_chain(**args)


def test_fractional_epochs_cost_exactly_what_the_engine_counts(tmp_path):
    """issue 11: `compt plan` refused the demo's 3,1,0.75; a link of 0.75 epochs is round(0.75 x steps)."""
    data = DataConfig(kind="synthetic", num_samples=72)  # 4 steps of 16 per epoch, 8 samples dropped
    plan = plan_chain(["debug-S", "debug-L"], 72, 1, [1, 0.75], sample={"num_captions": 4}, batch_size=16)
    common = dict(data=data, global_batch_size=16, warmup_steps=0, save_every_steps=0, device="cpu")
    teacher = train_member(TrainConfig(member="debug-S", out_dir=str(tmp_path / "S"), epochs=1, **common))
    link = train_member(TrainConfig(member="debug-L", out_dir=str(tmp_path / "L"), epochs=0.75,
                                    teacher=str(teacher.final_checkpoint), **common))  # fmt: skip
    assert (teacher.steps, link.steps) == (4, 3)
    assert [r.chain_macs for r in plan.rows] == [teacher.train_macs, link.train_macs]
    assert [r.epochs for r in plan.rows] == [1, 0.75]


def test_a_progressive_member_costs_its_stages_and_a_searched_one_is_an_estimate():
    manual, searched = ProgressiveConfig(schedule="manual"), ProgressiveConfig()
    kw = dict(sample={"num_captions": 4}, batch_size=16)
    plain = plan_chain(["debug-S", "debug-L"], 640, 1, [1, 1], **kw)  # 40 steps each
    grown = plan_chain(["debug-S", "debug-L"], 640, 1, [1, 1], progressive=[None, manual], **kw)
    teacher = get_member("debug-S")
    prog = Progression(manual, get_member("debug-L"), 40, teacher=teacher)
    assert grown.rows[1].chain_macs == progressive_macs(prog, batch_size=16, teacher=teacher).total_macs
    assert grown.rows[0] == plain.rows[0] and grown.rows[1].baseline_macs == plain.rows[1].baseline_macs
    assert grown.rows[1].chain_macs < plain.rows[1].chain_macs and not grown.estimate
    found = plan_chain(["debug-S", "debug-L"], 640, 1, [1, 1], progressive=[searched, searched], **kw)
    assert found.estimate and [r.progressive for r in found.rows] == ["search", "search"]
    assert found.rows[1].chain_macs > grown.rows[1].chain_macs  # the same ramp, plus its search phases
    with pytest.raises(ValueError, match="debug-L: a search phase takes at least"):
        plan_chain(["debug-S", "debug-L"], 160, 1, [1, 1], progressive=[None, searched], **kw)


# --- the command ---------------------------------------------------------------------------------


def test_cli_paper_vit_command_json(capsys):
    code, out, _ = _run(
        capsys,
        "--family",
        "vit",
        "--members",
        "ViT-T/16,ViT-S-16,ViT-B/16,ViT-L-16",
        "--samples",
        "2753427",
        "--baseline-epochs",
        "128",
        "--epochs",
        "128,24,18,15",
        "--captions",
        "4",
        "--json",
    )
    assert code == 0
    doc = json.loads(out)
    names = [r["name"] for r in doc["members"]]
    assert names == ["ViT-T/16", "ViT-S/16", "ViT-B/16", "ViT-L/16"]
    for key in ("name", "params", "forward_macs", "train_macs", "epochs", "baseline_macs", "chain_macs"):
        assert all(key in r for r in doc["members"])
    assert doc["baseline_total_macs"] == sum(r["baseline_macs"] for r in doc["members"])
    assert doc["chain_total_macs"] == sum(r["chain_macs"] for r in doc["members"])
    assert doc["acceleration"] == pytest.approx(doc["baseline_total_macs"] / doc["chain_total_macs"])
    assert [r["epochs"] for r in doc["members"]] == [128, 24, 18, 15]
    assert doc["members"][2]["forward_macs"] == member_cost("ViT-B/16", 4).forward_macs


def test_cli_table_for_whole_family(capsys):
    code, out, _ = _run(
        capsys, "--family", "tiny", "--samples", "5000", "--baseline-epochs", "10", "--batch-size", "64"
    )
    assert code == 0
    assert all(name in out for name in TINY)
    assert "allocated per §3.1.2" in out  # no --epochs: says the epochs were allocated
    assert "acceleration" in out


def test_cli_members_without_family(capsys):
    code, out, _ = _run(
        capsys,
        "--members",
        "debug-S,debug-L",
        "--samples",
        "2048",
        "--epochs",
        "4,2",
        "--baseline-epochs",
        "4",
    )
    assert code == 0 and "debug-L" in out and "allocated" not in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--family", "vit", "--members", "ViT-T/16,ViT-Q/16"], ["ViT-Q/16", "ViT-T/16", "ViT-L/16"]),
        (["--family", "tiny", "--members", "tiny-M,tiny-S"], ["tiny-S", "follows tiny-M", "ascending"]),
        (["--family", "tiny", "--epochs", "10,3,0,1"], ["epochs of tiny-M", "positive"]),
        (["--family", "tiny", "--epochs", "10,3,-2,1"], ["epochs of tiny-M", "positive"]),
        (["--family", "tiny", "--epochs", "10,3,2"], ["3 epoch values for 4 members"]),
        (["--family", "tiny", "--epochs", "10,3,x,1"], ["comma-separated numbers"]),
        (["--family", "tiny", "--captions", "0"], ["num_captions"]),
        (["--family", "nope"], ["unknown name 'nope'", "tiny"]),
        ([], ["--family"]),
    ],
)
def test_cli_bad_input_is_one_clear_line(capsys, argv, expected):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("compt plan: error:") and err.count("\n") == 1
    for text in expected:
        assert text in err


def test_cli_yaml_family_with_unknown_field(capsys, tmp_path):
    path = tmp_path / "fam.yaml"
    path.write_text(
        "members:\n"
        "  - name: a\n    embed_dim: 16\n"
        "    vision_cfg: {image_size: 16, patch_size: 4, width: 16, layers: 1, head_width: 16, depth: 3}\n"
        "    text_cfg: {context_length: 8, width: 16, heads: 1, layers: 1}\n"
    )
    code, _, err = _run(capsys, "--family", str(path))
    assert code == 2 and "'depth'" in err and str(path) in err


def test_cli_plans_a_chain_spec_as_it_trains(capsys, tmp_path):
    """issue 11: `compt plan SPEC.yaml`, the demo's fractional epochs included."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "family: tiny\nmembers: [tiny-XS, tiny-S, tiny-M]\nout_dir: " + str(tmp_path / "run") + "\n"
        "data: {kind: synthetic, num_samples: 12800, num_captions: 4}\n"
        "baseline_epochs: 3\nepochs: [3, 1, 0.75]\ntrain: {global_batch_size: 128}\n"
    )
    code, from_spec, _ = _run(capsys, str(spec), "--json")
    assert code == 0
    flags = ["--family", "tiny", "--members", "tiny-XS,tiny-S,tiny-M", "--samples", "12800",
             "--baseline-epochs", "3", "--epochs", "3,1,0.75", "--batch-size", "128", "--json"]  # fmt: skip
    code, from_flags, _ = _run(capsys, *flags)
    assert code == 0 and json.loads(from_spec) == json.loads(from_flags)
    assert [r["epochs"] for r in json.loads(from_spec)["members"]] == [3, 1, 0.75]
    code, _, err = _run(capsys, str(spec), "--epochs", "3,1,1")
    assert code == 2 and "--epochs: with SPEC these come from the spec" in err


def test_cli_plans_progressive_members_labelled_as_an_estimate(capsys, tmp_path):
    vit = ["--family", "vit", "--members", "ViT-T/16,ViT-S/16,ViT-B/16,ViT-L/16", "--epochs", "128,24,18,15"]
    code, out, _ = _run(capsys, *vit, "--progressive", "first")
    rows = [line for line in out.splitlines() if line.startswith("ViT-")]
    assert code == 0 and rows[0].split("x) ")[1].startswith("AP*")  # only the first member trains with it
    assert not any("AP" in row for row in rows[1:])
    assert "acceleration" in out and "(an estimate: see AP* above)" in out and "ESTIMATE" in out
    code, plain, _ = _run(capsys, *vit, "--json")
    code, first, _ = _run(capsys, *vit, "--progressive", "first", "--json")
    plain, first = json.loads(plain), json.loads(first)
    assert first["estimate"] and first["acceleration"] > plain["acceleration"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "family: tiny\nmembers: [tiny-XS, tiny-S]\nout_dir: " + str(tmp_path / "run") + "\n"
        "data: {kind: synthetic, num_samples: 12800}\nbaseline_epochs: 3\nepochs: [3, 1]\n"
        "train: {global_batch_size: 128}\nlink: {progressive: {schedule: manual}}\n"
    )
    code, out, _ = _run(capsys, str(spec), "--json")
    assert code == 0 and [r["progressive"] for r in json.loads(out)["members"]] == [None, "manual"]
    code, _, err = _run(capsys, str(spec), "--progressive", "all")
    assert code == 2 and "--progressive: with SPEC these come from the spec" in err
