"""Bad input, end to end: every case is a clear error (what is wrong, where, how to fix) or a counted skip.

Each error case lists fragments its message must hold: the *what* (the problem), the *where* (file,
field, member or step) and the *how* (what to change). Bad samples are not errors: they are skipped
and counted by reason, until more than ``data.max_skips`` of them stop the run with a message.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from compt.chain import load_spec
from compt.cli import main as cli_main
from compt.cost import _member_params
from compt.engine.checkpoint import CheckpointError, save_checkpoint
from compt.engine.train import NonFiniteLossError, TrainConfig, train_member
from compt.families import get_member
from compt.paradigms.clip.cost import _sample_cost
from compt.paradigms.clip.data import DataConfig, build_loader, tokenizer
from compt.paradigms.clip.data.evalsets import ZeroShotTask, imagefolder_task

torch.set_num_threads(1)

ODD_FAMILY = """\
name: odd
members:
  - name: odd-patch
    embed_dim: 32
    vision_cfg: {image_size: 16, patch_size: 8, width: 32, layers: 2, head_width: 16}
    text_cfg: {context_length: 16, width: 32, heads: 2, layers: 2}
  - name: odd-context
    embed_dim: 32
    vision_cfg: {image_size: 16, patch_size: 4, width: 32, layers: 2, head_width: 16}
    text_cfg: {context_length: 24, width: 32, heads: 2, layers: 2}
  - name: odd-vocab
    embed_dim: 32
    vision_cfg: {image_size: 16, patch_size: 4, width: 32, layers: 2, head_width: 16}
    text_cfg: {context_length: 16, vocab_size: 1000, width: 32, heads: 2, layers: 2}
  - name: odd-bigvocab
    embed_dim: 32
    vision_cfg: {image_size: 16, patch_size: 4, width: 32, layers: 2, head_width: 16}
    text_cfg: {context_length: 16, vocab_size: 49500, width: 32, heads: 2, layers: 2}
