"""Checkpoint integrity: checksums catch damage, the last good file is used, failed saves harm nothing.

Every failure here is a real file or filesystem condition (a truncated or bit-flipped file, a folder
where a file should be, ENOSPC from ``/dev/full`` or a full tmpfs), never a mocked call.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from compt.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from compt.engine.train import TrainConfig, TrainingInterrupted, train_member
from compt.families import get_member
from compt.paradigms.clip.data import DataConfig


def _payload(value: float = 1.0) -> dict:
    member = get_member("debug-S")
    model = member.create()
    torch.nn.init.constant_(model.logit_scale, value)
    return {"model": model.state_dict(), "model_cfg": member.model_cfg, "member": member.name}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_writes_a_sidecar_and_loads_back(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "step_1.pt", _payload(2.0))
    assert path.with_name("step_1.pt.sha256").read_text().split() == [
        __import__("hashlib").sha256(path.read_bytes()).hexdigest(),
        "step_1.pt",
    ]
    model, payload = model_from_checkpoint(path)
    assert payload["member"] == "debug-S" and model.logit_scale.item() == 2.0
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("damage", [_truncate, _flip_bit], ids=["truncated", "bit-flip"])
def test_damage_is_detected_and_named(tmp_path, damage):
    path = save_checkpoint(tmp_path / "step_3.pt", _payload())
    damage(path)
    assert not verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"step_3\.pt is corrupted or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", [_truncate, _flip_bit], ids=["truncated", "bit-flip"])
def test_latest_falls_back_to_the_previous_good_one_with_a_warning(tmp_path, damage):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"step_{step}.pt", _payload(float(step)))
    damage(tmp_path / "step_3.pt")
    with pytest.warns(UserWarning, match=r"step_3\.pt is corrupted or truncated; falling back"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step_2.pt"
    _truncate(tmp_path / "step_2.pt")
    _truncate(tmp_path / "step_1.pt")
    with pytest.warns(UserWarning, match=r"step_1\.pt"):
        assert latest_checkpoint(tmp_path) is None


def test_a_kill_between_the_three_writes_leaves_a_file_that_verifies(tmp_path):
    """save_checkpoint replacing a file: sidecar lists both sums, then data, then only the new sum."""
    path = save_checkpoint(tmp_path / "final.pt", _payload(1.0))
    old_bytes, old_sidecar = path.read_bytes(), path.with_name("final.pt.sha256").read_text()
    save_checkpoint(path, _payload(3.0))
    new_bytes = path.read_bytes()
    both = path.with_name("final.pt.sha256").read_text() + old_sidecar
    for data in (old_bytes, new_bytes):  # killed after step 1 (old data) or after step 2 (new data)
        path.write_bytes(data)
        path.with_name("final.pt.sha256").write_text(both)
        assert verify_checkpoint(path)
        load_checkpoint(path)


def test_a_save_into_an_impossible_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run folder should be")
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*runs/m/step_1\.pt.*rerun"):
        save_checkpoint(blocker / "m" / "step_1.pt", _payload())
    # A folder where the file should be: the rename fails, nothing half-written stays behind.
    (tmp_path / "step_2.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"step_2\.pt"):
        save_checkpoint(tmp_path / "step_2.pt", _payload())
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def _next_temp_file(path: Path) -> Path:
    # save_checkpoint writes through ".<name>.tmp<pid>" in the target folder, then renames it.
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def test_disk_full_keeps_the_previous_checkpoint(tmp_path):
    """ENOSPC, really: the temporary file is a link to /dev/full, which refuses every write."""
    path = save_checkpoint(tmp_path / "final.pt", _payload(1.0))
    before = path.read_bytes()
    _next_temp_file(path).symlink_to("/dev/full")
    with pytest.raises(
        CheckpointError, match=r"final\.pt: No space left on device.*previous checkpoint is intact"
    ):
        save_checkpoint(path, _payload(5.0))
    assert path.read_bytes() == before and verify_checkpoint(path)
    assert float(load_checkpoint(path)["model"]["logit_scale"]) == 1.0


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (needs mount rights: root in a container that allows it); skipped otherwise."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", f"compt-{uuid.uuid4().hex[:6]}", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the /dev/full test covers ENOSPC")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_filesystem_keeps_the_previous_checkpoint(small_tmpfs):
    small = {"model": {"w": torch.zeros(1000)}, "model_cfg": {}, "member": "x"}
    path = save_checkpoint(small_tmpfs / "step_1.pt", small)
    big = {"model": {"w": torch.ones(200_000)}, "model_cfg": {}, "member": "x"}  # 800 kB > 256 KiB
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, big)
    assert verify_checkpoint(path) and torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(1000))
    assert not [p for p in small_tmpfs.iterdir() if ".tmp" in p.name]


def test_prune_keeps_the_newest_and_drops_temp_files_of_killed_writers(tmp_path):
    (tmp_path / ".step_3.pt.tmp999999999").write_bytes(b"half a checkpoint")  # a writer killed mid-save
    for step in (1, 2, 10):
        save_checkpoint(tmp_path / f"step_{step}.pt", _payload())
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_10.pt",
        "step_10.pt.sha256",
        "step_2.pt",
        "step_2.pt.sha256",
    ]
    assert not list(tmp_path.glob(".*.tmp*"))


def test_not_a_checkpoint_and_missing_file_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere\.pt does not exist"):
        load_checkpoint(tmp_path / "nowhere.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt is not a compt checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.pt cannot be read"):
        load_checkpoint(tmp_path / "text.pt")


def test_a_checkpoint_of_another_kind_of_model_is_named_before_building_it(tmp_path):
    # A language model's config read as CLIP (issue 16): the paradigm's own validation, not a TypeError.
    save_checkpoint(tmp_path / "lm.pt", {"model": {}, "model_cfg": {"hidden_size": 8}, "paradigm": "clip"})
    with pytest.raises(CheckpointError, match=r"lm\.pt does not hold a clip model: .*'hidden_size'"):
        model_from_checkpoint(tmp_path / "lm.pt")


# --- the trainer on damaged and failing checkpoints ---------------------------------------------


def _cfg(out: Path) -> TrainConfig:
    return TrainConfig(
        member="debug-S",
        data=DataConfig(kind="synthetic", num_samples=32),
        out_dir=str(out),
        epochs=2,
        global_batch_size=8,
        lr=1e-3,
        warmup_steps=1,
        save_every_steps=1,
        keep_last=0,
        eval_every_steps=1,
        deterministic=True,
        device="cpu",
    )


def _train(out: Path, sigterm_at: int | None = None):
    def evaluate(model, step):  # the same callback in every run; it may also play the scheduler
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    return train_member(_cfg(out), evaluate=evaluate)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _train(out)
    return load_checkpoint(out / "final.pt")["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", [_truncate, _flip_bit], ids=["truncated", "bit-flip"])
def test_training_resumes_from_the_previous_good_checkpoint(tmp_path, reference, damage):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(out, sigterm_at=5)
    damage(out / "step_5.pt")
    with pytest.warns(UserWarning, match=r"step_5\.pt is corrupted or truncated"):
        _train(out)
    assert _same(load_checkpoint(out / "final.pt")["model"], reference)


def test_a_corrupted_final_checkpoint_is_rewritten(tmp_path, reference):
    out = tmp_path / "run"
    _train(out)
    _flip_bit(out / "final.pt")
    with pytest.warns(UserWarning, match=r"final\.pt is corrupted or truncated"):
        _train(out)
    assert verify_checkpoint(out / "final.pt")
    assert _same(load_checkpoint(out / "final.pt")["model"], reference)


def test_a_failed_save_stops_training_and_keeps_the_previous_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(out, sigterm_at=3)
    # The disk is "full" when step 5 is saved: the run stops with the error, step_4 stays valid.
    _next_temp_file(out / "step_5.pt").symlink_to("/dev/full")
    with pytest.raises(CheckpointError, match=r"step_5\.pt: No space left on device.*free disk space"):
        _train(out)
    assert latest_checkpoint(out) == out / "step_4.pt" and not (out / "step_5.pt").exists()
    _train(out)  # space is back: rerun the same command
    assert _same(load_checkpoint(out / "final.pt")["model"], reference)
