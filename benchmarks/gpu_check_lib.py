"""The pieces of benchmarks/gpu_check.py: stages, their budgets, the GPU peak table, command checks.

A :class:`Stage` is a list of commands (rendered from the run's :class:`Plan`), a time budget, the
modules it needs, and a reader that turns what its commands wrote into the JSON's ``result``. On
a GPU machine :func:`run_stage` runs the commands one after another in their own process groups
and kills the group the moment the stage's budget is spent; without CUDA, :func:`check_stage`
renders the same commands and checks each against the parser of the program it would launch.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (TFLOP/s, no 2:4 sparsity) from NVIDIA's/AMD's datasheets, matched
# against torch.cuda.get_device_name in order (the first match wins: "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100.*NVL", "H100 NVL", 835.0),
    (r"H200.*NVL", "H200 NVL", 835.0),
    (r"GH200", "GH200", 989.0),
    (r"H100|H800", "H100 SXM", 989.0),
    (r"H200", "H200 SXM", 989.0),
    (r"GB200", "GB200", 2500.0),
    (r"B200", "B200", 2250.0),
    (r"A100|A800", "A100", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"L40\b", "L40", 181.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
    (r"MI300X", "MI300X", 1307.0),
]

# What to install when a stage's module is missing (the GPU machine may have no network: say it first).
INSTALL_HINTS = {
    "open_clip_train.main": "pip install -e '.[bench]' (OpenCLIP's trainer needs pandas and webdataset)",
    "pytest": "pip install -e '.[test]'",
    "nccl": "a CUDA build of torch (NCCL ships with it)",
}


def peak_bf16_tflops(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOP/s) of a GPU as torch.cuda.get_device_name names it; None if unknown."""
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return label, tflops
    return None


def mfu(
    samples_per_s: float, batch_size: int, macs_per_step: float, peak_tflops: float | None
) -> float | None:
    """Model FLOPs utilization: 2 x the engine's training MACs per step, per second, over the peak."""
    if not peak_tflops or not math.isfinite(samples_per_s):
        return None
    return samples_per_s / batch_size * 2 * macs_per_step / (peak_tflops * 1e12)


@dataclass(frozen=True)
class Command:
    """One process a stage launches."""

    argv: list[str]
    cwd: Path = REPO
    kind: str = "python"  # compt | torchrun | open_clip | pytest | bench_data: how the dry run checks it


@dataclass(frozen=True)
class Stage:
    """One entry of the check: commands run in order under one budget, read into a result."""

    name: str
    what: str  # one line for the log and the JSON
    budget_s: float  # wall seconds for all its commands; the process group is killed beyond it
    commands: Callable[[Any], list[Command]]  # Plan -> the commands
    read: Callable[[Any], dict[str, Any]]  # Plan -> result (raises when the output says it failed)
    needs: tuple[str, ...] = ()  # modules to import first ("nccl": torch's NCCL backend)
    default: bool = True  # False: run only when named in --only


@dataclass
class StageRecord:
    """A stage's entry in the JSON."""

    what: str
    budget_s: float
    status: str = "pending"  # planned | invalid | skipped | ok | failed | timed_out
    wall_s: float | None = None
    commands: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def missing(needs: tuple[str, ...], cuda: bool) -> list[str]:
    """Why each of ``needs`` cannot be used here ([] when all can), with what to install.

    Modules are imported for real (``open_clip_train.main`` imports pandas and webdataset itself), so
    a package missing deep inside is found here, before any stage runs, not halfway through.
    """
    problems = []
    for name in needs:
        if name == "nccl":  # only a CUDA machine can tell; the dry run checks the command instead
            import torch.distributed as torch_dist

            if cuda and not (torch_dist.is_available() and torch_dist.is_nccl_available()):
                problems.append(f"nccl: no NCCL backend with CUDA here; install {INSTALL_HINTS['nccl']}")
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # an import error deep inside (a missing pandas) says more than "no"
            hint = INSTALL_HINTS.get(name, f"pip install {name.split('.')[0]}")
            problems.append(f"{name}: {type(e).__name__}: {e}; install with {hint}")
    return problems