"""


# --- helpers -------------------------------------------------------------------------------------


def _image(path: Path) -> str:
    Image.new("RGB", (20, 18), (200, 40, 40)).save(path)
    return path.name


def _table(tmp_path: Path, rows: list[tuple[str, str]], header: str = "filepath\ttitle") -> Path:
    path = tmp_path / "train.tsv"
    path.write_text(header + "\n" + "".join(f"{a}\t{b}\n" for a, b in rows))
    return path


def _good_rows(tmp_path: Path, n: int) -> list[tuple[str, str]]:
    return [(_image(tmp_path / f"img{i}.png"), f"a red square number {i}") for i in range(n)]


def _loader(path: Path, batch: int = 4, **data):
    cfg = DataConfig(kind="csv", path=str(path), shuffle=False, **data)
    return build_loader(cfg, image_size=16, context_length=16, global_batch_size=batch)


def _train_cfg(tmp_path: Path, **kw) -> TrainConfig:
    fields = dict(
        member="debug-S",
        data=DataConfig(kind="synthetic", num_samples=16),
        out_dir=str(tmp_path / "run"),
        steps=2,
        global_batch_size=8,
        warmup_steps=0,
        device="cpu",
    )
    return TrainConfig(**(fields | kw))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """One-step final.pt of debug-S and debug-L, and a family file of mismatched members."""
    tmp = tmp_path_factory.mktemp("teachers")
    out = {}
    for name in ("debug-S", "debug-L"):
        cfg = _train_cfg(tmp / name, member=name, steps=1, save_every_steps=0)
        out[name] = train_member(cfg).final_checkpoint
    (tmp / "odd.yaml").write_text(ODD_FAMILY)
    out["odd"] = tmp / "odd.yaml"
    return out


def _message(fn) -> str:
    with pytest.raises((ValueError, KeyError, CheckpointError, FileNotFoundError, NonFiniteLossError)) as e:
        fn()
    return e.value.args[0] if isinstance(e.value, KeyError) else str(e.value)


def _assert_says(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} missing from: {message}"


# --- bad samples: counted skips ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("corrupt", "corrupt_image"),
        ("missing", "missing_file"),
        ("empty_caption", "empty_caption"),
        ("short_row", "bad_row"),
        ("empty_path", "empty_path"),
    ],
)
def test_a_bad_sample_is_skipped_and_counted(tmp_path, bad, reason):
    rows = _good_rows(tmp_path, 4)
    if bad == "corrupt":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        rows[1] = ("broken.png", "a broken picture")
    elif bad == "missing":
        rows[1] = ("gone.png", "a picture that is not there")
    elif bad == "empty_caption":
        rows[1] = (rows[1][0], "   ")
    elif bad == "empty_path":  # was reported as where='.' (issue 11 item 14)
        rows[1] = ("  ", "a picture without a path")
    path = _table(tmp_path, rows)
    if bad == "short_row":  # a row with one column too few
        path.write_text(path.read_text() + "only-one-column\n")
        path.write_text(path.read_text().replace(f"{rows[1][0]}\t{rows[1][1]}\n", "only-one-column\n"))
    loader = _loader(path)
    (images, texts), *_ = list(loader)
    assert images.shape[0] == 3 and texts.shape[0] == 3  # the bad one is dropped from its batch
    assert loader.skips == {reason: 1}
    if bad == "empty_path":
        skip = loader.batches.dataset.load(1, None)  # shuffle=False: row 2 is sample 1
        assert skip.where.endswith("train.tsv data row 2") and "column 'filepath' is empty" in skip.detail


def test_too_many_bad_samples_stop_with_the_file_and_the_limit(tmp_path):
    rows = [(f"gone{i}.png", f"caption {i}") for i in range(4)]
    loader = _loader(_table(tmp_path, rows), max_skips=2)
    msg = _message(lambda: list(loader))
    _assert_says(
        msg, "train.tsv", "missing_file=", "more than data.max_skips=2", "gone", "raise data.max_skips"
    )


def test_an_overlong_caption_is_truncated_keeping_the_end_token(tmp_path):
    rows = _good_rows(tmp_path, 4)
    rows[0] = (rows[0][0], " ".join(["word"] * 500))
    (images, texts), *_ = list(_loader(_table(tmp_path, rows), num_captions=1))
    eot = tokenizer(16)(["x"])[0].max()  # the end token has the largest id
    assert texts.shape == (4, 1, 16) and (texts[:, 0, -1] == eot).sum() == 1


# --- bad data configs ---------------------------------------------------------------------------------


def _empty_file(tmp_path):
    (tmp_path / "train.tsv").write_text("")
    return _loader(tmp_path / "train.tsv")


DATA_CASES = {
    "empty file": (_empty_file, ["train.tsv", "empty", "header row"]),
    "header only (empty dataset)": (
        lambda t: _loader(_table(t, [])),
        ["train.tsv", "no data rows"],
    ),
    "missing table": (lambda t: _loader(t / "nope.tsv"), ["data.path", "nope.tsv", "does not exist"]),
    "wrong column": (
        lambda t: _loader(_table(t, _good_rows(t, 4), header="filepath\tcaption")),
        ["train.tsv", "no column 'title'", "data.csv_caption_key", "caption"],
    ),
    "wrong separator": (
        lambda t: _loader(_table(t, _good_rows(t, 4), header="filepath,title")),
        ["train.tsv", "csv_separator", "comma"],
    ),
    "unknown data kind": (
        lambda t: build_loader(DataConfig(kind="cvs"), image_size=16, context_length=16, global_batch_size=4),
        ["unknown data.kind 'cvs'", "did you mean 'csv'"],
    ),
    "batch larger than the dataset": (
        lambda t: _loader(_table(t, _good_rows(t, 3)), batch=8),
        ["3 samples", "global batch of 8", "smaller batch size"],
    ),
    "no captions per image": (lambda t: DataConfig(num_captions=0), ["data.num_captions", ">= 1"]),
    "negative max_skips": (lambda t: DataConfig(max_skips=-1), ["data.max_skips", ">= 0"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_a_clear_error(tmp_path, case):
    fn, fragments = DATA_CASES[case]
    _assert_says(_message(lambda: fn(tmp_path)), *fragments)


# --- bad chain specs: fail in load_spec, before anything trains ------------------------------------

SPEC = {
    "family": "debug",
    "data": {"kind": "synthetic", "num_samples": 16},
    "train": {"global_batch_size": 8, "warmup_steps": 1},
}


def _spec(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "out_dir": str(tmp_path / "run"), **changes}))
    return path


SPEC_CASES = {
    "unknown top-level key": (
        {"membres": ["debug-S"]},
        ["spec.yaml", "unknown key 'membres'", "did you mean 'members'"],
    ),
    "unknown train key": (
        {"train": {"global_batch_size": 8, "warmup_step": 1}},
        ["unknown key 'warmup_step'", "did you mean 'warmup_steps'"],
    ),
    "unknown data key": (
        {"data": {"kind": "synthetic", "num_sample": 16}},
        ["data", "unknown key 'num_sample'", "did you mean 'num_samples'"],
    ),
    "lr = 0": ({"train": {"global_batch_size": 8, "lr": 0.0}}, ["train.lr", "> 0", "got 0.0"]),
    "lr < 0": ({"train": {"global_batch_size": 8, "lr": -1e-3}}, ["train.lr", "> 0"]),
    "lr = nan": ({"train": {"global_batch_size": 8, "lr": math.nan}}, ["train.lr", "finite"]),
    "wrong chain order": ({"members": ["debug-L", "debug-S"]}, ["debug-L", "debug-S", "ascending"]),
    "unknown member": ({"members": ["debug-S", "debug-XL"]}, ["debug-XL", "debug-L"]),
    "epochs per member": ({"epochs": [1, 1, 1]}, ["epochs has 3 entries", "2 members", "one per member"]),
    "accum_steps does not divide the batch": (
        {"train": {"global_batch_size": 8, "accum_steps": 3}},
        ["train.accum_steps", "divide global_batch_size=8"],
    ),
    "chain-owned field in train": ({"train": {"teacher": "x.pt"}}, ["'teacher'", "the chain sets it"]),
    "steps in link": ({"link": {"steps": 5}}, ["train/link must not set 'steps'", "the chain sets it"]),
    "unwritable output folder": (None, ["out_dir", "is a file, not a folder", "choose another out_dir"]),
    # issue 11: these passed `chain show` and failed at `run`, some only after member 1 had trained.
    "typo in link.width": (
        {"link": {"width": "insrt"}},
        ["debug-L", "train.width must be one of", "did you mean 'insert'", "'insrt'"],
    ),
    "typo in train.depth": (
        {"train": {"global_batch_size": 8, "depth": "dupliate"}},
        ["train.depth must be one of duplicate", "did you mean 'duplicate'", "'dupliate'"],
    ),
    "missing eval.imagefolders folder": (
        {"eval": {"imagefolders": ["no-such-zs"]}},
        ["eval.imagefolders", "no-such-zs does not exist", "one sub-folder of images per class"],
    ),
    "batch larger than the dataset": (
        {"train": {"global_batch_size": 32}},
        ["16 samples", "global batch of 32", "smaller train.global_batch_size"],
    ),
    "typo in data.kind": (
        {"data": {"kind": "synthtic", "num_samples": 16}},
        ["spec.yaml", "unknown data.kind 'synthtic'", "did you mean 'synthetic'"],
    ),
    "fp16 on CPU": (
        {"train": {"global_batch_size": 8, "precision": "fp16", "device": "cpu"}},
        ["member debug-S", "precision=fp16 needs a CUDA device", "use fp32 or bf16"],
    ),
    "target_ratio below 1": ({"target_ratio": 0.5, "epochs": [1, 1]}, ["target_ratio must be >= 1", "0.5"]),
    "unknown device": (
        {"train": {"device": "tpu"}},
        ["train.device must be auto, cpu, cuda or cuda:K", "'tpu'"],
    ),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_fails_before_training(tmp_path, case):
    changes, fragments = SPEC_CASES[case]
    if changes is None:  # the output folder's parent is a regular file (chmod does not stop root)
        (tmp_path / "blocker").write_text("")
        changes = {"out_dir": str(tmp_path / "blocker" / "run")}
    path = _spec(tmp_path, **changes)
    _assert_says(_message(lambda: load_spec(path)), *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_fails_at_load(tmp_path):
    path = _spec(tmp_path, train={"global_batch_size": 8, "device": "cuda"})
    _assert_says(
        _message(lambda: load_spec(path)), "member debug-S", "device 'cuda'", "no CUDA device", "auto or cpu"
    )
    assert not (tmp_path / "run").exists()


def test_cli_errors_are_one_line_with_the_file(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("family: debug\ntrain: {lr: [\n")
    cases = [
        (["chain", "run", str(tmp_path / "absent.yaml")], ["absent.yaml", "does not exist"]),
        (["chain", "run", str(tmp_path / "broken.yaml")], ["broken.yaml", "not valid YAML"]),
        (["chain", "run", str(_spec(tmp_path)), "--set", "train.lr"], ["train.lr", "key=value"]),
    ]
    for argv, fragments in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("compt chain: error:") and "Traceback" not in err
        _assert_says(err, *fragments)


# --- links, teachers and checkpoints ------------------------------------------------------------------


def _link(tmp_path, teachers, member, teacher, family=None):
    return lambda: train_member(
        _train_cfg(tmp_path, member=member, teacher=str(teacher), family=family and str(family))
    )


LINK_CASES = {
    "teacher larger than its student": (
        lambda t, k: _link(t, k, "debug-S", k["debug-L"]),
        ["student is smaller than its teacher", "width 16 < 32", "pass the smaller model as the teacher"],
    ),
    "patch size mismatch": (
        lambda t, k: _link(t, k, "odd-patch", k["debug-S"], k["odd"]),
        ["patch sizes differ", "teacher 4, student 8", "same patch size"],
    ),
    "context length mismatch": (
        lambda t, k: _link(t, k, "odd-context", k["debug-S"], k["odd"]),
        ["final.pt", "context_length 16", "odd-context has 24", "must match"],
    ),
    "vocabulary mismatch": (
        lambda t, k: _link(t, k, "odd-bigvocab", k["debug-S"], k["odd"]),
        ["vocabulary sizes differ", "teacher 49408, student 49500", "same tokenizer"],
    ),
    "vocabulary smaller than the tokenizer": (
        lambda t, k: lambda: train_member(_train_cfg(t, member="odd-vocab", family=str(k["odd"]))),
        ["odd-vocab", "vocab_size=1000", "set vocab_size: 49408"],
    ),
    "missing teacher checkpoint": (
        lambda t, k: _link(t, k, "debug-L", t / "runs" / "debug-S" / "final.pt"),
        ["runs/debug-S/final.pt", "does not exist", "train that member first"],
    ),
    "teacher file is not a checkpoint": (
        lambda t, k: (t.joinpath("notes.pt").write_text("hello"), _link(t, k, "debug-L", t / "notes.pt"))[1],
        ["notes.pt", "cannot be read", "written by compt"],
    ),
    "teacher weights of another model": (
        lambda t, k: (
            save_checkpoint(
                t / "mixed.pt",
                {
                    "model": torch.load(k["debug-L"])["model"],
                    "model_cfg": get_member("debug-S").model_cfg,
                    "member": "debug-S",
                },  # fmt: skip
            ),
            _link(t, k, "debug-L", t / "mixed.pt"),
        )[1],
        ["mixed.pt", "weights do not match its model config"],
    ),
}


@pytest.mark.parametrize("case", list(LINK_CASES))
def test_bad_link_is_a_clear_error(tmp_path, teachers, case):
    make, fragments = LINK_CASES[case]
    _assert_says(_message(make(tmp_path, teachers)), *fragments)
    assert not (tmp_path / "run" / "step_1.pt").exists()


def test_resuming_a_folder_of_another_model_is_refused(tmp_path):
    train_member(_train_cfg(tmp_path, steps=3, save_every_steps=1))
    (tmp_path / "run" / "final.pt").unlink()  # as if interrupted: only step checkpoints are left
    msg = _message(lambda: train_member(_train_cfg(tmp_path, member="debug-L", steps=3)))
    _assert_says(msg, "step_", "belongs to a different run", "train.member is 'debug-S'", "new out_dir")


def test_fp16_on_cpu_says_what_to_use(tmp_path):
    msg = _message(lambda: train_member(_train_cfg(tmp_path, precision="fp16")))
    _assert_says(msg, "train.precision=fp16", "CUDA", "use fp32 or bf16")


def test_nan_loss_names_the_step_the_checkpoint_and_the_fix(tmp_path):
    # An absurd learning rate makes the weights inf after one update: the next loss is NaN.
    cfg = _train_cfg(tmp_path, lr=1e30, steps=4, save_every_steps=1, log_every_steps=1)
    msg = _message(lambda: train_member(cfg))
    _assert_says(msg, "NaN/inf at step 2", "debug-S", "step_1.pt", "lower train.lr", "grad_clip")


def test_out_of_range_eval_set_labels(tmp_path):
    images = torch.zeros(2, 3, 16, 16)
    msg = _message(lambda: ZeroShotTask("mine", ["cat", "dog"], ["a {}."], images, torch.tensor([0, 2])))
    _assert_says(msg, "task 'mine'", "labels outside 0..1")


def test_eval_folder_missing_or_without_classes(tmp_path):
    _assert_says(
        _message(lambda: imagefolder_task(tmp_path / "zs", 16)), "zs", "does not exist", "sub-folder"
    )
    (tmp_path / "flat").mkdir()
    _image(tmp_path / "flat" / "x.png")
    _assert_says(_message(lambda: imagefolder_task(tmp_path / "flat", 16)), "flat", "no class sub-folders")


def test_a_step_whose_samples_are_all_bad_trains_on_borrowed_ones(tmp_path):
    # Issue 11 item 9: the first batch of 4 is all missing files (was: RuntimeError inside open_clip).
    rows = [(f"gone{i}.png", f"a missing picture {i}") for i in range(4)] + _good_rows(tmp_path, 4)
    data = DataConfig(kind="csv", path=str(_table(tmp_path, rows)), shuffle=False)
    result = train_member(_train_cfg(tmp_path, data=data, global_batch_size=4, steps=2, save_every_steps=0))
    assert result.steps == 2 and result.final_checkpoint.is_file()


# --- issue 11: specs, overrides and output paths that used to give Python's words, not ours -------


SPEC_FILE_CASES = {
    "empty file": ("", [], ["spec.yaml is empty", "family, out_dir", "configs/demo.yaml"]),
    "top-level list": ("- family: debug\n", [], ["spec.yaml", "expected a mapping", "got a list"]),
    "required key missing": ("name: x\n", [], ["spec.yaml", "missing required key(s) 'family', 'out_dir'"]),
    "--set into a scalar": (
        None,
        ["name.x=1"],
        ["override 'name.x=1'", "name is 'demo'", "not a mapping", "set name=VALUE"],
    ),
}


@pytest.mark.parametrize("case", list(SPEC_FILE_CASES))
def test_bad_spec_file_or_override_is_a_clear_error(tmp_path, case):
    text, overrides, fragments = SPEC_FILE_CASES[case]
    path = _spec(tmp_path, name="demo") if text is None else tmp_path / "spec.yaml"
    if text is not None:
        path.write_text(text)
    msg = _message(lambda: load_spec(path, overrides))
    _assert_says(msg, *fragments)
    assert "__init__" not in msg and "dictionary update sequence" not in msg


@pytest.mark.parametrize("root", ["/proc", "/sys"])
def test_out_dir_on_a_virtual_filesystem_fails_at_load(tmp_path, root):
    # Root passes every permission check, so only a real probe tells (issue 11: a bare errno before).
    if not Path(root).is_dir():
        pytest.skip(f"no {root} here")
    path = _spec(tmp_path, out_dir=f"{root}/compt-run")
    _assert_says(_message(lambda: load_spec(path)), f"out_dir {root}/compt-run cannot be written",
                 f"{root} does not accept new files", "choose another out_dir")  # fmt: skip


def test_grow_onto_an_unwritable_path_fails_before_growing(tmp_path, teachers, capsys):
    argv = ["grow", "--teacher", str(teachers["debug-S"]), "--student", "debug-L", "--out", "/sys/compt/x.pt"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    _assert_says(err, "--out /sys/compt cannot be written", "choose another --out")
    assert "resume" not in err and "Traceback" not in err


# --- issue 11: the train and chain command lines -----------------------------------------------------


def _train_argv(out: Path, *extra: str) -> list[str]:
    return ["train", "--member", "debug-L", "--data", "synthetic", "--set", "data.num_samples=16", "--steps",
            "1", "--batch-size", "8", "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


def test_train_over_another_members_final_pt_is_refused_until_retrain(tmp_path, teachers, capsys):
    """issue 11: it printed "debug-L: 16 steps" and left debug-S's final.pt in place."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "final.pt").write_bytes(teachers["debug-S"].read_bytes())
    assert cli_main(_train_argv(out)) == 2
    err = capsys.readouterr().err
    _assert_says(err, "belongs to a different run", "train.member is 'debug-S' there but 'debug-L' now",
                 "nothing was trained", "--retrain")  # fmt: skip
    assert torch.load(out / "final.pt", weights_only=False)["member"] == "debug-S"
    assert cli_main(_train_argv(out, "--retrain")) == 0
    assert torch.load(out / "final.pt", weights_only=False)["member"] == "debug-L"
    assert torch.load(tmp_path / "run.replaced-1" / "final.pt", weights_only=False)["member"] == "debug-S"


