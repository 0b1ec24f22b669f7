"""The training engine on the debug family: costs, checkpoints, exact resume, NaN stop, chain links."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compt.config import from_dict, to_dict
from compt.cost import member_cost
from compt.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from compt.engine.optim import CosineSchedule, build_optimizer, fused_adamw, param_groups
from compt.engine.resume import RunMismatchError
from compt.engine.runlog import read_metrics
from compt.engine.train import NonFiniteLossError, TrainConfig, TrainingInterrupted, train_member
from compt.families import get_member
from compt.grow import GrowError, grow
from compt.paradigms.clip.data import DataConfig

torch.set_num_threads(1)

DATA = DataConfig(kind="synthetic", num_samples=64)  # 4 steps per epoch at a global batch of 16


def config(out: Path, **kw) -> TrainConfig:
    base = dict(
        member="debug-S",
        data=DATA,
        out_dir=str(out),
        steps=6,
        global_batch_size=16,
        log_every_steps=1,
        save_every_steps=0,
        lr=1e-3,
    )
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A debug-S trained for 4 steps: the teacher of debug-L links."""
    return train_member(config(tmp_path_factory.mktemp("teacher"), steps=4)).final_checkpoint


@pytest.fixture(scope="module")
def moments_teacher_ckpt(tmp_path_factory) -> Path:
    """The same teacher, its final.pt holding its AdamW moments (for optimizer_init: grown links)."""
    cfg = config(tmp_path_factory.mktemp("teacher-moments"), steps=4, keep_moments=True)
    return train_member(cfg).final_checkpoint


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": 0.0}, "train.lr"),
        ({"steps": None, "epochs": 0}, "train.epochs"),
        ({"steps": 0}, "train.steps"),
        ({"accum_steps": 3}, "accum_steps"),
        ({"precision": "fp8"}, "precision"),
        ({"alpha": "half"}, "alpha"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"log_every_steps": 0}, "log_every_steps"),
        ({"alpha_ref_dim": 0}, "alpha_ref_dim"),
        ({"alpha_schedule": "cosine"}, "alpha_schedule must be one of constant, linear, step"),
        ({"alpha_schedule": "linear", "alpha_schedule_fraction": 0.0}, "alpha_schedule_fraction"),
        ({"alpha_schedule_fraction": 0.5}, "only applies to alpha_schedule linear or step"),
        ({"mask_ramp_fraction": 1.5}, "mask_ramp_fraction"),
        ({"optimizer_init": "warm"}, "optimizer_init"),
        ({"width": "hyperclone"}, "train.width must be one of insert, .*hypercloning, msg"),
        ({"lr_decay_fraction": 0.0}, "lr_decay_fraction"),
    ],
)
def test_bad_config_is_named(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_unknown_member_suggests_the_nearest(tmp_path):
    with pytest.raises(KeyError, match="debug-S"):
        config(tmp_path, member="debug-s2")


def test_batch_larger_than_the_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_member(config(tmp_path, global_batch_size=128))


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="fp16"):
        train_member(config(tmp_path, precision="fp16", device="cpu"))


def test_config_round_trips_through_a_dict(tmp_path):
    cfg = config(tmp_path, alpha="auto", teacher="t.pt", betas=(0.9, 0.95))
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


# --- optimizer and schedule (Table C) ------------------------------------------------------------


