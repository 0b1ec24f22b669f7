"""benchmarks/gpu_check.py: its dry run (the plan a GPU machine would run), budgets, failure modes.

Without CUDA the script renders every stage's commands and checks each against the parser of the
program it launches; this is what CI can prove. The GPU run itself is benchmarks/results/gpu/.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402
from gpu_check_lib import Command, check_command, mfu, peak_bf16_tflops, run_stage  # noqa: E402

from compt.cost import member_cost  # noqa: E402
from compt.engine.train import TrainConfig, train_member  # noqa: E402
from compt.paradigms.clip.data import DataConfig  # noqa: E402

# With CUDA, gpu_check.main would run the stages for real (minutes): those tests are for CPU machines.
dry_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA here: main() would run the stages")


def _report(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    return gpu_check.main(["--out", str(out)]), out


@dry_only
def test_dry_run_checks_every_stage_and_exits_0(dry_run):
    code, out = dry_run
    report = _report(out)
    assert code == 0 and report["mode"] == "dry_run"
    assert list(report["stages"]) == [s.name for s in gpu_check.STAGES if s.default]
    for name, stage in report["stages"].items():
        assert stage["status"] == "planned", (name, stage["error"])
        assert stage["commands"] and len(stage["result"]["checks"]) == len(stage["commands"])
    # The trainers' commands were parsed by compt's CLI and the member built: ViT-B/16's real size.
    (eager,) = report["stages"]["train_eager"]["result"]["checks"]
    assert eager["member"] == "ViT-B/16" and eager["params"] > 100e6 and eager["precision"] == "bf16"
    assert "open_clip_train.main" in report["stages"]["open_clip"]["commands"][0]
    assert "--compile" in report["stages"]["train_compile"]["commands"][0]
    assert report["stages"]["link"]["commands"][1].count("--teacher") == 1
    assert "--parallel fsdp2" in report["stages"]["fsdp2"]["commands"][0]
    assert "--parallel ddp" in report["stages"]["ddp"]["commands"][0]
    log = (out / "gpu_check.log").read_text()
    assert "no CUDA device" in log and "[train_compile] planned" in log


@dry_only
def test_dry_run_writes_the_result_schema(dry_run):
    summary = _report(dry_run[1])["summary"]
    assert set(summary) >= {
        "samples_per_s",
        "mfu",
        "compt_vs_open_clip",
        "link_overhead",
        "loader_keeps_up",
        "fsdp2",
    }
    assert summary["compt_vs_open_clip"]["goal"] == 1.3
    assert all(v is None for v in summary["samples_per_s"].values())  # nothing was trained


def test_the_default_stages_fit_in_eight_minutes():
    budgets = sum(s.budget_s for s in gpu_check.STAGES if s.default)
    assert gpu_check.TOTAL_BUDGET_S == 480 and budgets + gpu_check.PREP_BUDGET_S <= 480


def test_an_unwritable_out_is_refused_before_anything_runs(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert gpu_check.main(["--out", str(blocker / "gpu")]) == 2
    assert "--out" in capsys.readouterr().err and not (blocker.parent / "gpu_check.log").exists()


def test_an_unknown_stage_names_the_nearest(capsys):
    assert gpu_check.main(["--out", "unused", "--only", "train_eagre"]) == 2
    assert "did you mean 'train_eager'" in capsys.readouterr().err


@dry_only
def test_a_missing_package_is_reported_before_any_stage(tmp_path, monkeypatch, capsys):
    # As on a GPU machine without the bench extra: OpenCLIP's trainer cannot import pandas.
    monkeypatch.setitem(sys.modules, "pandas", None)
    for name in [m for m in sys.modules if m.startswith("open_clip_train")]:
        monkeypatch.delitem(sys.modules, name)
    assert gpu_check.main(["--out", str(tmp_path), "--only", "open_clip,ddp"]) == 0  # a dry run still
    report = _report(tmp_path)
    (problem,) = report["missing"]["open_clip"]
    assert "pandas" in problem and "pip install -e '.[bench]'" in problem
    assert report["stages"]["open_clip"]["status"] == "skipped"
    assert report["stages"]["ddp"]["status"] == "planned"  # the others are still checked
    lines = capsys.readouterr().out.splitlines()
    warned = next(i for i, line in enumerate(lines) if "open_clip will be skipped" in line)
    assert warned < next(i for i, line in enumerate(lines) if line.startswith("[open_clip]"))


@pytest.mark.parametrize(
    "args, match",
    [
        (["--member", "ViT-B/16", "--bogus-flag"], "rejects"),  # argparse: unknown flag
        (["--member", "ViT-B/16", "--batch-size", "0"], "global_batch_size"),  # TrainConfig validation
        (["--member", "ViT-B/61"], "ViT-B/16"),  # unknown member: the nearest one is named
    ],
)
def test_a_bad_compt_command_fails_its_check(args, match):
    with pytest.raises((ValueError, KeyError), match=match):
        check_command(Command([sys.executable, "-m", "compt", "train", *args], kind="compt"))


def test_a_bad_open_clip_command_fails_its_check():
    with pytest.raises((ValueError, SystemExit)):
        check_command(
            Command([sys.executable, "-m", "open_clip_train.main", "--no-such-flag"], kind="open_clip")
        )


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_table_matches_cuda_device_names(name, peak):
    found = peak_bf16_tflops(name)
    assert (found[1] if found else None) == peak


def test_mfu_is_twice_the_training_macs_over_the_peak():
    cost = member_cost("debug-S", 1)
    macs_per_step = 256 * cost.train_macs + cost.update_macs
    at_peak = 989e12 / (2 * macs_per_step / 256)  # samples/s that would use every FLOP
    assert mfu(at_peak, 256, macs_per_step, 989.0) == pytest.approx(1.0)
    assert mfu(at_peak / 4, 256, macs_per_step, 989.0) == pytest.approx(0.25)
    assert mfu(at_peak, 256, macs_per_step, None) is None  # a GPU missing from the table


def test_read_train_reads_a_real_run(tmp_path):
    plan = gpu_check.Plan(work=tmp_path, device_count=0, peak_tflops=1.0)
    cfg = TrainConfig(member="debug-S", data=DataConfig(num_samples=64), out_dir=str(tmp_path / "eager"),
                      steps=6, global_batch_size=16, log_every_steps=2, save_every_steps=0)  # fmt: skip
    train_member(cfg)
    result = gpu_check.read_train(plan, "eager")
    assert result["steps_logged"] == 6 and len(result["losses"]) == 3
    assert (
        result["macs_per_step"]
        == 16 * member_cost("debug-S", 4).train_macs + member_cost("debug-S").update_macs
    )
    assert result["mfu"] == pytest.approx(result["samples_per_s"] / 16 * 2 * result["macs_per_step"] / 1e12)
    assert result["cuda_max_allocated_gib"] is None  # CPU: no CUDA memory counters


def test_a_stage_over_budget_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    grandchild = "import time; time.sleep(60)"
    script = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)"
    )
    with open(tmp_path / "log", "wb") as log:
        start = time.perf_counter()
        status, wall_s, error = run_stage([Command([sys.executable, "-c", script])], 2.0, log)
    assert status == "timed_out" and "budget" in error and time.perf_counter() - start < 15
    assert "started" in (tmp_path / "log").read_text()
    pid = int(pid_file.read_text())
    for _ in range(50):  # the group got SIGKILL; its reaping by init can take a moment
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid), "a grandchild (a torchrun rank, a DataLoader worker) outlived its stage"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split()[2] == "Z")  # a zombie is dead


def test_nan_rates_are_written_as_null(tmp_path):
    gpu_check._write_json(tmp_path / "r.json", {"a": [math.nan, 1.0], "b": {"c": math.inf}})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [None, 1.0], "b": {"c": None}}
