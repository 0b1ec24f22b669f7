"""compt.chain: a minimal 2-member chain end to end, its baselines, resume-as-skip, spec errors."""

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from compt.chain import ChainSpec, load_spec, member_train_config, run_chain
from compt.cli import main as cli_main
from compt.cli.chain import _load as load_cli_spec
from compt.config import ConfigError
from compt.engine.checkpoint import load_checkpoint
from compt.engine.resume import RunMismatchError
from compt.engine.runlog import read_metrics

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


# Small eval sets: every step's evaluation of the loss test below takes milliseconds.
SMALL_EVAL = {"metric": "val_loss", "options": {"num_images": 8, "val_images": 64, "val_batch_size": 32}}


def test_until_lossless_stops_a_link_on_a_loss_at_the_first_check_within_tolerance(tmp_path):
    """val_loss is lower-is-better: the link stops at the first step whose loss is at most the twin's
    + 0.01 nats (the paradigm's default tolerance), not at the first one above it (issue 12 item 5)."""
    until = {"enabled": True, "check_every_steps": 1}
    spec = load_spec(
        _write(tmp_path, eval=SMALL_EVAL, baseline_epochs=1, epochs=[1, 2], until_lossless=until)
    )
    root = Path(spec.out_dir)

    def run_against(twin: float) -> dict:
        (root / "individual").mkdir(parents=True, exist_ok=True)
        summary = {"members": [{"name": "debug-L", "metrics": {"val_loss": twin}}]}
        (root / "individual" / "summary.json").write_text(json.dumps(summary))
        return run_chain(spec)["members"][1]

    assert run_against(-1e9)["until_lossless"] is None  # out of reach: the link's whole trajectory
    losses = {r["step"]: r["val_loss"] for r in read_metrics(root / "chain/debug-L/metrics.jsonl", "eval")}
    assert sorted(losses) == list(range(1, 9))  # the cheap periodic evaluation ran at every check
    # k: the first step below every earlier one; the twin is set so that k is just within 0.01 nats.
    k = next(s for s in range(2, 9) if losses[s] < min(losses[j] for j in range(1, s)))
    margin = (min(losses[j] for j in range(1, k)) - losses[k]) / 2
    shutil.rmtree(root / "chain" / "debug-L")  # the same link again, from the same teacher
    link = run_against(losses[k] - 0.01 + margin / 2)
    assert link["steps"] == k and link["until_lossless"] == {"stopped_at_step": k, "epochs_needed": 2 * k / 8}
    evals = read_metrics(root / "chain" / "debug-L" / "metrics.jsonl", "eval")
    assert [r["val_loss"] for r in evals[:k]] == pytest.approx([losses[s] for s in range(1, k + 1)])
    assert "mean_zeroshot_top1" in link["metrics"]  # the final evaluation after the stop is the full one


def test_until_lossless_against_twins_of_another_spec_is_refused(finished, tmp_path):
    """The sweep after issue 11: twins trained on other data were a silent, wrong until_lossless target."""
    _, individual, _ = finished
    spec = load_spec(
        _write(tmp_path, until_lossless={"enabled": True}, data={"kind": "synthetic", "num_samples": 32})
    )
    (tmp_path / "run" / "individual").mkdir(parents=True)
    (tmp_path / "run" / "individual" / "summary.json").write_text(json.dumps(individual))  # num_samples 64
    with pytest.raises(ConfigError, match="the twins in .* were trained with another data than this spec"):
        run_chain(spec)
    assert not (tmp_path / "run" / "chain").exists()


def test_exponent_floats_in_a_spec_are_numbers(tmp_path):
    path = _write(tmp_path)
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 1e-3"))
    assert "lr: 1e-3" in path.read_text()
    assert load_spec(path).train["lr"] == 1e-3  # YAML 1.1 read "1e-3" as a string


def test_until_lossless_without_baseline_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path, until_lossless={"enabled": True})
    spec = load_spec(path)  # loads: `--individual` must be able to run first
    with pytest.raises(ConfigError, match="--individual"):
        run_chain(spec)
    assert not (tmp_path / "run" / "chain").exists()  # before the first member trains (issue 11)
    assert cli_main(["chain", "show", str(path)]) == 0
    assert "until_lossless: not ready for the chain yet" in capsys.readouterr().out


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
        ({"eval": {"periodic": ["val_los"]}}, "eval.periodic: 'val_los' is not a metric"),
        ({"eval": {"options": {"val_image": 64}}}, "eval.options.*val_image"),
        ({"until_lossless": {"tolerance": -0.1}}, "absolute tolerance must be a finite number >= 0"),
        ({"until_lossless": {"relative_tolerance": 1.5}}, "a fraction of the twin's value"),
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


def test_a_grown_moments_link_makes_its_teacher_keep_moments(tmp_path):
    spec = load_spec(_write(tmp_path, link={"optimizer_init": "grown"}))
    teacher, link = (
        member_train_config(spec, 0, individual=False),
        member_train_config(spec, 1, individual=False),
    )
    assert teacher.keep_moments and not link.keep_moments and link.optimizer_init == "grown"
    assert member_train_config(spec, 0, individual=True).keep_moments  # one run for both trees
    assert not member_train_config(spec, 1, individual=True).keep_moments
    assert not member_train_config(load_spec(_write(tmp_path)), 0, individual=False).keep_moments


