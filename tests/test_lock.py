"""compt.engine.lock: one run per folder, across real processes; a dead holder's lock is taken over."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from compt.cli import main as cli_main
from compt.engine import lock
from compt.engine.lock import FolderInUseError, FolderLock

HOLD = textwrap.dedent(
    """
    import sys, time
    from compt.engine.lock import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(300)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Start a real process that takes a folder's lock and keeps it; yields (process, start(folder))."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, holder, capsys):
    out = tmp_path / "run"
    proc = holder(out)
    argv = ["train", "--member", "debug-S", "--data", "synthetic", "--set", "data.num_samples=16",
            "--steps", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} is in use by another run: pid {proc.pid} on " in err and "Wait for it to finish" in err
    assert not (out / "metrics.jsonl").exists()  # nothing trained, nothing written


def test_two_chain_runs_on_one_out_dir_are_refused(tmp_path, holder, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"family": "debug", "out_dir": str(tmp_path / "run"),
                                    "data": {"kind": "synthetic", "num_samples": 16},
                                    "train": {"global_batch_size": 8, "device": "cpu"}}))  # fmt: skip
    proc = holder(tmp_path / "run" / "chain")  # the lock a running `compt chain run` holds
    assert cli_main(["chain", "run", str(spec)]) == 2
    assert f"run/chain is in use by another run: pid {proc.pid}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "chain").exists()


def test_the_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path, holder, caplog):
    proc = holder(tmp_path / "run")
    proc.send_signal(signal.SIGKILL)  # dies holding it: no release, its record stays in the file
    proc.wait()
    taken = FolderLock(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="compt.lock"):
        taken.acquire()
    assert f"taking over the lock of pid {proc.pid} on " in caplog.text and "which is gone" in caplog.text
    with pytest.raises(FolderInUseError, match=f"pid {os.getpid()} "):  # held now, by this process
        FolderLock(tmp_path / "run").acquire()
    taken.release()
    FolderLock(tmp_path / "run").acquire()  # released: free again, and no note this time
    assert caplog.text.count("taking over") == 1


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .* on this filesystem"):
        FolderLock(tmp_path / "run").acquire()
