"""Data parallelism: 2 gloo ranks under torchrun train exactly like 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compt.cli import main as cli_main
from compt.engine.runlog import read_metrics
from compt.paradigms.clip.loss import multi_caption_clip_loss

pytestmark = pytest.mark.distributed

torch.set_num_threads(1)


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _train_args(out: Path, teacher: Path) -> list[str]:
    return [
        "--member",
        "debug-L",
        "--teacher",
        str(teacher),
        "--alpha",
        "auto",
        "--data",
        "synthetic",
        "--set",
        "data.num_samples=64",
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--save-every",
        "0",
        "--seed",
        "3",
        # issue 13: MSG's parametrized masks under DDP, removed at step 3; the teacher off after step 4
        "--set",
        "width=msg",
        "--set",
        "mask_ramp_fraction=0.6",
        "--set",
        "alpha_schedule=step",
        "--set",
        "alpha_schedule_fraction=0.8",
    ]


def test_two_gloo_ranks_match_one_process(tmp_path):
    # A link exercises everything that crosses ranks: gathered features for L_task, per-rank L_IFD,
    # the auto alpha (averaged distance), the projection's gradients, growth masks and their removal.
    teacher_args = [
        "train",
        "--member",
        "debug-S",
        "--data",
        "synthetic",
        "--set",
        "data.num_samples=64",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "teacher"),
    ]
    assert cli_main(teacher_args) == 0
    teacher = tmp_path / "teacher" / "final.pt"
    assert cli_main(["train", *_train_args(tmp_path / "one", teacher)]) == 0
    _torchrun(["-m", "compt", "train", *_train_args(tmp_path / "two", teacher)], cwd=tmp_path)

    one = read_metrics(tmp_path / "one" / "metrics.jsonl", "train")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl", "train")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two, strict=True):
        for key in ("loss_task", "loss_ifd", "loss", "alpha", "logit_scale"):
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["step"], key)
    assert one[0]["mse_image"] < 1e-10 and one[-1]["alpha"] == 0  # starts as its teacher; distils 4 steps
    start = read_metrics(tmp_path / "two" / "metrics.jsonl", "start")[0]
    assert start["world_size"] == 2
    final_one = torch.load(tmp_path / "one" / "final.pt", weights_only=False)
    final_two = torch.load(tmp_path / "two" / "final.pt", weights_only=False)
    assert final_one["train_macs"] == final_two["train_macs"] and final_one["samples_seen"] == 40
    for key, value in final_one["model"].items():
        torch.testing.assert_close(final_two["model"][key], value, atol=1e-4, rtol=1e-4, msg=key)


_UNEQUAL_BATCHES = textwrap.dedent(
    """
    import json, sys, torch
    from compt.engine import dist
    from compt.paradigms.clip.loss import multi_caption_clip_loss
    info = dist.init_distributed("cpu")
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(7, 8, generator=g), torch.randn(7, 3, 8, generator=g)
    # rank 0 holds rows 0..2 (one sample skipped by its loader), rank 1 rows 3..6; nominal 4 each
    rows = slice(0, 3) if info.rank == 0 else slice(3, 7)
    mine = image[rows].clone().requires_grad_(True)
    loss = multi_caption_clip_loss(mine, text[rows], torch.tensor(10.0), local_batch_size=4)
    (loss * info.world_size).backward()  # what the trainer does before DDP averages over ranks
    grads = dist.all_gather_object(mine.grad.tolist())
    if info.rank == 0:
        json.dump({"loss": loss.item(), "grad": grads[0] + grads[1]}, open(sys.argv[1], "w"))
    dist.teardown(info)
    """
)


def test_skipped_samples_on_one_rank_are_masked_exactly(tmp_path):
    script = tmp_path / "unequal.py"
    script.write_text(_UNEQUAL_BATCHES)
    _torchrun([str(script), str(tmp_path / "out.json")], cwd=tmp_path)
    got = json.loads((tmp_path / "out.json").read_text())
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(7, 8, generator=g), torch.randn(7, 3, 8, generator=g)
    image.requires_grad_(True)
    loss = multi_caption_clip_loss(image, text, torch.tensor(10.0))  # one process, the 7 real samples
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
    # Sum over ranks of each rank's local-slice gradient = the gradient of the global loss.
    torch.testing.assert_close(torch.tensor(got["grad"]) / 2, image.grad, atol=1e-6, rtol=1e-5)


def test_a_torchrun_job_on_a_folder_in_use_stops_on_every_rank(tmp_path):
    """Only rank 0 takes the lock (issue 11); its refusal reaches rank 1, which must not wait forever."""
    hold = "import sys, time; from compt.engine.lock import FolderLock; FolderLock(sys.argv[1]).acquire(); "
    hold += "print('held', flush=True); time.sleep(300)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        args = ["--member", "debug-S", "--data", "synthetic", "--set", "data.num_samples=16", "--steps", "1",
                "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "run")]  # fmt: skip
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd = [*torchrun, "-m", "compt", "train", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(f"is in use by another run: pid {holder.pid}") == 2, output[-4000:]  # both ranks
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_two_gloo_ranks_grow_and_search_like_one_process(tmp_path):
    """AutoProg-One (issue 15): the same candidate and choice on every rank, the supernet's skipped blocks
    under DDP (find_unused_parameters during the searches only), re-wrapped at every growth."""
    args = ["--member", "debug-L", "--data", "synthetic", "--set", "data.num_samples=64", "--steps", "40",
            "--batch-size", "8", "--log-every", "1", "--device", "cpu", "--save-every", "0", "--seed", "1",
            "--progressive", "search", "--set", "progressive.search_eval_batches=2"]  # fmt: skip
    assert cli_main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    _torchrun(["-m", "compt", "train", *args, "--out", str(tmp_path / "two")], cwd=tmp_path)
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    events = [
        [(r["event"], r["step"], r.get("choice")) for r in run if r["kind"] == "progressive"]
        for run in (one, two)
    ]
    assert events[0] == events[1] and [e[0] for e in events[0]].count("choose") == 3
    losses = [[r["loss"] for r in run if r["kind"] == "train"] for run in (one, two)]
    assert len(losses[0]) == 40 and losses[1] == pytest.approx(losses[0], abs=1e-5, rel=1e-5)
    final_one = torch.load(tmp_path / "one" / "final.pt", weights_only=False)
    final_two = torch.load(tmp_path / "two" / "final.pt", weights_only=False)
    assert final_one["train_macs"] == final_two["train_macs"]
    for key, value in final_one["model"].items():
        torch.testing.assert_close(final_two["model"][key], value, atol=1e-4, rtol=1e-4, msg=key)
