"""Chaos: a chain run killed with SIGKILL at seeded random moments ends exactly like an uninterrupted one.

Each test runs the real command line, ``python -m compt chain run SPEC``, as a subprocess on a
2-member ``debug`` chain (a baseline and a grown, distilled link) with ``train.deterministic: true``
and a checkpoint after every step. A killer watches the run's folder and sends SIGKILL when a
seeded trigger fires: the run has made k more records, a checkpoint is being written, a member's
``final.pt`` has just appeared (before its export), the last export has just appeared (before
``summary.json``)... each followed by a seeded random delay. Triggers are events in the run's own
files, not wall-clock times, so a loaded machine changes where a kill lands only within an event,
never whether it happens. After each kill the same command is started again; at the end every
member's final weights (``torch.equal`` on every tensor), its export, the per-step losses and the
summary metrics must equal those of an uninterrupted run.

CI mode: 7 kills (about a minute on 2 cores). ``-m slow``: 15 kills, twice, with other seeds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compt.engine.checkpoint import load_checkpoint, verify_checkpoint
from compt.engine.runlog import read_metrics

MEMBERS = ("debug-S", "debug-L")
SPEC = {
    "name": "chaos",
    "family": "debug",
    "data": {"kind": "synthetic", "num_samples": 32},
    "baseline_epochs": 2,  # debug-S: 8 steps of 8 samples
    "epochs": [2, 1],  # debug-L, the link: 4 steps
    "train": {
        "global_batch_size": 8,
        "lr": 1.0e-3,
        "warmup_steps": 1,
        "save_every_steps": 1,  # a checkpoint at every step: kills land around writes often
        "keep_last": 2,
        "log_every_steps": 1,
        "deterministic": True,
        "device": "cpu",
    },
}
RUN_TIMEOUT_S = 300  # one process; a run takes ~10 s on 2 idle cores
POLL_S = 0.003


def _write_spec(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "out_dir": str(folder / "run")}))
    return path


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("COMPT_DEBUG", None)
    return env


def _start(spec: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "compt", "chain", "run", str(spec)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"compt chain run did not finish within {timeout} s:\n{err[-4000:]}")
    return proc.returncode, out, err


def _run_to_end(spec: Path) -> None:
    rc, out, err = _finish(_start(spec))
    assert rc == 0, f"compt chain run failed (rc {rc}):\n{out[-2000:]}\n{err[-4000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run (same command, same environment)."""
    spec = _write_spec(tmp_path_factory.mktemp("reference"))
    _run_to_end(spec)
    return spec.parent / "run" / "chain"


# --- triggers: predicates on the run folder ----------------------------------------------------------


def _records(root: Path) -> int:
    """How far the run is: metrics records plus finished artefacts (roughly monotone across resumes)."""
    n = 0
    for path in root.glob("*/metrics.jsonl"):
        try:
            n += sum(1 for line in path.read_text().splitlines() if '"kind": "start"' not in line)
        except OSError:
            pass
    n += sum(1 for _ in root.glob("*/final.pt")) + sum(1 for _ in root.glob("*/export/*.json"))
    return n + (root / "summary.json").exists()


def _temp_files(root: Path) -> set[Path]:
    return set(root.glob("*/.step_*.tmp*")) | set(root.glob("*/.final.pt*.tmp*"))


def _writing_checkpoint(root: Path, stale: set[Path]) -> bool:
    """A checkpoint write is in flight: a new temporary file, or a sidecar listing two sums."""
    if _temp_files(root) - stale:  # (``stale``: left by an earlier kill, deleted at the next save)
        return True
    for member in root.glob("*"):
        for sidecar in member.glob("*.sha256"):
            try:
                if len(sidecar.read_text().split("\n")) > 2:
                    return True
            except OSError:
                pass
    return False