def test_teacher_may_be_a_run_folder(tmp_path, teachers, capsys):
    assert cli_main(_train_argv(tmp_path / "link", "--teacher", str(teachers["debug-S"].parent))) == 0
    assert torch.load(tmp_path / "link" / "final.pt", weights_only=False)["teacher"]["member"] == "debug-S"
    (tmp_path / "unfinished").mkdir()
    assert cli_main(_train_argv(tmp_path / "x", "--teacher", str(tmp_path / "unfinished"))) == 2
    _assert_says(
        capsys.readouterr().err, "--teacher", "unfinished is a folder without final.pt", "finish it first"
    )


def test_negative_eval_every_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(_train_argv(tmp_path / "run", "--eval-every", "-3"))
    assert e.value.code == 2
    _assert_says(capsys.readouterr().err, "--eval-every", "must be >= 0")
    assert not (tmp_path / "run").exists()


def test_train_out_on_an_unwritable_path_is_one_line(tmp_path, capsys):
    assert cli_main(_train_argv(Path("/sys/compt-run"))) == 2
    err = capsys.readouterr().err
    _assert_says(err, "train.out_dir /sys/compt-run cannot be written", "choose another train.out_dir")
    assert "Traceback" not in err


def test_after_individual_the_suggested_report_command_works(tmp_path, capsys):
    """issue 11: it suggested `compt report OUT`, which failed: the chain's summary.json did not exist."""
    path = _spec(tmp_path, members=["debug-S"], epochs=[1], baseline_epochs=1)
    assert cli_main(["chain", "run", str(path), "--individual"]) == 0
    out = capsys.readouterr().out
    suggested = [
        line.split("#")[0].split() for line in out.splitlines() if line.startswith(("report:", "next:"))
    ]
    assert suggested == [["report:", "compt", "report", str(tmp_path / "run" / "individual")],
                         ["next:", "compt", "chain", "run", str(path)]]  # fmt: skip
    assert cli_main(suggested[0][2:]) == 0
    assert (tmp_path / "run" / "individual" / "report" / "report.md").is_file()


