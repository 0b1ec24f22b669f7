"""The LM paradigm object (compt.paradigms.lm): registry, families, cost, one member and one link trained
through the shared engine (exact resume, feature and logit distillation, the shared tokenizer), the
CLI (plan, train, eval, export) and a two-member chain with its report.

Tiny members (a family YAML, widths 32 / 64) on real text: 60 files of the running Python's standard
library, truncated to 3 kB, with a 300-token BPE.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from compt.chain import load_spec, run_chain
from compt.cli import main as cli_main
from compt.cost import count_params, member_cost
from compt.engine.checkpoint import load_checkpoint, model_from_checkpoint
from compt.engine.runlog import read_metrics
from compt.engine.train import TrainConfig, TrainingInterrupted, train_member
from compt.families import get_family, get_member, list_families
from compt.paradigms import get_paradigm, paradigm_of_path
from compt.paradigms.lm import LMMember, LMParadigm
from compt.paradigms.lm.data import stdlib_root
from compt.paradigms.lm.models import sample_macs
from compt.report import write_report

torch.set_num_threads(1)

_MEMBER = (
    "{{name: {name}, vocab_size: 300, hidden_size: {width}, intermediate_size: {mlp}, num_hidden_layers: "
    "{layers}, num_attention_heads: {heads}, num_key_value_heads: {kv}, head_dim: 16, "
    "max_position_embeddings: 32, tie_word_embeddings: true}}"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A family YAML, a text corpus, and a data config whose cache (tokenizer, tokens) is shared."""
    root = tmp_path_factory.mktemp("lm")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in sorted(stdlib_root().glob("*.py"))[:60]:
        (corpus / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    members = [
        _MEMBER.format(name="lmt-S", width=32, mlp=64, layers=1, heads=2, kv=1),
        _MEMBER.format(name="lmt-M", width=64, mlp=128, layers=2, heads=4, kv=2),
    ]
    family = root / "lmt.yaml"
    family.write_text("name: lmt\nparadigm: lm\nmembers:\n" + "".join(f"  - {m}\n" for m in members))
    data = {
        "source": "text",
        "path": str(corpus),
        "vocab_size": 300,
        "seq_len": 32,
        "val_fraction": 0.2,
        "eval_windows": 8,
        "cache_dir": str(root / "data"),
    }
    return {"root": root, "family": str(family), "corpus": str(corpus), "data": data}


def _cfg(setup, out: Path, member: str = "lmt-S", **kw) -> TrainConfig:
    base = dict(member=member, family=setup["family"], data=setup["data"], out_dir=str(out), steps=6)
    base |= dict(global_batch_size=8, lr=3e-3, warmup_steps=1, log_every_steps=1, save_every_steps=0)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def teacher(setup):
    """lmt-S trained for 4 steps by `compt train --data FOLDER`: the teacher of lmt-M links."""
    out = setup["root"] / "teacher"
    args = ["train", "--member", "lmt-S", "--family", setup["family"], "--data", setup["corpus"]]
    args += ["--steps", "4", "--batch-size", "8", "--log-every", "1", "--out", str(out), "--eval-every", "0"]
    args += [f"--set=data.{k}={v}" for k, v in setup["data"].items() if k not in ("source", "path")]
    assert cli_main(args) == 0
    return out / "final.pt"


# --- registry, families, cost ----------------------------------------------------------------------


def test_lm_paradigm_and_its_families_are_registered(setup):
    paradigm = get_paradigm("lm")
    assert isinstance(paradigm, LMParadigm) and paradigm.distill_targets == ("feature", "logit")
    assert {"llama-cpu", "llama"} <= set(list_families())
    assert [m.name for m in get_family("llama").members][-1] == "llama-1.3B"
    member = get_member("llama-cpu-S")
    assert isinstance(member, LMMember) and member.paradigm is paradigm and member.context_length == 128
    family = get_family(setup["family"])
    assert family.paradigm is paradigm and family.names == ["lmt-S", "lmt-M"]


def test_a_family_yaml_with_a_bad_lm_field_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("paradigm: lm\nmembers:\n  - {name: x, hiden_size: 64}\n")
    with pytest.raises(ValueError, match=r"bad.yaml, member 'x'.*did you mean 'hidden_size'"):
        get_family(str(bad))


def test_params_without_embeddings_and_per_window_cost():
    member = get_member("llama-cpu-S")
    params = count_params(member)
    assert params["total_no_embed"] == params["total"] - 4096 * 64  # tied: the matrix counts once
    cost = member_cost(member, seq_len=64)
    macs = sample_macs(member.model_cfg, 64)
    assert cost.sample == {"tokens": 64} and cost.forward_macs == macs["forward_macs"]
    assert cost.train_macs == 3 * cost.forward_macs and cost.params == count_params(member)
    assert member_cost(member).sample == {"tokens": 128}  # default: the member's context length
    with pytest.raises(ValueError, match="seq_len"):
        member_cost(member, seq_len=0)


def test_plan_cli_describes_windows_and_refuses_clip_flags(capsys):
    args = ["plan", "--family", "llama-cpu", "--samples", "1600", "--baseline-epochs", "2"]
    assert cli_main([*args, "--epochs", "2,1,1", "--batch-size", "16", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "a window of 64 tokens per sample" in out and "llama-cpu-L" in out
    assert cli_main([*args, "--captions", "4"]) == 2
    assert "--captions does not apply to lm members" in capsys.readouterr().err


# --- configuration errors caught up front ---------------------------------------------------------


def test_bad_lm_settings_fail_when_the_config_is_built(setup, tmp_path):
    with pytest.raises(ValueError, match=r"train.distill must be one of feature for a clip member"):
        TrainConfig(member="debug-S", data={}, distill="logit")
    with pytest.raises(ValueError, match="train.distill_gate is not available for the lm paradigm"):
        _cfg(setup, tmp_path, distill_gate=True)
    with pytest.raises(ValueError, match="train.parallel must be one of ddp, fsdp2"):
        _cfg(setup, tmp_path, parallel="zero3")
    cfg = TrainConfig(member="llama-cpu-S", data={}, out_dir=str(tmp_path / "run"))
    assert cfg.data.cache_dir == str(tmp_path / "run" / "data")  # the tokenizer lives beside the run


def test_data_that_does_not_fit_the_member_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="seq_len=64 exceeds lmt-S's max_position_embeddings 32"):
        train_member(_cfg(setup, tmp_path / "a", data={**setup["data"], "seq_len": 64}))
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    np.arange(1000, dtype=np.uint16).tofile(tokens / "train.bin")  # ids up to 999 > vocab_size 300
    np.arange(100, dtype=np.uint16).tofile(tokens / "val.bin")
    data = {"source": "tokens", "path": str(tokens), "tokenizer": "none", "seq_len": 32}
    with pytest.raises(ValueError, match="the token files hold 1000 token ids but lmt-S has vocab_size 300"):
        train_member(_cfg(setup, tmp_path / "b", data={**data, "cache_dir": str(tmp_path / "c")}))


# --- training through the shared engine ------------------------------------------------------------


def test_baseline_checkpoint_carries_its_tokenizer_and_costs(setup, teacher):
    payload = load_checkpoint(teacher)
    tokenizer = Path(setup["data"]["cache_dir"]) / "tokenizer.json"
    assert payload["paradigm"] == "lm" and payload["tokenizer"] == tokenizer.read_text(encoding="utf-8")
    cost = member_cost(get_member("lmt-S", setup["family"]), seq_len=32)
    assert payload["train_macs"] == 4 * (8 * cost.train_macs + cost.update_macs)
    train = read_metrics(teacher.parent / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and train[-1]["loss_task"] < train[0]["loss_task"]
    assert set(payload["metrics"]) == {"val_loss", "val_bpb"} and 0 < payload["metrics"]["val_bpb"] < 8


def _interrupted(cfg: TrainConfig, at_step: int):
    """Train ``cfg`` with SIGTERM sent from the evaluate callback at ``at_step``, then resume it."""

    def evaluate(model, step):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"step_seen": float(step)}

    with pytest.raises(TrainingInterrupted):
        train_member(cfg, evaluate=evaluate)
    return train_member(cfg, evaluate=evaluate)


def test_a_feature_link_grows_distills_and_resumes_bitwise(setup, teacher, tmp_path):
    kw = dict(member="lmt-M", teacher=str(teacher), alpha="auto", deterministic=True)
    kw |= dict(eval_every_steps=3, save_every_steps=2)
    full = train_member(_cfg(setup, tmp_path / "full", **kw), evaluate=lambda m, s: {"step_seen": float(s)})
    resumed = _interrupted(_cfg(setup, tmp_path / "resumed", **kw), at_step=3)
    a, b = load_checkpoint(full.final_checkpoint), load_checkpoint(resumed.final_checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    train = read_metrics(tmp_path / "full" / "metrics.jsonl", "train")
    assert [r["loss"] for r in train] == [
        r["loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl", "train")
    ]
    assert all(r["ifd_ratio"] == pytest.approx(0.1, rel=1e-4) and r["mse_hidden"] > 0 for r in train)
    step = load_checkpoint(tmp_path / "full" / "step_4.pt")  # the last step writes final.pt only
    assert set(step["distill"]["projection"]) == {"weight", "bias"}  # T maps width 64 to the teacher's 32


def test_a_logit_link_distills_the_shared_vocabulary_without_a_projection(setup, teacher, tmp_path):
    result = train_member(
        _cfg(
            setup,
            tmp_path,
            member="lmt-M",
            teacher=str(teacher),
            distill="logit",
            steps=3,
            save_every_steps=2,
        )
    )
    train = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert all(r["kl_logits"] > 0 and "mse_hidden" not in r for r in train)
    assert load_checkpoint(tmp_path / "step_2.pt")["distill"]["projection"] == {} and result.steps == 3


def test_a_link_refuses_a_teacher_trained_with_another_tokenizer(setup, teacher, tmp_path):
    data = {**setup["data"], "vocab_size": 280, "cache_dir": str(tmp_path / "other")}
    with pytest.raises(ValueError, match=r"another tokenizer|tokenizer .* this run's .* is"):
        train_member(_cfg(setup, tmp_path / "run", member="lmt-M", teacher=str(teacher), data=data))


# --- eval and export -------------------------------------------------------------------------------


def test_cli_export_and_eval_of_a_checkpoint_and_its_export_agree(setup, teacher, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    assert cli_main(["export", str(teacher.parent), str(out)]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert paradigm_of_path(out).name == "lm" and paradigm_of_path(teacher.parent).name == "lm"
    model, _ = model_from_checkpoint(teacher)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=tokens).logits, model(input_ids=tokens).logits, rtol=0, atol=0
        )
    metrics = []
    for source in (teacher.parent, out):  # the same text, windows and tokenizer: the same numbers
        args = ["eval", str(source), "--data", setup["corpus"], "--num-windows", "4", "--json"]
        assert cli_main(args) == 0
        metrics.append(json.loads(capsys.readouterr().out)["metrics"])
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-6)
    assert cli_main(["eval", str(teacher), "--json"]) == 0  # on the run's own validation split
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(
        load_checkpoint(teacher)["metrics"]
    )
    assert cli_main(["eval", str(out), "--imagefolder", "x"]) == 2
    assert "is a language model: imagefolders does not apply" in capsys.readouterr().err


def test_cli_grow_of_an_lm_teacher(setup, teacher, tmp_path, capsys):
    out = tmp_path / "M.pt"
    args = ["grow", "--teacher", str(teacher), "--student", "lmt-M", "--family", setup["family"]]
    assert cli_main([*args, "--out", str(out), "--width", "net2net"]) == 0
    assert "depth decoder: 1 -> 2 layers [0,0]" in capsys.readouterr().out
    grown = load_checkpoint(out)
    assert grown["paradigm"] == "lm" and grown["grow"]["width"] == "net2net"
    torch.testing.assert_close(grown["model"]["lm_head.weight"], grown["model"]["model.embed_tokens.weight"])


# --- a chain ---------------------------------------------------------------------------------------


def test_a_two_member_chain_and_its_twins_report_lower_is_better_losses(setup, tmp_path):
    spec_file = tmp_path / "chain.yaml"
    spec = {
        "family": setup["family"],
        "out_dir": str(tmp_path / "run"),
        "data": {k: v for k, v in setup["data"].items() if k != "cache_dir"},  # default: <out_dir>/data
        "baseline_epochs": 0.02,  # a few steps of the small corpus (the chain sets steps from epochs)
        "epochs": [0.02, 0.015],
        "train": {"global_batch_size": 8, "lr": 3e-3, "warmup_steps": 1},
        "link": {"alpha": "auto"},
        "eval": {"metric": "val_loss", "every_steps": 2},
        "until_lossless": {"tolerance": 0.05},
    }
    spec_file.write_text(json.dumps(spec))  # JSON is YAML
    loaded = load_spec(spec_file)
    assert loaded.data.cache_dir == str(tmp_path / "run" / "data")
    run_chain(loaded, individual=True, progress=False)
    summary = run_chain(loaded, progress=False)
    rules = summary["metric_rules"]
    assert not rules["val_loss"]["higher_is_better"] and not rules["val_bpb"]["higher_is_better"]
    assert rules["val_loss"]["tolerance"]["absolute"] == 0.05
    assert all(m["steps"] >= 1 for m in summary["members"])
    for tree in ("chain", "individual"):
        for name in ("lmt-S", "lmt-M"):
            assert get_paradigm("lm").is_export_dir(tmp_path / "run" / tree / name / "export")
    # one tokenizer for the whole family, trained once beside the run
    payloads = [load_checkpoint(p) for p in sorted((tmp_path / "run").glob("*/*/final.pt"))]
    assert len(payloads) == 4 and len({p["tokenizer"] for p in payloads}) == 1
    report = write_report(tmp_path / "run" / "chain", tmp_path / "run" / "individual").read_text()
    assert "Val. loss gap" in report and "Lossless" in report and "Val. loss 0.05 nats" in report
