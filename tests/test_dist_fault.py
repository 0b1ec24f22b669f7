"""Distributed fault: a rank killed mid-chain under `torchrun --max-restarts 1` costs a restart, not the run.

Two gloo ranks run ``compt chain run`` through a small launcher written by the test. On the first
attempt (``TORCHELASTIC_RESTART_COUNT=0``) a watcher thread in rank 1 sends its own process SIGKILL
as soon as a chosen checkpoint file appears; the library has no test hook. torchrun sees the failed
worker, stops the other one and restarts both; they resume from the newest valid checkpoint and
must finish with weights and summary equal to an uninterrupted 2-rank run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compt.engine.checkpoint import load_checkpoint
from compt.engine.runlog import read_metrics

pytestmark = pytest.mark.distributed

SPEC = {
    "name": "dist-fault",
    "family": "debug",
    "data": {"kind": "synthetic", "num_samples": 32},
    "baseline_epochs": 1,  # debug-S: 4 steps of 8 samples (4 per rank)
    "epochs": [1, 1],  # debug-L, the link: 4 steps
    "train": {
        "global_batch_size": 8,
        "lr": 1.0e-3,
        "warmup_steps": 1,
        "save_every_steps": 1,
        "log_every_steps": 1,
        "deterministic": True,
        "device": "cpu",
    },
}

LAUNCHER = '''\
"""compt chain run; rank $KILL_RANK kills itself once $KILL_AFTER exists (first attempt only)."""
import os, signal, sys, threading, time
from pathlib import Path

attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
with open(os.environ["ATTEMPT_LOG"], "a") as f:
    f.write(f"rank {os.environ['RANK']} attempt {attempt}\\n")
if os.environ.get("KILL_RANK") == os.environ["RANK"] and attempt == "0":
    target = Path(os.environ["KILL_AFTER"])

    def watch():
        while not target.exists():
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()

from compt.cli import main

sys.exit(main(sys.argv[1:]))
'''


def _torchrun(tmp: Path, fault: bool) -> tuple[Path, list[str]]:
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "out_dir": str(tmp / "run")}))
    (tmp / "launch.py").write_text(LAUNCHER)
    root = tmp / "run" / "chain"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "ATTEMPT_LOG": str(tmp / "attempts"),
    }
    if fault:  # mid-link: the link's second checkpoint has just been written
        env |= {"KILL_RANK": "1", "KILL_AFTER": str(root / "debug-L" / "step_2.pt")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [
        *torchrun,
        "--max-restarts=1",
        "--monitor-interval=0.2",
        str(tmp / "launch.py"),
        "chain",
        "run",
        str(spec),
    ]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return root, (tmp / "attempts").read_text().splitlines()


def test_a_killed_rank_restarts_and_resumes_to_the_same_result(tmp_path):
    reference, attempts = _torchrun(tmp_path / "reference", fault=False)
    assert sorted(attempts) == ["rank 0 attempt 0", "rank 1 attempt 0"]
    root, attempts = _torchrun(tmp_path / "fault", fault=True)
    # One elastic restart of both ranks...
    assert sorted(attempts) == [
        "rank 0 attempt 0",
        "rank 0 attempt 1",
        "rank 1 attempt 0",
        "rank 1 attempt 1",
    ]
    # ...that resumed the link from a checkpoint rather than starting it over.
    starts = read_metrics(root / "debug-L" / "metrics.jsonl", "start")
    assert len(starts) == 2 and starts[0]["resumed_from"] is None
    assert Path(starts[1]["resumed_from"]).name.startswith("step_")
    for member in ("debug-S", "debug-L"):
        got = load_checkpoint(root / member / "final.pt")
        want = load_checkpoint(reference / member / "final.pt")
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"]), member
        assert (got["steps"], got["metrics"]) == (want["steps"], want["metrics"])
    timing = ("wall_s", "accumulated_wall_s")
    rows = [
        [
            {k: v for k, v in m.items() if k not in timing}
            for m in json.loads((d / "summary.json").read_text())["members"]
        ]
        for d in (root, reference)
    ]
    assert rows[0] == rows[1]