def test_a_chain_with_a_progressive_link_trains_it_in_stages(finished, tmp_path):
    from compt.engine.progressive import Progression, ProgressiveConfig
    from compt.engine.progressive_cost import progressive_macs
    from compt.families import get_member

    spec = load_spec(_write(tmp_path, epochs=[2, 2], link={"progressive": {"schedule": "manual"}}))
    assert member_train_config(spec, 1, individual=True).progressive is None  # the twin trains as usual
    first = Path(finished[0].out_dir) / "chain" / "debug-S"  # the same first member: reused, not retrained
    shutil.copytree(first, Path(spec.out_dir) / "chain" / "debug-S")
    chain = run_chain(spec)
    root = Path(spec.out_dir) / "chain"
    events = [json.loads(line) for line in (root / "debug-L" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events if e["kind"] == "progressive"] == [("grow", 2)]
    prog = Progression(
        ProgressiveConfig(schedule="manual"), get_member("debug-L"), 8, teacher=get_member("debug-S")
    )
    expected = progressive_macs(prog, batch_size=16, teacher=get_member("debug-S")).total_macs
    assert chain["members"][1]["train_macs"] == expected and chain["members"][1]["steps"] == 8
    assert (
        open_clip.create_model("local-dir:" + str(root / "debug-L" / "export")) is not None
    )  # the full member


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"link": {"progressive": {"search_eval_batches": 2}}},
            r"member debug-L: train.progressive: a search phase takes at least",
        ),
        (
            {"link": {"progressive": {"schedule": "manual"}}, "until_lossless": {"enabled": True}},
            "until_lossless stops a link early, but a progressive link",
        ),
    ],
)
def test_progressive_specs_that_cannot_run_fail_at_load(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(_write(tmp_path, **changes))


def test_cli_show_and_unknown_key_message(tmp_path, capsys):
    assert cli_main(["chain", "show", str(_write(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "debug-L: chain epochs 1" in out
    assert 'data (64 samples per epoch): {"kind": "synthetic"' in out  # issue 11: show prints the data
    assert cli_main(["chain", "run", str(_write(tmp_path, famly="debug"))]) == 2
    assert "did you mean 'family'" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["2024", "yes", "runs/a: b", "[x]"])
def test_chain_out_is_a_path_whatever_it_looks_like_in_yaml(tmp_path, out, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(spec=str(_write(tmp_path)), overrides=[], out=out)
    assert load_cli_spec(args).out_dir == out  # the sweep after issue 11: YAML read 2024 as a number


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


def test_chain_run_into_a_log_file_prints_progress_growth_warmup_and_resume(tmp_path):
    """issue 11/12: `compt chain run SPEC > log 2>&1` used to write nothing while it trained."""
    spec = _write(tmp_path, train={**SPEC["train"], "warmup_steps": None})  # Table C's, with its note
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run_into_a_file(name: str) -> str:
        with open(tmp_path / name, "w") as log:
            rc = subprocess.run([sys.executable, "-m", "compt", "chain", "run", str(spec)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, timeout=300).returncode  # fmt: skip
        text = (tmp_path / name).read_text()
        assert rc == 0, text[-3000:]
        return text

    text = run_into_a_file("first.log")
    for member, steps, epochs in (("debug-S", 8, "2.00"), ("debug-L", 4, "1.00")):
        line = rf"compt\.train: {member} step {steps}/{steps} epoch {epochs}/{epochs} loss \d+\.\d{{4}}"
        assert re.search(line + r".* [\d.]+ samples/s eta 0:00:00\n", text), text
    assert "t/chain: debug-L, member 2/2, link from debug-S, 1 epochs" in text
    assert "grew debug-L from debug-S: width=insert depth=duplicate" in text
    assert "warmup: the paper's 8000 steps exceed 10% of this 8-step run; using 1" in text
    assert "debug-S eval at step 8: " in text and "mean_zeroshot_top1" in text
    link = tmp_path / "run" / "chain" / "debug-L"
    (link / "final.pt").unlink()  # as if killed before its final.pt: step_2.pt is the newest
    text = run_into_a_file("rerun.log")
    assert f"debug-S: trained before ({tmp_path / 'run' / 'chain' / 'debug-S' / 'final.pt'})" in text
    assert f"debug-L: resumed from {link / 'step_2.pt'} at step 2/4 (epoch 0)" in text


def test_a_rerun_with_another_config_is_refused_then_retrained_keeping_the_old_run(tmp_path):
    """issue 11: `--set epochs=[2,3] --set train.lr=1e-2` after a finished chain retrained nothing, yet
    summary.json recorded the new config and 3 epochs for a member that trained 1."""
    path = _write(tmp_path)
    run_chain(load_spec(path))
    root = tmp_path / "run" / "chain"
    before = {p: p.stat().st_mtime_ns for p in [*root.rglob("final.pt"), root / "summary.json"]}
    changed = load_spec(path, ["epochs=[2,3]", "train.lr=1e-2"])
    with pytest.raises(RunMismatchError) as e:
        run_chain(changed)
    message = str(e.value)
    for fragment in ("debug-S/final.pt belongs to a different run", "train.lr is 0.001 there but 0.01 now",
                     "nothing was trained", "new out_dir", "--retrain", "debug-S.replaced-1"):  # fmt: skip
        assert fragment in message, message
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing trained, nothing rewritten
    summary = run_chain(changed, retrain=True)
    assert [(m["steps"], m["epochs"]) for m in summary["members"]] == [(8, 2.0), (12, 3.0)]
    for name, steps in (("debug-S", 8), ("debug-L", 4)):  # the old runs, moved aside, not deleted
        old = load_checkpoint(root / f"{name}.replaced-1" / "final.pt")
        assert (old["steps"], old["config"]["lr"]) == (steps, 1e-3)
    on_disk = json.loads((root / "summary.json").read_text())
    # what trained, as numbers: `1e-2` was a YAML 1.1 string in summary.json before (issue 11's sweep)
    assert on_disk["config"]["train"]["lr"] == 1e-2 and on_disk["members"][1]["steps"] == 12


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