def test_weight_decay_skips_norms_biases_embeddings_and_logit_scale():
    model = get_member("debug-S").create()
    decay, no_decay = param_groups([model], 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {
        "logit_scale",
        "positional_embedding",
        "token_embedding.weight",
        "visual.class_embedding",
        "visual.ln_pre.weight",
        "ln_final.bias",
    } <= skipped
    assert {"visual.conv1.weight", "text_projection", "visual.proj"} <= decayed
    assert all("bias" not in n and "ln_" not in n for n in decayed)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    for name, eps in (("debug-S", 1e-6), ("Swin-T", 1e-8)):
        member = get_member(name)
        assert member.paradigm.default_eps(member) == eps


def test_cosine_schedule_warms_up_linearly_then_decays_per_step():
    s = CosineSchedule(lr=1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert [s.lr_at(i) for i in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(55) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the decay
    assert s.lr_at(100) == pytest.approx(1e-4)
    lrs = [s.lr_at(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    # LEMON: the same peak, a cosine that ends after half the post-warmup steps, then the floor
    fast = CosineSchedule(lr=1e-3, total_steps=110, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.5)
    assert fast.lr_at(9) == pytest.approx(1e-3) and fast.lr_at(35) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert fast.lr_at(60) == fast.lr_at(109) == pytest.approx(1e-4)


# --- a baseline run ------------------------------------------------------------------------------


def test_baseline_run_counts_costs_checkpoints_and_finishes_once(tmp_path):
    cfg = config(tmp_path, accum_steps=2, save_every_steps=2, keep_last=2)
    result = train_member(cfg)
    cost = member_cost("debug-S", DATA.num_captions)
    per_step = 16 * cost.train_macs + cost.update_macs  # App. C.2: samples x train + steps x update
    assert result.steps == 6 and result.samples_seen == 96
    assert result.train_macs == 6 * per_step
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["train_macs"] for r in train] == [s * per_step for s in range(1, 7)]
    assert all(math.isfinite(r["loss_task"]) and r["lr"] > 0 and r["samples_per_s"] > 0 for r in train)
    assert train[-1]["epoch"] == 1  # 4 steps per epoch: the run went into its second epoch
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_2.pt", "step_4.pt"]  # keep_last=2
    ckpt = load_checkpoint(tmp_path / "step_4.pt")
    assert {
        "model",
        "model_cfg",
        "member",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "step",
        "epoch",
        "step_in_epoch",
        "samples_seen",
        "train_macs",
        "wall_s",
        "config",
        "distill",
        "teacher",
    } <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0
    final = load_checkpoint(result.final_checkpoint)
    assert final["steps"] == 6 and final["train_macs"] == result.train_macs and final["teacher"] is None
    lines = (tmp_path / "metrics.jsonl").read_text()
    again = train_member(cfg)  # finished: returns without training
    assert again == result and (tmp_path / "metrics.jsonl").read_text() == lines


# --- exact resume --------------------------------------------------------------------------------


def _run_interrupted(cfg: TrainConfig, at_step: int, signum: int = signal.SIGTERM):
    """Train ``cfg``, sending ourselves ``signum`` from the evaluate callback at ``at_step``, then resume."""

    def evaluate(model, step):
        if step == at_step:
            os.kill(os.getpid(), signum)
        return {"step_seen": float(step)}

    with pytest.raises(TrainingInterrupted) as stopped:
        train_member(cfg, evaluate=evaluate)
    assert stopped.value.code == 128 + signum and stopped.value.checkpoint.name == f"step_{at_step}.pt"
    assert (
        latest_checkpoint(cfg.out_dir).name == f"step_{at_step}.pt"
        and not (Path(cfg.out_dir) / "final.pt").exists()
    )
    return train_member(cfg, evaluate=evaluate)


# Issue 13's options, each interrupted mid-way: alpha decaying and switched off, HyperCloning's noise,
# MSG's masks mid-ramp (6 steps x 0.9 -> a 5-step ramp), grown AdamW moments, a faster cosine.
RECIPES = {
    "baseline": None,
    "baseline-ctrl-c": None,  # SIGINT: exit 130, saved and resumed like SIGTERM (issue 11)
    "link-auto-alpha": dict(alpha="auto"),
    "link-linear-hypercloning": dict(
        alpha_schedule="linear", alpha_schedule_fraction=0.7, width="hypercloning"
    ),
    "link-msg-grown-salt": dict(
        width="msg",
        mask_ramp_fraction=0.9,
        optimizer_init="grown",
        alpha_schedule="step",
        alpha_schedule_fraction=0.5,
        lr_decay_fraction=0.5,
    ),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_mid_epoch_is_bitwise_identical(tmp_path, teacher_ckpt, moments_teacher_ckpt, recipe):
    kw = dict(deterministic=True, eval_every_steps=3, save_every_steps=2)
    if RECIPES[recipe] is not None:
        teacher = moments_teacher_ckpt if RECIPES[recipe].get("optimizer_init") == "grown" else teacher_ckpt
        kw |= dict(member="debug-L", teacher=str(teacher), **RECIPES[recipe])
    full = train_member(
        config(tmp_path / "full", **kw), evaluate=lambda model, step: {"step_seen": float(step)}
    )
    signum = signal.SIGINT if recipe.endswith("ctrl-c") else signal.SIGTERM
    resumed = _run_interrupted(config(tmp_path / "resumed", **kw), at_step=3, signum=signum)  # mid-epoch 0
    a, b = load_checkpoint(full.final_checkpoint)["model"], load_checkpoint(resumed.final_checkpoint)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert (resumed.steps, resumed.samples_seen, resumed.train_macs) == (
        full.steps,
        full.samples_seen,
        full.train_macs,
    )
    losses = [
        [r["loss"] for r in read_metrics(Path(run) / "metrics.jsonl", "train")]
        for run in (tmp_path / "full", tmp_path / "resumed")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 6  # metrics.jsonl reads like one uninterrupted run


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # An absurd learning rate turns the weights into inf after one update: the next loss is NaN.
    cfg = config(tmp_path, lr=1e30, warmup_steps=0, save_every_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 2.*step_1\.pt"):
        train_member(cfg)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_1.pt"]
    assert verify_checkpoint(tmp_path / "step_1.pt") and load_checkpoint(tmp_path / "step_1.pt")["step"] == 1
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["kind"] == "error"


# --- chain links ---------------------------------------------------------------------------------


def test_link_grows_from_the_teacher_and_distills(tmp_path, teacher_ckpt):
    teacher_sha = _sha(teacher_ckpt)
    cfg = config(tmp_path / "link", member="debug-L", teacher=str(teacher_ckpt), steps=1, lr=1e-30)
    result = train_member(cfg)
    # With a vanishing lr the single update is a no-op: final weights are the grown ones.
    torch.manual_seed(cfg.seed)
    student = get_member("debug-L").create()
    grow(load_checkpoint(teacher_ckpt), student, width=cfg.width, depth=cfg.depth, seed=cfg.seed)
    final = load_checkpoint(result.final_checkpoint)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(final["model"][key], value, msg=key)
    assert final["teacher"]["member"] == "debug-S" and _sha(teacher_ckpt) == teacher_sha  # teacher untouched
    record = read_metrics(tmp_path / "link" / "metrics.jsonl", "train")[-1]
    # alpha 500 is the paper's weight at D = 512: on debug's 32-d embedding it weighs the MSE 32/512 as much
    assert record["alpha"] == 500 * 32 / 512 and record["loss_ifd"] > 0
    assert record["loss"] == pytest.approx(record["loss_task"] + record["loss_ifd"])
    assert record["ifd_ratio"] == pytest.approx(record["loss_ifd"] / record["loss_task"])
    s, t = member_cost("debug-L", 4), member_cost("debug-S", 4)
    assert (
        result.train_macs == 16 * (s.train_macs + t.forward_macs) + s.update_macs
    )  # teacher forward counted


def test_scheduled_off_distillation_skips_the_teacher(tmp_path, teacher_ckpt):
    """SALT-style step schedule: L_IFD and the teacher's forward only in the first half of the link."""
    cfg = config(tmp_path, member="debug-L", teacher=str(teacher_ckpt), steps=4)
    result = train_member(replace(cfg, alpha_schedule="step", alpha_schedule_fraction=0.5))
    records = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [r["alpha"] for r in records] == [500 * 32 / 512] * 2 + [0.0] * 2
    assert all(r["loss_ifd"] > 0 for r in records[:2]) and all(r["loss_ifd"] == 0 for r in records[2:])
    s, t = member_cost("debug-L", 4), member_cost("debug-S", 4)
    assert result.train_macs == 4 * (16 * s.train_macs + s.update_macs) + 2 * 16 * t.forward_macs


def test_alpha_zero_link_skips_the_teacher(tmp_path, teacher_ckpt):
    """alpha 0 (IWI only, Table 4b): L_IFD is 0 on every step, so the teacher is neither run nor counted."""
    cfg = config(tmp_path, member="debug-L", teacher=str(teacher_ckpt), steps=4, alpha=0.0)
    result = train_member(cfg)
    assert all(r["loss_ifd"] == 0 for r in read_metrics(tmp_path / "metrics.jsonl", "train"))
    s = member_cost("debug-L", 4)
    assert result.train_macs == 4 * (16 * s.train_macs + s.update_macs)


def test_msg_link_starts_as_its_teacher_and_ends_plain(tmp_path, teacher_ckpt):
    cfg = config(
        tmp_path / "msg", member="debug-L", teacher=str(teacher_ckpt), width="msg", save_every_steps=1
    )
    result = train_member(replace(cfg, mask_ramp_fraction=0.5, keep_last=0))  # 6 steps: masks ramp over 3
    first = read_metrics(tmp_path / "msg" / "metrics.jsonl", "train")[0]
    assert first["loss_ifd"] < 1e-9  # at m = 0 the student computes its teacher's embeddings
    fresh = get_member("debug-L").create().state_dict().keys()
    for step in range(1, 6):  # the masks are saved until step 3's update removes them (m = 1)
        ckpt = load_checkpoint(tmp_path / "msg" / f"step_{step}.pt")
        assert (ckpt["grow_mask"] is not None) == (step <= 3) and ckpt["model"].keys() == fresh
    final = load_checkpoint(result.final_checkpoint)
    assert final["model"].keys() == fresh and "moments" not in final  # final.pt stays small by default
    early = config(
        tmp_path / "early", member="debug-L", teacher=str(teacher_ckpt), width="msg", eval_every_steps=2
    )
    with pytest.warns(UserWarning, match="before its growth masks reached 1"):
        stopped = train_member(early, evaluate=lambda m, s: {"s": float(s)}, should_stop=lambda m: True)
    assert stopped.steps == 2 and load_checkpoint(stopped.final_checkpoint)["model"].keys() == fresh


def test_grown_moments_link_starts_from_its_teachers_adam_state(tmp_path, teacher_ckpt, moments_teacher_ckpt):
    held = load_checkpoint(moments_teacher_ckpt)["moments"]
    assert held.keys() == dict(get_member("debug-S").create().named_parameters()).keys()
    assert all(m["step"] == 4 for m in held.values())
    # betas ~ 1: one update barely moves the moments, so step_1.pt shows the grown ones
    cfg = config(tmp_path / "grown", member="debug-L", teacher=str(moments_teacher_ckpt), steps=2)
    cfg = replace(cfg, optimizer_init="grown", betas=(1 - 1e-7, 1 - 1e-7), save_every_steps=1)
    train_member(cfg)
    ckpt = load_checkpoint(tmp_path / "grown" / "step_1.pt")
    student = get_member("debug-L").create()
    names = {id(p): n for n, p in student.named_parameters()}
    order = [names[id(p)] for group in param_groups([student], 0.1) for p in group["params"]]
    by_name = {name: ckpt["optimizer"]["state"][i] for i, name in enumerate(order)}
    w = "visual.transformer.resblocks.1.mlp.c_fc.weight"  # insert: teacher block 0 copied to the top left
    teacher_m = held["visual.transformer.resblocks.0.mlp.c_fc.weight"]["exp_avg"]
    torch.testing.assert_close(by_name[w]["exp_avg"][:64, :16], teacher_m, rtol=1e-3, atol=1e-9)
    assert by_name[w]["step"].item() == 5  # the teacher's 4 steps, plus this one
    with pytest.raises(GrowError, match="keep_moments"):
        train_member(replace(cfg, teacher=str(teacher_ckpt), out_dir=str(tmp_path / "none")))


def test_resuming_a_checkpoint_from_before_issue_13_keeps_its_alpha(tmp_path):
    """Its config has no alpha_ref_dim: alpha weighed the per-dimension MSE; resuming under the new
    default would silently change the loss, so it is refused, and resumes with alpha_ref_dim=None."""
    cfg = config(tmp_path, save_every_steps=2)

    def stop_at_2(model, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    with pytest.raises(TrainingInterrupted):
        train_member(replace(cfg, eval_every_steps=2), evaluate=stop_at_2)
    path = tmp_path / "step_2.pt"
    old = load_checkpoint(path)
    for key in (
        "alpha_ref_dim",
        "alpha_schedule",
        "alpha_schedule_fraction",
        "optimizer_init",
        "keep_moments",
    ):
        del old["config"][key]
    save_checkpoint(path, old)
    with pytest.raises(ValueError, match="train.alpha_ref_dim is None there but 512 now"):
        train_member(cfg)
    assert train_member(replace(cfg, alpha_ref_dim=None)).steps == 6


def test_ifd_only_link_keeps_the_students_own_init(tmp_path, teacher_ckpt):
    """width/depth "none" (Table 4b's IFD only): the teacher only distills, nothing is grown."""
    cfg = config(tmp_path, member="debug-L", teacher=str(teacher_ckpt), steps=1, lr=1e-30)
    result = train_member(replace(cfg, width="none", depth="none"))
    torch.manual_seed(cfg.seed)
    student = get_member("debug-L").create()
    final = load_checkpoint(result.final_checkpoint)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(final["model"][key], value, msg=key)
    assert read_metrics(tmp_path / "metrics.jsonl", "train")[-1]["loss_ifd"] > 0


def test_link_with_a_wider_embedding_trains_the_projection(tmp_path):
    family = tmp_path / "fam.yaml"
    family.write_text(
        "name: emb\nmembers:\n"
        + "".join(
            f"  - name: emb-{n}\n    embed_dim: {e}\n"
            f"    vision_cfg: {{image_size: 16, patch_size: 4, width: {w}, layers: 1, head_width: 16}}\n"
            f"    text_cfg: {{context_length: 16, vocab_size: 49408, width: {w}, heads: {w // 16}, "
            "layers: 1}\n"
            for n, w, e in (("S", 16, 16), ("L", 32, 32))
        )
    )
    teacher = train_member(
        config(tmp_path / "s", member="emb-S", family=str(family), steps=2)
    ).final_checkpoint
    cfg = config(
        tmp_path / "l",
        member="emb-L",
        family=str(family),
        teacher=str(teacher),
        steps=4,
        save_every_steps=3,
        lr=1e-2,
    )
    train_member(cfg)
    ckpt = load_checkpoint(tmp_path / "l" / "step_3.pt")
    proj = ckpt["distill"]["projection"]
    assert proj["weight"].shape == (16, 32)  # T maps the student's 32 dims to the teacher's 16
    assert not torch.equal(proj["weight"], torch.eye(16, 32))  # it was in the optimizer and learned
    assert (
        len(ckpt["optimizer"]["state"])
        == sum(1 for _ in get_member("emb-L", str(family)).create().parameters()) + 2
    )


def test_should_stop_ends_the_link_early(tmp_path):
    seen = []

    def evaluate(model, step):
        assert not model.training
        seen.append(step)
        return {"score": float(step)}

    result = train_member(
        config(tmp_path, eval_every_steps=2), evaluate=evaluate, should_stop=lambda m: m["score"] >= 4
    )
    assert seen == [2, 4] and result.steps == 4 and result.metrics == {"score": 4.0}
    assert result.planned_steps == 6
    assert load_checkpoint(result.final_checkpoint)["metrics"] == {"score": 4.0}
    evals = read_metrics(tmp_path / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [2, 4] and evals[-1]["should_stop"] is True


def test_periodic_evaluate_runs_before_the_last_step_and_evaluate_after_a_stop(tmp_path):
    """A cheap periodic evaluation (issue 12); the final metrics are the full one's, also after a stop."""
    seen = []

    def full(model, step):
        seen.append(("full", step))
        return {"score": float(step), "extra": 1.0}

    def cheap(model, step):
        seen.append(("cheap", step))
        return {"score": float(step)}

    result = train_member(config(tmp_path / "a", eval_every_steps=2), evaluate=full, periodic_evaluate=cheap)
    assert seen == [("cheap", 2), ("cheap", 4), ("full", 6)] and result.metrics == {
        "score": 6.0,
        "extra": 1.0,
    }
    seen.clear()
    stopped = train_member(
        config(tmp_path / "b", eval_every_steps=2),
        evaluate=full,
        periodic_evaluate=cheap,
        should_stop=lambda m: m["score"] >= 4,
    )
    assert seen == [("cheap", 2), ("cheap", 4), ("full", 4)] and stopped.steps == 4
    assert load_checkpoint(stopped.final_checkpoint)["metrics"] == {"score": 4.0, "extra": 1.0}
    evals = read_metrics(tmp_path / "b" / "metrics.jsonl", "eval")
    assert [(r["step"], "extra" in r, r.get("should_stop")) for r in evals] == [
        (2, False, None),
        (4, False, True),
        (4, True, None),
    ]


def test_data_skips_and_repairs_are_in_metrics_jsonl(tmp_path):
    """A non-UTF-8 caption (step 1) and a batch of missing files refilled (step 2) are counted there."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    rows = []
    for i in range(12):
        name = f"images/img{i}.png"
        if not 4 <= i < 8:  # rows 4..7, the whole second batch, are missing: it is refilled
            Image.new("RGB", (20, 20), (20 * i, 0, 0)).save(tmp_path / name)
        rows.append(name.encode() + b"\t" + (b"caf\xe9 cr\xe8me" if i == 1 else f"photo {i}".encode()))
    (tmp_path / "train.tsv").write_bytes(b"filepath\ttitle\n" + b"".join(r + b"\n" for r in rows))
    data = DataConfig(kind="tsv", path=str(tmp_path / "train.tsv"), shuffle=False)
    train_member(config(tmp_path / "run", data=data, global_batch_size=4, steps=2))
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl", "train")
    assert [(r["step"], r["data_skips"], r["data_repairs"]) for r in lines] == [(1, 0, 1), (2, 4, 2)]


def test_a_failing_evaluation_keeps_what_trained(tmp_path):
    """issue 11: an eval set that fails after the last step lost the member; now it saves, then raises."""

    def broken(model, step):
        raise ValueError("zero-shot folder zs/ does not exist")

    with pytest.raises(ValueError, match="zs/ does not exist"):
        train_member(config(tmp_path), evaluate=broken)
    assert not (tmp_path / "final.pt").exists()
    assert load_checkpoint(tmp_path / "step_6.pt")["step"] == 6  # save_every_steps=0: nothing else was saved
    result = train_member(config(tmp_path), evaluate=lambda model, step: {"score": 1.0})
    assert result.steps == 6 and result.metrics == {"score": 1.0}
    starts = read_metrics(tmp_path / "metrics.jsonl", "start")
    assert [r["step"] for r in starts] == [0, 6]  # the rerun only evaluated


def test_a_finished_run_of_another_config_is_refused_and_retrain_moves_it_aside(tmp_path, teacher_ckpt):
    """issue 11: final.pt was reused whatever the config; now only when its config matches."""
    first = train_member(config(tmp_path / "run", steps=2))
    trained = _sha(first.final_checkpoint)
    assert train_member(config(tmp_path / "run", steps=2, keep_last=5)) == first  # free fields: reused
    with pytest.raises(RunMismatchError, match=r"train.lr is 0.001 there but 0.002 now.*--retrain"):
        train_member(config(tmp_path / "run", steps=2, lr=2e-3))
    again = train_member(config(tmp_path / "run", steps=2, lr=2e-3), retrain=True)
    assert load_checkpoint(again.final_checkpoint)["config"]["lr"] == 2e-3
    assert _sha(tmp_path / "run.replaced-1" / "final.pt") == trained  # moved aside, not deleted


def test_a_link_whose_teacher_was_retrained_is_stale(tmp_path, teacher_ckpt):
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, load_checkpoint(teacher_ckpt))
    link = config(tmp_path / "link", member="debug-L", teacher=str(teacher), steps=2)
    train_member(link)
    save_checkpoint(teacher, load_checkpoint(teacher) | {"wall_s": 123.0})  # its config is the same
    with pytest.raises(RunMismatchError, match=r"its teacher .*teacher.pt was retrained since"):
        train_member(link)
    train_member(link, retrain=True)
    assert (tmp_path / "link.replaced-1" / "final.pt").is_file()
    assert train_member(link).steps == 2  # the new link matches its teacher: reused


def test_resume_refuses_a_folder_of_another_run(tmp_path):
    cfg = config(tmp_path, save_every_steps=2)

    def stop_at_2(model, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    with pytest.raises(TrainingInterrupted):
        train_member(replace(cfg, eval_every_steps=2), evaluate=stop_at_2)
    with pytest.raises(ValueError, match="different run: train.global_batch_size"):
        train_member(replace(cfg, global_batch_size=8))


def test_cli_builds_the_config_from_yaml_flags_and_set(tmp_path):
    from compt.cli import build_parser
    from compt.cli.train import build_config

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "member: tiny-S\nlr: 5.0e-4\nalpha: 500\ndata: {kind: synthetic, num_samples: 5000}\n"
    )
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(yaml_file),
            "--member",
            "tiny-M",
            "--alpha",
            "auto",
            "--set",
            "data.num_captions=2",
            "--set",
            "grad_clip=1.0",
        ]
    )
    cfg = build_config(args)
    assert (cfg.member, cfg.lr, cfg.alpha, cfg.grad_clip) == ("tiny-M", 5e-4, "auto", 1.0)  # flags beat YAML
    assert (cfg.data.kind, cfg.data.num_samples, cfg.data.num_captions) == ("synthetic", 5000, 2)
    assert cfg.out_dir == str(Path("runs") / "tiny-M")
    with pytest.raises(ValueError, match="did you mean 'lr'"):
        build_config(build_parser().parse_args(["train", "--member", "tiny-S", "--set", "lrr=1"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_link(tmp_path, teacher_ckpt, precision):
    cfg = config(tmp_path, member="debug-L", teacher=str(teacher_ckpt), device="cuda", precision=precision)
    result = train_member(cfg)
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert all(math.isfinite(r["loss"]) for r in train) and result.steps == 6
    start = read_metrics(tmp_path / "metrics.jsonl", "start")[0]
    assert start["device"].startswith("cuda") and precision[-2:] in start["precision"]


# --- CUDA paths (issue 17; benchmarks/gpu_check.py runs the `gpu` tests on a GPU machine) --------


def test_adamw_is_fused_exactly_on_cuda():
    assert fused_adamw(torch.device("cuda", 0)) and fused_adamw(torch.device("cuda"))
    assert not fused_adamw(torch.device("cpu")) and not fused_adamw(torch.device("meta"))
    model = get_member("debug-S").create()
    params = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    opt = build_optimizer([model], **params, device=torch.device("cpu"))
    assert not opt.defaults["fused"]  # CPU keeps torch's default (foreach) update


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _host_syncs(out: Path, steps: int, **kw) -> int:
    """Synchronizing CUDA calls made by a whole run that logs only after its last step."""
    cfg = config(out, device="cuda", steps=steps, log_every_steps=steps, **kw)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_member(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["bf16", "fp16", "bf16-link"])
def test_cuda_steps_do_not_sync_with_the_host(tmp_path, teacher_ckpt, kind):
    # Losses stay on the device until a log step; 8 steps must sync exactly as often as 4.
    kw = {"precision": kind[:4]}
    if kind.endswith("link"):
        kw |= {"member": "debug-L", "teacher": str(teacher_ckpt)}  # fixed alpha (App. B.1: 500)
    _host_syncs(tmp_path / "warm-up", 2, **kw)  # one-time CUDA/cuBLAS set-up syncs happen here
    assert _host_syncs(tmp_path / "long", 8, **kw) == _host_syncs(tmp_path / "short", 4, **kw)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_overflow_step_is_skipped_and_the_scale_backs_off(tmp_path):
    # step_1.pt, step_2.pt and final.pt (the last step writes final.pt only)
    cfg = config(tmp_path, device="cuda", precision="fp16", steps=3, save_every_steps=1, keep_last=0)
    train_member(cfg)
    one, two = (load_checkpoint(tmp_path / f"step_{k}.pt") for k in (1, 2))
    assert one["optimizer"]["param_groups"][0]["fused"]  # fused AdamW on CUDA
    assert any(not torch.equal(one["model"][k], two["model"][k]) for k in one["model"])  # a real step
    # Resume from step 1 with a scale that overflows fp16 gradients: steps 2 and 3 change nothing.
    for stale in ("step_2.pt", "step_2.pt.sha256", "final.pt", "final.pt.sha256"):
        (tmp_path / stale).unlink(missing_ok=True)
    save_checkpoint(tmp_path / "step_1.pt", one | {"scaler": one["scaler"] | {"scale": 2.0**60}})
    train_member(cfg)
    skipped = load_checkpoint(tmp_path / "step_2.pt")
    assert all(torch.equal(one["model"][k], skipped["model"][k]) for k in one["model"])
    assert skipped["scaler"]["scale"] == 2.0**59  # backoff factor 0.5
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl", "train"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("member", ["debug-S", "debug-L"])  # debug-L: a link, its teacher stays eager
def test_cuda_compiled_student_trains_like_the_eager_one(tmp_path, teacher_ckpt, member):
    kw = dict(member=member, device="cuda", precision="bf16", steps=3)
    if member == "debug-L":
        kw["teacher"] = str(teacher_ckpt)
    eager = train_member(config(tmp_path / "eager", **kw))
    compiled = train_member(config(tmp_path / "compiled", compile=True, **kw))
    assert compiled.steps == eager.steps == 3
    losses = [
        [r["loss"] for r in read_metrics(run / "metrics.jsonl", "train")]
        for run in (tmp_path / "eager", tmp_path / "compiled")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert torch.get_float32_matmul_precision() == "high"  # TF32 for the fp32 parts of AMP on CUDA
