"""compt.chain: a minimal 2-member chain end to end, its baselines, resume-as-skip, spec errors."""

import dataclasses
import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from compt.chain import ChainSpec, load_spec, member_train_config, run_chain
from compt.cli import main as cli_main
from compt.config import ConfigError
from compt.engine.checkpoint import load_checkpoint

SPEC = {
    "name": "t",
    "family": "debug",
    "data": {"kind": "synthetic", "num_samples": 64},
    "baseline_epochs": 2,
    "epochs": [2, 1],
    "train": {"global_batch_size": 16, "lr": 1.0e-3, "warmup_steps": 1, "save_every_steps": 2},
}


def _write(tmp_path: Path, **changes) -> Path:
    spec = {**SPEC, "out_dir": str(tmp_path / "run"), **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Baselines, then the chain, of the debug family (a few seconds on CPU)."""
    tmp = tmp_path_factory.mktemp("chain")
    spec = load_spec(_write(tmp))
    individual = run_chain(spec, individual=True)
    chain = run_chain(spec)
    return spec, individual, chain


def test_chain_trains_links_from_their_teacher(finished):
    spec, individual, chain = finished
    root = Path(spec.out_dir)
    assert [m["name"] for m in chain["members"]] == ["debug-S", "debug-L"]
    assert [m["teacher"] for m in chain["members"]] == [None, "debug-S"]
    link = load_checkpoint(root / "chain" / "debug-L" / "final.pt")
    assert link["teacher"]["member"] == "debug-S"
    # The link's schedule is its own, shorter one: 1 epoch of 64 samples at batch 16.
    assert chain["members"][1]["steps"] == 4 and individual["members"][1]["steps"] == 8
    # Accumulated MACs add up; the link also pays its teacher's forward.
    c = chain["members"]
    assert c[1]["accumulated_train_macs"] == pytest.approx(c[0]["train_macs"] + c[1]["train_macs"])
    assert 0 < c[1]["train_macs"] < individual["members"][1]["train_macs"]


def test_first_member_is_shared_between_chain_and_baseline(finished):
    spec, individual, chain = finished
    root = Path(spec.out_dir)
    a = load_checkpoint(root / "chain" / "debug-S" / "final.pt")["model"]
    b = load_checkpoint(root / "individual" / "debug-S" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert chain["members"][0]["metrics"] == individual["members"][0]["metrics"]


def test_summary_and_exports_on_disk(finished):
    spec, _, chain = finished
    root = Path(spec.out_dir) / "chain"
    on_disk = json.loads((root / "summary.json").read_text())
    assert on_disk["members"] == json.loads(json.dumps(chain["members"]))
    for row in on_disk["members"]:
        assert "mean_zeroshot_top1" in row["metrics"]
        export = root / row["export"]
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
        assert model.visual.image_size == (16, 16)


def test_rerun_skips_finished_members(finished, capsys):
    spec, _, chain = finished
    stamp = {p: p.stat().st_mtime_ns for p in Path(spec.out_dir).rglob("final.pt")}
    again = run_chain(spec)
    assert [m["train_macs"] for m in again["members"]] == [m["train_macs"] for m in chain["members"]]
    assert {p: p.stat().st_mtime_ns for p in Path(spec.out_dir).rglob("final.pt")} == stamp


def test_until_lossless_stops_a_link_early(finished, tmp_path):
    spec, individual, _ = finished
    # A twin metric of 0 makes the link lossless at its first check: it must stop there.
    path = _write(
        tmp_path, until_lossless={"enabled": True, "tolerance": 0.5, "check_every_steps": 1}, epochs=[2, 2]
    )
    spec2 = load_spec(path)
    twin = json.loads(json.dumps(individual))
    for m in twin["members"]:
        m["metrics"] = {k: 0.0 for k in m["metrics"]}
    (Path(spec2.out_dir) / "individual").mkdir(parents=True)
    (Path(spec2.out_dir) / "individual" / "summary.json").write_text(json.dumps(twin))
    out = run_chain(spec2)
    link = out["members"][1]
    assert link["until_lossless"] is not None
    assert link["steps"] < 8 and link["epochs"] < 2


def test_until_lossless_without_baseline_is_a_clear_error(tmp_path):
    path = _write(tmp_path, until_lossless={"enabled": True})
    spec = load_spec(path)
    with pytest.raises(ConfigError, match="--individual"):  # the first member trains, the link stops
        run_chain(spec)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"baseline_epoch": 2}, "did you mean 'baseline_epochs'"),
        ({"train": {"lr": 1e-3, "global_batch_sise": 16}}, "did you mean 'global_batch_size'"),
        ({"epochs": [2, 1, 1]}, "one per member"),
        ({"epochs": [2, 0]}, "must be > 0"),
        ({"members": ["debug-L", "debug-S"]}, "ascending size"),
        ({"members": ["debug-XL"]}, "Known: debug-S, debug-L"),
        ({"train": {"out_dir": "x"}}, "the chain sets it per member"),
        ({"train": {"lr": -1.0}}, "lr"),
        ({"eval": {"metric": "mean_zeroshot_top5"}}, "not a metric compt computes"),
    ],
)
def test_bad_specs_fail_before_training(tmp_path, changes, message):
    path = _write(tmp_path, **changes)
    with pytest.raises((ConfigError, ValueError, KeyError), match=message):
        load_spec(path)
    assert not (tmp_path / "run").exists()


def test_links_use_link_overrides_and_baselines_do_not(tmp_path):
    spec = load_spec(_write(tmp_path, link={"warmup_steps": 7, "alpha": "auto"}))
    link = member_train_config(spec, 1, individual=False)
    twin = member_train_config(spec, 1, individual=True)
    assert (link.warmup_steps, link.alpha, link.teacher is not None) == (7, "auto", True)
    assert (twin.warmup_steps, twin.teacher, twin.epochs) == (1, None, 2)


def test_cli_show_and_unknown_key_message(tmp_path, capsys):
    assert cli_main(["chain", "show", str(_write(tmp_path))]) == 0
    assert "debug-L: chain epochs 1" in capsys.readouterr().out
    assert cli_main(["chain", "run", str(_write(tmp_path, famly="debug"))]) == 2
    assert "did you mean 'family'" in capsys.readouterr().err


def test_spec_is_a_frozen_dataclass():
    spec = ChainSpec(family="debug", out_dir="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.out_dir = "y"  # type: ignore[misc]


def test_first_member_is_not_reused_across_different_configs(tmp_path):
    spec = load_spec(_write(tmp_path, members=["debug-S"], epochs=[1], baseline_epochs=1))
    run_chain(spec, individual=True)
    other = load_spec(
        _write(
            tmp_path,
            members=["debug-S"],
            epochs=[1],
            baseline_epochs=1,
            train={**SPEC["train"], "lr": 2.0e-3},
        )
    )
    with pytest.warns(UserWarning, match="another config"):
        run_chain(other)
    a = load_checkpoint(Path(spec.out_dir) / "individual" / "debug-S" / "final.pt")
    b = load_checkpoint(Path(spec.out_dir) / "chain" / "debug-S" / "final.pt")
    assert b["config"]["lr"] == 2.0e-3 and a["config"]["lr"] == 1.0e-3


def test_until_lossless_stops_in_the_metrics_direction(tmp_path):
    # val_loss goes down: within 0.1 nats of the twin's 5.0 means <= 5.1 (a higher-is-better rule
    # would stop at once at 5.2, and never at 3.0 once the twin's score is subtracted the other way).
    from compt.chain import EvalSpec, UntilLossless, _lossless_stop

    spec = ChainSpec(
        family="llama-cpu",
        out_dir=str(tmp_path),
        members=("llama-cpu-S", "llama-cpu-M"),
        eval=EvalSpec(metric="val_loss"),
        until_lossless=UntilLossless(enabled=True, tolerance=0.1),
    )
    (tmp_path / "individual").mkdir()
    twin = {"members": [{"name": "llama-cpu-M", "metrics": {"val_loss": 5.0}}]}
    (tmp_path / "individual" / "summary.json").write_text(json.dumps(twin))
    stop = _lossless_stop(spec, spec.resolved_members()[1])
    assert stop({"val_loss": 5.05}) and stop({"val_loss": 3.0})
    assert not stop({"val_loss": 5.2}) and not stop({})
    assert spec.data.cache_dir == str(tmp_path / "data")  # the chain's members share one tokenizer


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_load_and_validate(path, tmp_path):
    spec = load_spec(path, [f"out_dir={tmp_path}"])  # every member's TrainConfig is built and checked
    assert len(spec.resolved_members()) >= 2