def _trigger(kind: str, root: Path, rng: random.Random):
    """A predicate that becomes true at the chosen event of the run that is about to start."""
    if kind == "records":  # k more records than now
        target = _records(root) + rng.randint(1, 2)
        return lambda: _records(root) >= target
    if kind == "save":  # mid checkpoint write, or failing that right after the next one lands
        seen, stale = set(root.glob("*/*.pt")), _temp_files(root)
        return lambda: _writing_checkpoint(root, stale) or bool(set(root.glob("*/*.pt")) - seen)
    if kind.startswith("final:"):  # a member's final.pt just appeared (before its export)
        path = root / kind.split(":", 1)[1] / "final.pt"
        return path.exists
    if kind == "export":  # the last member's export is being written (before summary.json)
        return lambda: any((root / MEMBERS[-1] / "export").glob("*"))
    raise ValueError(kind)


def _kill_at(spec: Path, root: Path, kind: str, rng: random.Random) -> str:
    """Start the run, SIGKILL it when ``kind`` fires plus a seeded delay; 'killed' or 'finished'."""
    fired = _trigger(kind, root, rng)
    delay_s = rng.choice([0.0, rng.uniform(0.0, 0.06)])  # a debug step takes ~0.1 s
    proc = _start(spec)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if fired():
            time.sleep(delay_s)
            proc.send_signal(signal.SIGKILL)
            _finish(proc)
            return "killed" if proc.returncode == -signal.SIGKILL else "finished"
        time.sleep(POLL_S)
    rc, out, err = _finish(proc, timeout=5)
    assert rc == 0, f"the run failed instead of being killed (rc {rc}):\n{err[-4000:]}"
    return "finished"


# --- what must equal the uninterrupted run -----------------------------------------------------------


def _assert_same_as_reference(run: Path, reference: Path) -> None:
    for member in MEMBERS:
        final = run / member / "final.pt"
        assert verify_checkpoint(final), f"{final} fails its checksum"
        got, want = load_checkpoint(final), load_checkpoint(reference / member / "final.pt")
        assert got["model"].keys() == want["model"].keys()
        for key in want["model"]:
            assert torch.equal(got["model"][key], want["model"][key]), f"{member}: {key} differs"
        for key in ("steps", "samples_seen", "train_macs", "metrics"):
            assert got[key] == want[key], f"{member}: {key} differs"
        # The export is complete (weights and config) and holds the same weights.
        exp, ref_exp = run / member / "export", reference / member / "export"
        assert (exp / "open_clip_config.json").read_text() == (ref_exp / "open_clip_config.json").read_text()
        a, b = (
            load_file(exp / "open_clip_model.safetensors"),
            load_file(ref_exp / "open_clip_model.safetensors"),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # Every step is logged once, with the losses of the uninterrupted run.
        keys = ("step", "epoch", "loss", "loss_task", "loss_ifd", "lr", "samples_seen", "train_macs")
        trace = [{k: r.get(k) for k in keys} for r in read_metrics(run / member / "metrics.jsonl", "train")]
        ref = [
            {k: r.get(k) for k in keys} for r in read_metrics(reference / member / "metrics.jsonl", "train")
        ]
        assert trace == ref, f"{member}: the per-step trace differs from the uninterrupted run"
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    timing = ("wall_s", "accumulated_wall_s")
    for a, b in zip(got["members"], want["members"], strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }


def _chaos(tmp_path: Path, reference: Path, seed: int, plan: list[str]) -> int:
    spec = _write_spec(tmp_path)
    root = spec.parent / "run" / "chain"
    rng = random.Random(seed)
    kills = 0
    for kind in plan:
        outcome = _kill_at(spec, root, kind, rng)
        if outcome == "finished":
            break
        kills += 1
    _run_to_end(spec)  # the same command, once more, finishes the run
    _assert_same_as_reference(root, reference)
    return kills


# Triggers in the order the run meets them; 'records' ones fall at seeded random points in between.
# A trigger that the run passes without firing (it finished first) ends the kills: plans have spare ones.
CI_PLAN = ["records", "save", "records", "final:debug-S", "records", "save", "export"]


def test_sigkill_at_random_moments_resumes_exactly(tmp_path, reference):
    kills = _chaos(tmp_path, reference, seed=1234, plan=CI_PLAN)
    assert kills >= 5, f"only {kills} kills landed before the run finished"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_many_times_resumes_exactly(tmp_path, reference, seed):
    rng = random.Random(seed)
    first = rng.sample(["records"] * 5 + ["save"] * 4, 9)  # 9 kills in the 8 steps of debug-S
    plan = [*first, "final:debug-S", "records", "save", "records", "save", "export"]
    kills = _chaos(tmp_path, reference, seed=seed, plan=plan)
    assert kills >= 12, f"only {kills} kills landed before the run finished"


def _last_step_logged(member_dir: Path, step: int) -> bool:
    try:
        return f'"kind": "train", "step": {step},' in (member_dir / "metrics.jsonl").read_text()
    except OSError:
        return False


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, reference):
    """SIGTERM mid-link: a checkpoint at the next step boundary, exit 143, then an exact resume."""
    spec = _write_spec(tmp_path)
    root = spec.parent / "run" / "chain"
    link = root / MEMBERS[1]
    proc = _start(spec)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and not any(link.glob("step_*.pt")) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 143, f"expected exit status 143 after SIGTERM, got {rc}:\n{err[-3000:]}"
    assert "SIGTERM" in err and "rerun the same command" in err
    assert "Traceback" not in err, err[-3000:]
    # The checkpoint named in the message exists and verifies; no final.pt for the interrupted link.
    saved = [p for p in link.glob("step_*.pt") if p.name in err]
    assert saved and all(verify_checkpoint(p) for p in saved)
    assert not (link / "final.pt").exists()
    _run_to_end(spec)
    _assert_same_as_reference(root, reference)


