"""compt finetune (compt.cli.finetune): the set, both modes and AutoProg-Zero from the command line; bad
input is one clear line and exit status 2 (issue 16)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from compt.cli import main
from compt.engine.checkpoint import load_checkpoint, save_checkpoint
from compt.families import get_member
from compt.paradigms.clip.finetune.sets import load_splits

SHAPES = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def member_ckpt(tmp_path_factory):
    """debug-L (16 px, patch 4, 2 blocks) saved as a run of the embedded scenes would save it."""
    member = get_member("debug-L")
    torch.manual_seed(0)
    data = {"kind": "synthetic", "synthetic": {"shapes": SHAPES, "colours": ["red", "blue"]}}
    payload = {"model": member.create().state_dict(), "model_cfg": member.model_config()}
    payload |= {"member": member.name, "paradigm": "clip", "config": {"member": member.name, "data": data}}
    return save_checkpoint(tmp_path_factory.mktemp("member") / "final.pt", payload)


@pytest.fixture(scope="module")
def made_set(member_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("sets") / "shape"
    argv = [
        "finetune",
        "--make-set",
        str(out),
        "--like",
        str(member_ckpt),
        "--num-train",
        "24",
        "--num-test",
        "12",
    ]
    assert main(argv) == 0
    return out


def test_make_set_like_a_member_uses_its_image_size_and_scene_vocabulary(made_set):
    train, test = load_splits(made_set / "train", made_set / "test", 16)
    assert train.classnames == SHAPES and len(train.labels) == 24 and len(test.labels) == 12
    assert next((made_set / "train").rglob("*.png")).stat().st_size > 0


@pytest.mark.parametrize(
    "extra, label",
    [
        (["--mode", "linear-probe"], "linear-probe"),
        (["--steps", "4"], "full"),
        (["--steps", "4", "--progressive", "autoprog-zero", "--schedule", "manual", "--sid"],
         "autoprog-zero-manual-sid"),
    ],
)  # fmt: skip
def test_finetune_prints_the_test_top1_last_and_files_the_result_by_member(
    member_ckpt, made_set, capsys, extra, label
):
    argv = [str(member_ckpt), "--train", str(made_set / "train"), "--test", str(made_set / "test")]
    assert main(["finetune", *argv, "--batch-size", "8", "--lr", "1e-3", *extra]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"test top-1 \d+\.\d\d", last)
    # Filed beside the member (its run folder), where compt report looks.
    result = json.loads(
        (member_ckpt.parent / "finetune" / "shape" / f"{label}-seed0" / "result.json").read_text()
    )
    assert last == f"test top-1 {result['test_top1']:.2f}" and result["label"] == label
    assert result["member"] == "debug-L" and result["num_classes"] == 3


def _bad_inputs(tmp_path, member_ckpt, made_set):
    train, test = str(made_set / "train"), str(made_set / "test")
    ok = [str(member_ckpt), "--train", train, "--test", test, "--out", str(tmp_path / "run")]
    one_class = tmp_path / "one"
    first = sorted(p for p in (made_set / "train").iterdir() if p.is_dir())[0]
    shutil.copytree(first, one_class / "train" / first.name)
    missing = tmp_path / "missing"
    shutil.copytree(made_set, missing)
    shutil.rmtree(next(p for p in (missing / "test").iterdir() if p.is_dir()))
    not_clip = save_checkpoint(
        tmp_path / "lm.pt", {"model": {}, "model_cfg": {"hidden_size": 8}, "paradigm": "clip"}
    )
    export = tmp_path / "export"
    assert main(["export", str(member_ckpt), str(export)]) == 0
    done = ["--out", str(tmp_path / "done")]
    assert main(["finetune", *ok[:5], *done, "--steps", "1", "--batch-size", "8"]) == 0  # a finished run
    return [
        (ok[:1] + ["--train", train], "missing --test"),
        (["--train", train, "--test", test], "missing CKPT"),
        (ok + ["--mode", "linear-probe", "--progressive", "autoprog-zero"], "needs mode=full"),
        (ok + ["--task", "count"], "--task only apply with --make-set"),
        (ok + ["--set", "autoprog_zero.shedule=manual"], "did you mean 'schedule'"),
        (ok + ["--batch-size", "64"], "fewer than one batch"),
        (
            ok + ["--steps", "2", "--batch-size", "8", "--progressive", "autoprog-zero"],
            "cannot hold autoprog_zero.num_stages=4",
        ),
        (ok + ["--train", str(one_class / "train")], "at least two"),
        (ok + ["--test", str(missing / "test")], "class folders differ"),
        ([str(not_clip), *ok[1:]], "does not hold a clip model"),
        ([str(tmp_path / "nothing.pt"), *ok[1:]], "does not exist"),
        (
            ok[:5] + done + ["--mode", "linear-probe"],
            "belongs to a different run: train.mode is 'full' there",
        ),
        (
            ["--make-set", str(tmp_path / "s"), "--like", str(export)],
            "an export folder keeps no training config",
        ),
        (["--make-set", str(tmp_path / "s"), str(member_ckpt)], "give it no CKPT"),
    ]


def test_bad_input_is_one_clear_line_and_exit_status_2(member_ckpt, made_set, tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path, member_ckpt, made_set):
        capsys.readouterr()
        assert main(["finetune", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("compt finetune: error: ") and len(err.splitlines()) == 1, err
        assert message in err, (message, err)


def _cli(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("COMPT_DEBUG", None)
    cmd = [sys.executable, "-m", "compt", "finetune", *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_at_the_next_step_and_the_rerun_ends_like_an_uninterrupted_run(
    member_ckpt, made_set, tmp_path
):
    common = ["--train", str(made_set / "train"), "--test", str(made_set / "test"), "--steps", "40",
              "--batch-size", "8", "--lr", "1e-3", "--progressive", "autoprog-zero", "--schedule", "manual",
              "--save-every", "1", "--device", "cpu"]  # fmt: skip
    reference = _cli(str(member_ckpt), *common, "--out", str(tmp_path / "whole"))
    assert reference.wait(timeout=600) == 0, reference.communicate()[1][-3000:]
    out = tmp_path / "stopped"
    proc = _cli(str(member_ckpt), *common, "--out", str(out))
    deadline = time.monotonic() + 600
    while proc.poll() is None and not any(out.glob("step_*.pt")) and time.monotonic() < deadline:
        time.sleep(0.003)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM at step" in err and "rerun the same command" in err and "Traceback" not in err
    assert not (out / "final.pt").exists()
    rerun = _cli(str(member_ckpt), *common, "--out", str(out))
    assert rerun.wait(timeout=600) == 0, rerun.communicate()[1][-3000:]
    a, b = (load_checkpoint(folder / "final.pt")["model"] for folder in (tmp_path / "whole", out))
    assert all(torch.equal(a[k], b[k]) for k in a)