def run_stage(commands: list[Command], budget_s: float, log: IO[bytes]) -> tuple[str, float, str | None]:
    """Run ``commands`` in order within ``budget_s``; (status, wall_s, error). Output goes to ``log``."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for cmd in commands:
        left = budget_s - (time.perf_counter() - start)
        log.write(f"\n$ (cd {cmd.cwd}) {shlex.join(cmd.argv)}\n".encode())
        log.flush()
        # A session of its own: torchrun's ranks and DataLoader workers die with it on a timeout.
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timed_out", time.perf_counter() - start, f"over its {budget_s:.0f} s budget: killed"
        if code != 0:
            return "failed", time.perf_counter() - start, f"exit {code}: {cmd.argv[2:5]} (see the log)"
    return "ok", time.perf_counter() - start, None


# --- dry run: each rendered command against the parser of the program it launches -----------------


def _after(argv: list[str], marker: str) -> list[str]:
    return argv[argv.index(marker) + 1 :]


def check_compt(args: list[str]) -> dict[str, Any]:
    """``compt train ARGS``: parsed by compt's CLI, its TrainConfig validated, the member built on meta."""
    from compt.cli import build_parser
    from compt.cli.train import build_config
    from compt.cost import count_params
    from compt.families import get_member

    ns = _parse(build_parser(), args, "compt")
    cfg = build_config(ns)
    member = get_member(cfg.member, cfg.family)
    member.create("meta")
    return {"member": cfg.member, "params": count_params(member)["total"], "precision": cfg.precision}


def check_torchrun(args: list[str]) -> dict[str, Any]:
    """``torchrun ARGS -m compt train ...``: torchrun's own parser, then the compt command it runs."""
    from torch.distributed.run import get_args_parser

    ns = _parse(get_args_parser(), args, "torchrun")
    if not (ns.module and ns.training_script == "compt"):
        raise ValueError(f"torchrun should launch '-m compt', not {ns.training_script!r}")
    return {"nproc_per_node": ns.nproc_per_node, **check_compt(ns.training_script_args)}


def check_open_clip(args: list[str]) -> dict[str, Any]:
    """``open_clip_train.main ARGS``: OpenCLIP's own parser; the model folder and table exist."""
    from open_clip_train.params import parse_args

    ns = parse_args(args)
    model_dir = Path(ns.model.removeprefix("local-dir:"))
    if not (model_dir / "open_clip_config.json").is_file() or not Path(ns.train_data).is_file():
        raise ValueError(f"open_clip_train would miss {model_dir}/open_clip_config.json or {ns.train_data}")
    return {"model": ns.model, "precision": ns.precision, "batch_size": ns.batch_size}


def check_pytest(args: list[str]) -> dict[str, Any]:
    """``pytest -m gpu ...``: the marker is declared in pyproject.toml and the test folder exists."""
    import tomllib

    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    mark = args[args.index("-m") + 1]
    if not any(m.split(":")[0].strip() == mark for m in markers) or not (REPO / "tests").is_dir():
        raise ValueError(f"pytest -m {mark}: no such marker in pyproject.toml, or no tests/ folder")
    return {"marker": mark}


def check_bench_data(args: list[str]) -> dict[str, Any]:
    """``bench_data.py ARGS``: its own parser; the table exists."""
    import bench_data

    ns = _parse(bench_data.parser(), args, "bench_data.py")
    if ns.table and not Path(ns.table).is_file():
        raise ValueError(f"bench_data.py --table {ns.table}: no such file")
    return {"workers": ns.workers, "samples": ns.samples}


def check_command(cmd: Command) -> dict[str, Any]:
    """Check one rendered command without running it; raises ValueError saying what is wrong."""
    argv = cmd.argv
    if cmd.kind == "compt":
        return check_compt(_after(argv, "compt"))
    if cmd.kind == "torchrun":
        return check_torchrun(_after(argv, "torch.distributed.run"))
    if cmd.kind == "open_clip":
        return check_open_clip(_after(argv, "open_clip_train.main"))
    if cmd.kind == "pytest":
        return check_pytest(_after(argv, "pytest"))
    if cmd.kind == "bench_data":
        return check_bench_data(argv[2:])
    raise ValueError(f"no check for a {cmd.kind!r} command")


def _parse(parser, args: list[str], program: str):
    try:
        return parser.parse_args(args)
    except SystemExit:  # argparse has printed why to stderr
        raise ValueError(f"{program} rejects the arguments {args}") from None


def check_stage(stage: Stage, plan: Any) -> tuple[list[Command], list[dict[str, Any]]]:
    """The stage's commands and what checking each found (raises on the first bad one)."""
    commands = stage.commands(plan)
    return commands, [check_command(c) for c in commands]