def test_sigterm_during_a_members_last_boundary_stops_the_chain(tmp_path, reference):
    """SIGTERM while the first member evaluates after its last step: it finishes, the chain stops."""
    spec = _write_spec(tmp_path)
    root = spec.parent / "run" / "chain"
    first = root / MEMBERS[0]
    proc = _start(spec)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and not _last_step_logged(first, 8) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 143, f"expected exit status 143 after SIGTERM, got {rc}:\n{err[-3000:]}"
    assert "SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert verify_checkpoint(first / "final.pt")
    assert not any((root / MEMBERS[1]).glob("step_*.pt")), "the chain went on training after SIGTERM"
    _run_to_end(spec)
    _assert_same_as_reference(root, reference)


def test_ctrl_c_to_the_process_group_saves_and_exits_130(tmp_path, reference):
    """issue 11: Ctrl-C was a KeyboardInterrupt traceback that saved nothing. A terminal's Ctrl-C reaches
    the whole process group, DataLoader workers included: they must leave it to the trainer."""
    spec = _write_spec(tmp_path)
    spec.write_text(
        yaml.safe_dump({**SPEC, "out_dir": str(tmp_path / "run"), "data": {**SPEC["data"], "workers": 1}})
    )
    link = tmp_path / "run" / "chain" / MEMBERS[1]
    cmd = [sys.executable, "-m", "compt", "chain", "run", str(spec)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, **pipes)  # its own process group
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and not any(link.glob("step_*.pt")) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    rc, out, err = _finish(proc)
    assert rc == 130, f"expected exit status 130 after Ctrl-C, got {rc}:\n{err[-3000:]}"
    assert "stopped by Ctrl-C (SIGINT) at step" in err and "rerun the same command" in err
    assert "Traceback" not in err, err[-3000:]
    saved = [p for p in link.glob("step_*.pt") if p.name in err]
    assert saved and all(verify_checkpoint(p) for p in saved) and not (link / "final.pt").exists()
    _run_to_end(spec)  # data.workers is free to change: the same run as the reference
    _assert_same_as_reference(tmp_path / "run" / "chain", reference)
