"""compt.paradigms.clip.finetune.train (+ .stages): the full fine-tune on the engine, AutoProg-Zero's
stages as they train, and exact resume across a stage boundary (issue 16)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from compt.engine.checkpoint import load_checkpoint, save_checkpoint
from compt.engine.runlog import read_metrics
from compt.paradigms.clip.families import vit_member
from compt.paradigms.clip.finetune.config import FinetuneConfig
from compt.paradigms.clip.finetune.head import build_classifier, load_clip, top1
from compt.paradigms.clip.finetune.search import AutoProgZeroConfig
from compt.paradigms.clip.finetune.sets import load_splits, write_finetune_set
from compt.paradigms.clip.finetune.train import finetune, load_finetuned

# 4 blocks, so each of AutoProg-Zero's 4 block groups holds one block; 16 px in 4 px patches.
MEMBER = vit_member(
    "ft-4blocks", "test", width=16, layers=4, text_width=16, text_layers=1, embed_dim=8, head_width=8,
    patch_size=4, image_size=16, context_length=16,
)  # fmt: skip
# The search at its smallest: 1 NTK batch and 2 ZiCo batches of 2 images per candidate.
SEARCH = AutoProgZeroConfig(search_batch_size=2, ntk_batches=1, zico_batches=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    payload = {
        "model": MEMBER.create().state_dict(),
        "model_cfg": MEMBER.model_config(),
        "member": MEMBER.name,
    }
    ckpt = save_checkpoint(root / "member" / "final.pt", payload | {"paradigm": "clip"})
    train, test = write_finetune_set(root / "set", "shape", image_size=16, num_train=48, num_test=24)
    return root, ckpt, train, test


def _cfg(setup, out, **kw) -> FinetuneConfig:
    _, ckpt, train, test = setup
    base = dict(checkpoint=str(ckpt), train_dir=str(train), test_dir=str(test), out_dir=str(out), steps=8,
                global_batch_size=8, lr=3e-3, save_every_steps=1, keep_last=0, log_every_steps=2)  # fmt: skip
    return FinetuneConfig(**(base | kw))


def _blocks_changed(before: dict, after: dict) -> list[int]:
    def moved(b: int) -> bool:
        prefix = f"visual.transformer.resblocks.{b}."
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    return [b for b in range(4) if moved(b)]


def test_a_full_fine_tune_writes_its_result_weights_and_log(setup, tmp_path):
    _, ckpt, train_dir, test_dir = setup
    result = finetune(_cfg(setup, tmp_path / "run"))
    doc = json.loads((tmp_path / "run" / "result.json").read_text())
    assert doc["kind"] == "finetune" and doc["label"] == "full" and doc["member"] == "ft-4blocks"
    assert doc["test_top1"] == result.test_top1 and doc["set"] == "set" and result.steps == 8
    # Before the first step the head is the zero-shot classifier: its top-1 is the zero-shot top-1.
    clip, model_cfg, _ = load_clip(ckpt)
    train, test = load_splits(train_dir, test_dir, 16)
    zero_shot = build_classifier(clip, model_cfg, train.classnames, train.templates)
    assert result.zero_shot_top1 == pytest.approx(top1(zero_shot, test.images, test.labels))
    # final.pt holds the fine-tuned classifier: it scores the reported test top-1 and has moved.
    tuned = load_finetuned(tmp_path / "run" / "final.pt")
    assert top1(tuned, test.images, test.labels) == pytest.approx(result.test_top1)
    assert not torch.equal(tuned.head.weight, zero_shot.head.weight)
    payload = load_checkpoint(tmp_path / "run" / "final.pt")
    assert result.train_macs == 8 * payload["macs_per_step"] > 0  # every step the same, exact (App. C.2)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    kinds = [(r["kind"], r["step"]) for r in records]
    assert kinds == [("start", 0), ("eval", 0)] + [("train", s) for s in (2, 4, 6, 8)] + [
        ("eval", 8), ("final", 8),
    ]  # fmt: skip
    assert records[-1]["test_top1"] == result.test_top1 and records[-1]["train_macs"] == result.train_macs
    # A finished run returns at once, training nothing and logging nothing.
    assert finetune(_cfg(setup, tmp_path / "run")) == result
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == len(records)


def test_the_linear_probe_mode_fits_on_frozen_features_and_files_its_result(setup, tmp_path):
    result = finetune(_cfg(setup, tmp_path / "probe", mode="linear-probe"))
    assert result.label == "linear-probe" and result.train_macs is None and 0 <= result.test_top1 <= 100
    assert result.probe["c"] > 0 and result.probe["num_train"] == 48 and result.probe["num_classes"] == 8
    assert json.loads((tmp_path / "probe" / "result.json").read_text())["test_top1"] == result.test_top1
    assert not (tmp_path / "probe" / "final.pt").exists()
    # The run's seed draws the probe's validation split, as it draws everything else of a run.
    other = finetune(_cfg(setup, tmp_path / "probe-1", mode="linear-probe", seed=1))
    assert other.probe["val_top1"] != result.probe["val_top1"]


def test_each_autoprog_zero_stage_trains_exactly_its_blocks_at_its_resolution(setup, tmp_path):
    apz = AutoProgZeroConfig(schedule="manual")
    result = finetune(_cfg(setup, tmp_path / "apz", progressive="autoprog-zero", autoprog_zero=apz))
    stages = [r for r in read_metrics(tmp_path / "apz" / "metrics.jsonl") if r["kind"] == "stage"]
    assert [(r["step"], r["level"], r["resolution"]) for r in stages] == [
        (0, 1, 4),
        (2, 2, 8),
        (4, 3, 12),
        (6, 4, 16),
    ]
    macs = [r["macs_per_step"] for r in stages]
    assert macs == sorted(macs) and len(set(macs)) == 4  # more blocks and more pixels cost more
    assert result.train_macs == 2 * sum(macs)  # 2 steps per stage, nothing searched
    # Level l trains block groups 0..l-1 (K = 4 blocks, one per group); the head always trains.
    start = {k: v for k, v in load_checkpoint(setup[1])["model"].items() if k.startswith("visual.")}
    states = [start] + [load_checkpoint(tmp_path / "apz" / f"step_{s}.pt")["model"] for s in (2, 4, 6)]
    states.append(load_checkpoint(tmp_path / "apz" / "final.pt")["model"])
    changed = [_blocks_changed(a, b) for a, b in zip(states, states[1:], strict=False)]
    assert changed == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert not torch.equal(states[1]["head.weight"], states[2]["head.weight"])


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """One uninterrupted run per schedule (every step checkpointed), shared by the resume cases."""
    runs = {}

    def get(schedule: str, sid: bool):
        if (schedule, sid) not in runs:
            out = tmp_path_factory.mktemp(f"whole-{schedule}")
            apz = replace(SEARCH, schedule=schedule, sid=sid)
            runs[schedule, sid] = (
                out,
                finetune(_cfg(setup, out, progressive="autoprog-zero", autoprog_zero=apz)),
            )
        return runs[schedule, sid]

    return get


@pytest.mark.parametrize("schedule, sid", [("manual", False), ("search", True)])
@pytest.mark.parametrize("resume_at", [3, 4])  # 3: the resumed run enters stage 2 itself; 4: its first step
def test_resume_across_a_stage_boundary_ends_with_the_uninterrupted_weights(
    setup, uninterrupted, tmp_path, schedule, sid, resume_at
):
    whole, expected = uninterrupted(schedule, sid)
    out = tmp_path / "resumed"
    out.mkdir()
    for name in (f"step_{resume_at}.pt", f"step_{resume_at}.pt.sha256", "metrics.jsonl"):
        shutil.copy2(whole / name, out / name)  # a run killed after step_<resume_at>.pt
    apz = replace(SEARCH, schedule=schedule, sid=sid)
    result = finetune(_cfg(setup, out, progressive="autoprog-zero", autoprog_zero=apz))
    a, b = load_checkpoint(whole / "final.pt")["model"], load_checkpoint(out / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (result.train_macs, result.stages, result.test_top1) == (
        expected.train_macs, expected.stages, expected.test_top1,
    )  # fmt: skip
    assert [s["how"] for s in result.stages] == [schedule] * 3 + ["final"]

    def losses(folder):
        return [
            (r["step"], r["loss"]) for r in read_metrics(folder / "metrics.jsonl") if r["kind"] == "train"
        ]

    assert losses(out) == losses(whole)
    stage_steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "stage"]
    assert stage_steps == [0, 2, 4, 6]  # each stage logged once, however the run was interrupted


def test_a_run_too_short_for_its_stages_fails_before_training(setup, tmp_path):
    with pytest.raises(ValueError, match="3 steps cannot hold autoprog_zero.num_stages=4"):
        finetune(_cfg(setup, tmp_path / "short", steps=3, progressive="autoprog-zero"))
    assert not (tmp_path / "short" / "metrics.jsonl").exists()
