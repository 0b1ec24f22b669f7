"""Bad input, end to end: every case is a clear error (what is wrong, where, how to fix) or a counted skip.

Each error case lists fragments its message must hold: the *what* (the problem), the *where* (file,
field, member or step) and the *how* (what to change). Bad samples are not errors: they are skipped
and counted by reason, until more than ``data.max_skips`` of them stop the run with a message.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from compt.chain import load_spec
from compt.cli import main as cli_main
from compt.engine.checkpoint import CheckpointError, save_checkpoint
from compt.engine.train import NonFiniteLossError, TrainConfig, train_member
from compt.families import get_member
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
    "unwritable output folder": (None, ["out_dir", "is a file, not a folder", "choose another out_dir"]),
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
