"""FSDP2 (compt.engine.fsdp, ``train.parallel=fsdp2``): 2 gloo ranks under torchrun train a chain link
exactly like 1 process with the same global batch, for both paradigms, and resume exactly.

A link exercises every path that crosses ranks: growth on rank 0 and the broadcast load, the sharded
projection T, the auto alpha, gradient accumulation without a reduce-scatter, gradient clipping on
DTensors, the full checkpoint gathered to rank 0 and, for the resume, evaluation on a gathered copy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compt.cli import main as cli_main
from compt.engine.checkpoint import load_checkpoint
from compt.engine.runlog import read_metrics
from compt.paradigms.lm.data import stdlib_root

pytestmark = pytest.mark.distributed

torch.set_num_threads(1)

_MEMBER = (
    "  - {{name: {name}, vocab_size: 300, hidden_size: {width}, intermediate_size: {mlp}, "
    "num_hidden_layers: {layers}, num_attention_heads: {heads}, num_key_value_heads: {kv}, head_dim: 16, "
    "max_position_embeddings: 32, tie_word_embeddings: true}}\n"
)


def _torchrun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, "-m", "compt", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny tied GQA family, real text, a shared data cache and a trained teacher (lmt-S)."""
    root = tmp_path_factory.mktemp("fsdp-lm")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in sorted(stdlib_root().glob("*.py"))[:60]:
        (corpus / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    family = root / "lmt.yaml"
    family.write_text(
        "name: lmt\nparadigm: lm\nmembers:\n"
        + _MEMBER.format(name="lmt-S", width=32, mlp=64, layers=1, heads=2, kv=1)
        + _MEMBER.format(name="lmt-M", width=64, mlp=128, layers=2, heads=4, kv=2)
    )
    common = ["--family", str(family), "--data", str(corpus), "--batch-size", "8", "--device", "cpu"]
    common += [f"--set=data.{k}={v}" for k, v in dict(vocab_size=300, seq_len=32, val_fraction=0.2).items()]
    common += ["--set=data.eval_windows=4", f"--set=data.cache_dir={root / 'data'}"]
    assert (
        cli_main(["train", "--member", "lmt-S", *common, "--steps", "3", "--out", str(root / "teacher")]) == 0
    )
    student = ["--member", "lmt-M", "--teacher", str(root / "teacher" / "final.pt"), *common]
    return root, student


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """debug-S (teacher) and the debug-L link arguments on the embedded synthetic set."""
    root = tmp_path_factory.mktemp("fsdp-clip")
    common = ["--data", "synthetic", "--set", "data.num_samples=64", "--batch-size", "8", "--device", "cpu"]
    assert (
        cli_main(["train", "--member", "debug-S", *common, "--steps", "2", "--out", str(root / "teacher")])
        == 0
    )
    return root, ["--member", "debug-L", "--teacher", str(root / "teacher" / "final.pt"), *common]


def _link(out: Path, base: list[str], *extra: str, parallel: str = "fsdp2") -> list[str]:
    run = ["--alpha", "auto", "--accum-steps", "2", "--log-every", "1", "--seed", "3"]
    return ["train", *base, *run, "--parallel", parallel, "--out", str(out), *extra]


# An LM under DDP too: its per-rank task loss (not CLIP's global one) goes through the same step.
@pytest.mark.parametrize(("paradigm", "parallel"), [("lm", "fsdp2"), ("clip", "fsdp2"), ("lm", "ddp")])
def test_two_gloo_ranks_match_one_process(paradigm, parallel, request):
    root, base = request.getfixturevalue(paradigm)
    root = root / parallel
    # CLIP without clipping: under DDP and FSDP2 alike, logit_scale's gradient is world-size times the
    # one-process one (every rank's gathered loss reaches all its logits, then the engine scales the
    # loss by the world size). AdamW's update does not see that scale, the global norm does.
    args = ["--steps", "4", "--save-every", "0"] + (["--grad-clip", "1.0"] if paradigm == "lm" else [])
    assert cli_main(_link(root / "one", base, *args, parallel=parallel)) == 0  # 1 process: plain
    _torchrun(_link(root / "two", base, *args, parallel=parallel), cwd=root)

    one, two = (read_metrics(root / run / "metrics.jsonl", "train") for run in ("one", "two"))
    assert read_metrics(root / "two" / "metrics.jsonl", "start")[0]["parallel"] == parallel
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    keys = ("loss_task", "loss_ifd", "alpha") + (("grad_norm",) if paradigm == "lm" else ())
    for a, b in zip(one, two, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["step"], key)
    final_one, final_two = (
        load_checkpoint(root / "one" / "final.pt"),
        load_checkpoint(root / "two" / "final.pt"),
    )
    assert final_one["model"].keys() == final_two["model"].keys()  # a plain state dict, both tied keys
    for key, value in final_one["model"].items():  # AdamW turns fp32 rounding into up to ~lr/50 (test_dist)
        torch.testing.assert_close(final_two["model"][key], value, atol=1e-4, rtol=1e-4, msg=key)
    if paradigm == "lm":
        model = final_two["model"]
        torch.testing.assert_close(
            model["lm_head.weight"], model["model.embed_tokens.weight"], atol=0, rtol=0
        )


def test_fsdp2_resumes_exactly_from_its_gathered_checkpoint(lm):
    root, base = lm
    args = ["--steps", "5", "--save-every", "2", "--keep-last", "0", "--eval-every", "2"]
    _torchrun(_link(root / "full", base, *args), cwd=root)
    step = load_checkpoint(root / "full" / "step_4.pt")
    assert set(step["optimizer"]["state"]) == set(range(len(step["optimizer"]["state"])))  # DDP's layout
    # Interrupted after step 2: what a run killed before step 4 leaves behind.
    resumed = root / "resumed"
    resumed.mkdir()
    for name in ("step_2.pt", "step_2.pt.sha256", "metrics.jsonl"):
        (resumed / name).write_bytes((root / "full" / name).read_bytes())
    _torchrun(_link(resumed, base, *args), cwd=root)
    a, b = load_checkpoint(root / "full" / "final.pt"), load_checkpoint(resumed / "final.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=0, rtol=0, msg=key)
    losses = [
        [r["loss"] for r in read_metrics(run / "metrics.jsonl", "train")] for run in (root / "full", resumed)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 5
    evals = read_metrics(resumed / "metrics.jsonl", "eval")  # rank 0 evaluated a gathered copy
    assert [r["step"] for r in evals] == [2, 4, 5] and all(r["val_loss"] > 0 for r in evals)