def test_grow_takes_a_run_folder_and_refuses_to_overwrite_its_teacher(tmp_path, teachers, capsys):
    run = teachers["debug-S"].parent
    assert (
        cli_main(["grow", "--teacher", str(run), "--student", "debug-L", "--out", str(tmp_path / "g.pt")])
        == 0
    )
    assert torch.load(tmp_path / "g.pt", weights_only=False)["grow"]["teacher_member"] == "debug-S"
    capsys.readouterr()
    argv = ["grow", "--teacher", str(run), "--student", "debug-L", "--out", str(run / "final.pt")]
    assert cli_main(argv) == 2
    _assert_says(capsys.readouterr().err, "final.pt is the teacher itself", "another file")


def test_ctrl_c_in_a_short_command_is_one_line_and_130(capsys):
    """Ctrl-C in `compt plan` (or grow, eval...) was a KeyboardInterrupt traceback (issue 11 item 10)."""
    # The plan counts 5 ViTs' MACs on meta tensors (~2.5 s); an earlier test in the same process may
    # have cached them, and a plan from the cache ends before the Ctrl-C arrives.
    _sample_cost.cache_clear()
    _member_params.cache_clear()
    # Python's own Ctrl-C handler, as in a terminal (a shell starts background jobs with SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # A KeyboardInterrupt that lands inside a weakref callback or __del__ (torch runs many while it
    # builds models) is swallowed by Python and reported to sys.unraisablehook: that is Python's
    # behaviour, not compt's, and it made this test flaky in CI. Each swallowed Ctrl-C is re-sent, so
    # exactly one reaches the command.
    swallowed, finished = threading.Event(), threading.Event()
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            swallowed.set()
        else:
            previous_hook(unraisable)

    def ctrl_c():
        time.sleep(0.3)
        while not finished.is_set():
            swallowed.clear()
            os.kill(os.getpid(), signal.SIGINT)
            while not (swallowed.wait(0.05) or finished.is_set()):
                pass

    sys.unraisablehook = hook
    sender = threading.Thread(target=ctrl_c, daemon=True)
    sender.start()
    try:
        assert cli_main(["plan", "--family", "vit", "--captions", "7"]) == 130
    finally:
        finished.set()
        sender.join()
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err.strip() == "compt: interrupted by Ctrl-C"
