"""GPU readiness in one call: the CUDA paths, throughput and MFU, OpenCLIP side by side (issue 17).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu          # one GPU, at most 8 minutes
    python benchmarks/gpu_check.py --out /tmp/gpu --only link,ddp        # rerun some stages
    python benchmarks/gpu_check.py --out /tmp/gpu --peak-tflops 165      # a GPU not in the peak table

Writes ``OUT/gpu_check.json`` (after every stage, so a killed run keeps what it had) and
``OUT/gpu_check.log`` (these lines and every command's full output). The stages, in order, each
under its own time budget (its processes are killed when it is spent; the budgets add up to 8 min):

1. ``gpu_tests``: ``pytest -m gpu`` -- bf16 autocast, fp16 + grad scaler with a forced overflow step,
   torch.compile of a student and of a link, TF32, pinned batches, no host sync per step;
2. ``loader``: the data loader alone (benchmarks/bench_data.py) on the table the trainers read;
3. ``train_eager`` / ``train_compile``: ViT-B/16 at 224 px, bf16, on the embedded data rendered to a
   PNG table, steady samples/s, peak memory and MFU (2 x compt.cost training MACs over the GPU's
   dense bf16 peak);
4. ``open_clip``: ``open_clip_train.main`` on the same model, table, batch, precision and steps;
5. ``link``: a ViT-S/16 -> ViT-B/16 chain-link step against the individual step, next to its MAC bound;
6. ``ddp`` / ``fsdp2``: torchrun smoke runs of two steps on min(2, GPUs) ranks (NCCL when there are 2),
   replicated and sharded (``--parallel fsdp2`` shards only across 2 or more ranks).

``open_clip_compile`` (OpenCLIP with ``--torchcompile``) runs only when named in ``--only``: it does
not fit the 8 minutes with the rest. Adding a stage is one more :class:`Stage` in ``STAGES``.
Without CUDA the script says so, renders every command and checks it against the parser of the
program it launches, builds every member on the meta device, writes the JSON with every stage
``planned`` and exits 0 (tests/test_gpu_check.py runs this in CI).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import (  # noqa: E402
    compt_command,
    compt_rates,
    open_clip_command,
    open_clip_rates,
    steady,
    write_open_clip_model,
    write_table,
)
from gpu_check_lib import (  # noqa: E402
    REPO,
    Command,
    Stage,
    StageRecord,
    check_stage,
    mfu,
    missing,
    peak_bf16_tflops,
    run_stage,
)

TOTAL_BUDGET_S = 480  # the 8 minutes, stages and preparation together
PREP_BUDGET_S = 20  # preflight imports and the PNG table, before the first stage
GOAL_VS_OPEN_CLIP = 1.3  # issue 17: compt with compile and fused AdamW vs OpenCLIP's trainer


@dataclass(frozen=True)
class Plan:
    """What every stage trains on: one member, one table, one batch, one step count."""

    work: Path  # data and runs (a temporary folder, removed at the end)
    device_count: int
    peak_tflops: float | None
    member: str = "ViT-B/16"  # the paper family's (Table G)
    teacher: str = "ViT-S/16"  # of the link stage
    batch_size: int = 256
    steps: int = 30
    log_every: int = 5  # 6 windows; the first (start-up, compilation) is dropped
    unique_images: int = 384  # rendered PNGs; the table repeats them to batch_size x steps rows
    workers: int = max(1, min(12, (os.cpu_count() or 2) - 2))  # both trainers and the loader

    @property
    def table(self) -> Path:
        return self.work / "data" / "train.tsv"

    def data_args(self) -> list[str]:
        # OpenCLIP trains on one caption per image, so every run here does (data.num_captions=1).
        return ["--data", str(self.table), "--set", "data.num_captions=1"]

    def train(self, name: str, member: str, extra: list[str] = (), steps: int | None = None) -> Command:
        argv = compt_command(
            member,
            self.data_args(),
            self.work / name,
            steps=steps or self.steps,
            batch_size=self.batch_size,
            log_every=1 if steps else self.log_every,
            device="cuda",
            workers=self.workers,
            extra=["--precision", "bf16", *extra],
        )
        return Command(argv, cwd=self.work, kind="compt")

    def open_clip(self, name: str, compile: bool) -> Command:
        argv = open_clip_command(
            write_open_clip_model(self.work / "open_clip_model", self.member),
            self.table,
            self.work / name,
            steps=self.steps,
            batch_size=self.batch_size,
            log_every=self.log_every,
            device="cuda",
            workers=self.workers,
            compile=compile,
        )
        return Command(argv, cwd=self.table.parent, kind="open_clip")  # it resolves image paths from its cwd


def write_data(plan: Plan, unique_images: int) -> None:
    """The embedded set as a PNG table (what OpenCLIP reads), rows repeated to one epoch of the run."""
    from compt.families import get_member

    table = write_table(plan.table.parent, unique_images, get_member(plan.member).image_size)
    header, *rows = table.read_text().splitlines()
    need = plan.batch_size * plan.steps
    table.write_text("\n".join([header, *(rows[i % len(rows)] for i in range(need))]) + "\n")


# --- readers: what each stage's commands wrote, as its JSON result --------------------------------


_MEMORY_KEYS = ("cuda_max_allocated_gib", "cuda_max_reserved_gib")  # CUDA only (compt.engine.runlog)


def read_train(plan: Plan, name: str) -> dict[str, Any]:
    """Steady samples/s, MFU and peak memory of a compt run from its metrics.jsonl."""
    from compt.engine.runlog import read_metrics

    records = read_metrics(plan.work / name / "metrics.jsonl")
    start = next(r for r in records if r["kind"] == "start")
    train = [r for r in records if r["kind"] == "train"]
    rate = steady(compt_rates(plan.work / name))
    batch = start["config"]["global_batch_size"]
    return {
        "steps_logged": train[-1]["step"] if train else 0,
        "samples_per_s": rate,
        "macs_per_step": start["macs_per_step"],  # the engine's own count (compt.cost, App. C.2)
        "mfu": mfu(rate, batch, start["macs_per_step"], plan.peak_tflops),
        "first_window_s": train[0]["wall_s"] if train else None,  # start-up (+ compilation)
        **{key: max((r[key] for r in train if key in r), default=None) for key in _MEMORY_KEYS},
        "losses": [r["loss"] for r in train],
        "precision": start["precision"],
        "world_size": start["world_size"],
    }


def read_open_clip(plan: Plan, name: str) -> dict[str, Any]:
    log = plan.work / name / "bench" / "out.log"
    rates = open_clip_rates(log.read_text(), plan.batch_size)
    return {"samples_per_s": steady(rates), "windows": len(rates)}


def read_tests(plan: Plan) -> dict[str, Any]:
    suite = ET.parse(plan.work / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed_tests": failed,
    }


def read_link(plan: Plan) -> dict[str, Any]:
    from compt.cost import member_cost

    student, teacher = member_cost(plan.member, 1), member_cost(plan.teacher, 1)
    bound = 1 + teacher.forward_macs / student.train_macs  # App. C.2: a link adds a teacher forward
    return {**read_train(plan, "link"), "mac_bound": bound}


def read_smoke(plan: Plan, parallel: str) -> dict[str, Any]:
    result = read_train(plan, parallel)
    if len(result["losses"]) != 2 or not all(x is not None for x in result["losses"]):
        raise ValueError(f"expected 2 finite logged losses, got {result['losses']}")
    # World size 1 is a plain process in compt (no process group, as OpenCLIP): NCCL needs 2 GPUs, and
    # FSDP2 shards only across 2 or more (on one GPU the fsdp2 run is the plain one).
    return {
        **result,
        "nccl": result["world_size"] > 1,
        "sharded": parallel == "fsdp2" and result["world_size"] > 1,
    }


def _smoke(plan: Plan, parallel: str) -> list[Command]:
    n = max(1, min(2, plan.device_count))
    run = f"--nproc_per_node {n} -m compt train --member debug-L --data synthetic --set data.num_samples=256"
    run += f" --steps 2 --batch-size {8 * n} --log-every 1 --save-every 0 --device cuda --parallel {parallel}"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *run.split()]
    return [Command([*argv, "--out", str(plan.work / parallel)], cwd=plan.work, kind="torchrun")]


def _tests(plan: Plan) -> list[Command]:
    # -v: the log names each test as it ends, so a stage killed at its budget still says how far it got.
    argv = [sys.executable, *"-m pytest -v -m gpu tests -p no:cacheprovider".split()]
    return [Command([*argv, f"--junitxml={plan.work / 'gpu_tests.xml'}"], cwd=REPO, kind="pytest")]


def _loader(plan: Plan) -> list[Command]:
    from compt.families import get_member

    m = get_member(plan.member)
    sizes = f"--image-size {m.image_size} --context-length {m.context_length} --captions 1"
    feed = f"--batch-size {plan.batch_size} --workers {plan.workers} --device cuda"
    # 4 rounds of one batch per worker: the first round (worker start-up) is left out of the steady rate.
    feed += f" --samples {plan.batch_size * plan.workers * 4}"
    argv = [sys.executable, str(REPO / "benchmarks" / "bench_data.py"), "--table", str(plan.table)]
    json_out = ["--json", str(plan.work / "loader.json")]
    return [Command([*argv, *sizes.split(), *feed.split(), *json_out], kind="bench_data")]


# In order: the cheap and telling first, the compilation (most likely to overrun) last.
STAGES = [
    Stage("gpu_tests", "pytest -m gpu: the CUDA-only assertions", 90, _tests, read_tests, ("pytest",)),
    Stage(
        "loader",
        "the data loader alone, pinned, to the GPU",
        25,
        _loader,
        lambda p: json.loads((p.work / "loader.json").read_text()),
    ),
    Stage(
        "train_eager",
        "ViT-B/16 224px bf16, eager",
        50,
        lambda p: [p.train("eager", p.member)],
        lambda p: read_train(p, "eager"),
    ),
    Stage(
        "open_clip",
        "open_clip_train.main, same model/data/batch/precision/steps",
        50,
        lambda p: [p.open_clip("open_clip_logs", compile=False)],
        lambda p: read_open_clip(p, "open_clip_logs"),
        ("open_clip_train.main",),
    ),
    Stage(
        "link",
        "ViT-S/16 -> ViT-B/16 link step (vs train_eager)",
        70,
        lambda p: [
            p.train("teacher", p.teacher, steps=1),
            p.train("link", p.member, ["--teacher", str(p.work / "teacher" / "final.pt")]),
        ],
        read_link,
    ),
    Stage(
        "ddp",
        "torchrun smoke run, 2 steps (NCCL on >= 2 GPUs)",
        25,
        lambda p: _smoke(p, "ddp"),
        lambda p: read_smoke(p, "ddp"),
        ("nccl",),
    ),
    Stage(
        "fsdp2",
        "torchrun smoke run with --parallel fsdp2, 2 steps (sharded on >= 2 GPUs)",
        25,
        lambda p: _smoke(p, "fsdp2"),
        lambda p: read_smoke(p, "fsdp2"),
        ("nccl",),
    ),
    Stage(
        "train_compile",
        "ViT-B/16 224px bf16, torch.compile",
        125,
        lambda p: [p.train("compile", p.member, ["--compile"])],
        lambda p: read_train(p, "compile"),
    ),
    Stage(
        "open_clip_compile",
        "open_clip_train.main --torchcompile",
        150,
        lambda p: [p.open_clip("open_clip_compile_logs", compile=True)],
        lambda p: read_open_clip(p, "open_clip_compile_logs"),
        ("open_clip_train.main",),
        default=False,
    ),
]


def summarize(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers (None where a stage did not run or had nothing to read)."""

    def get(stage: str, key: str):
        return stages.get(stage, {}).get("result", {}).get(key)

    def ratio(a, b):
        return a / b if a and b else None

    eager, compiled = get("train_eager", "samples_per_s"), get("train_compile", "samples_per_s")
    oc, oc_compile = get("open_clip", "samples_per_s"), get("open_clip_compile", "samples_per_s")
    loader, link = get("loader", "steady_samples_per_s"), get("link", "samples_per_s")
    fastest = max((x for x in (eager, compiled) if x), default=None)
    return {
        "samples_per_s": {
            "compt_eager": eager,
            "compt_compile": compiled,
            "open_clip": oc,
            "open_clip_compile": oc_compile,
            "link": link,
            "loader": loader,
        },
        "mfu": {
            k: get(s, "mfu")
            for k, s in [("compt_eager", "train_eager"), ("compt_compile", "train_compile"), ("link", "link")]
        },
        "cuda_max_allocated_gib": {
            "compt_eager": get("train_eager", "cuda_max_allocated_gib"),
            "compt_compile": get("train_compile", "cuda_max_allocated_gib"),
        },
        "compt_vs_open_clip": {
            "eager_vs_eager": ratio(eager, oc),
            "compile_vs_eager": ratio(compiled, oc),
            "compile_vs_compile": ratio(compiled, oc_compile),
            "goal": GOAL_VS_OPEN_CLIP,
        },
        "link_overhead": {"measured": ratio(eager, link), "mac_bound": get("link", "mac_bound")},
        "loader_keeps_up": (loader >= 1.1 * fastest) if loader and fastest else None,
        "gpu_tests": {k: get("gpu_tests", k) for k in ("passed", "failures", "errors", "skipped")},
        "ddp": {"world_size": get("ddp", "world_size"), "nccl": get("ddp", "nccl")},
        "fsdp2": {"world_size": get("fsdp2", "world_size"), "sharded": get("fsdp2", "sharded")},
    }


def host_info(cuda: bool, peak_override: float | None) -> dict[str, Any]:
    import open_clip
    import torch

    name = torch.cuda.get_device_name(0) if cuda else None
    known = peak_bf16_tflops(name) if name else None
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "open_clip": open_clip.__version__,
        "compt_commit": git.stdout.strip() or None,
        "device_name": name,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "cpu_count": os.cpu_count(),
        "peak_bf16_tflops": peak_override or (known[1] if known else None),
        "peak_source": "--peak-tflops" if peak_override else (f"table: {known[0]}" if known else None),
    }


def select(only: str | None) -> list[Stage]:
    """The stages to run: the default ones, or those named in ``--only`` (in STAGES order)."""
    if not only:
        return [s for s in STAGES if s.default]
    names, known = [n.strip() for n in only.split(",") if n.strip()], [s.name for s in STAGES]
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--only: no stage {n!r}{hint}; stages: {', '.join(known)}")
    return [s for s in STAGES if s.name in names]


def _finite(value: Any) -> Any:
    """NaN/inf (a run with no steady window) as null: strict JSON readers reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return [_finite(v) for v in value] if isinstance(value, list) else value


def _write_json(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(report), indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.log")
    p.add_argument("--only", help="comma-separated stages to run (default: all but open_clip_compile)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of a GPU missing from the table")
    args = p.parse_args(argv)
    from compt.engine.checkpoint import CheckpointError, check_writable

    out = Path(args.out)
    try:
        stages = select(args.only)
        check_writable(out, "--out")
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="compt-gpu-check-"))
    try:
        with open(out / "gpu_check.log", "wb") as log:
            return _check(stages, out, work, log, cuda, args.peak_tflops)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(stages: list[Stage], out: Path, work: Path, log, cuda: bool, peak: float | None) -> int:
    def say(text: str) -> None:
        print(text, flush=True)
        log.write((text + "\n").encode())
        log.flush()

    host = host_info(cuda, peak)
    plan = Plan(work=work, device_count=host["device_count"], peak_tflops=host["peak_bf16_tflops"])
    settings = {k: v for k, v in asdict(plan).items() if k != "work"}
    report = {
        "schema": 1,
        "mode": "device" if cuda else "dry_run",
        "host": host,
        "settings": settings,
        "missing": {},
        "stages": {},
        "summary": {},
    }
    if not cuda:
        say("gpu_check: no CUDA device here: dry run -- every stage is rendered and checked, nothing trains")
    elif host["peak_bf16_tflops"] is None:
        say(f"gpu_check: {host['device_name']} is not in the peak table: MFU is left out (--peak-tflops)")
    say(
        f"gpu_check: {host['device_name'] or 'CPU'}, torch {host['torch']}; stages: "
        + ", ".join(f"{s.name} ({s.budget_s:.0f} s)" for s in stages)
    )
    for stage in stages:  # before anything runs: what cannot run here, and what to install
        problems = missing(stage.needs, cuda)
        if problems:
            report["missing"][stage.name] = problems
            say(f"gpu_check: {stage.name} will be skipped: " + "; ".join(problems))
    write_data(plan, plan.unique_images if cuda else 4)
    for stage in stages:
        rec = StageRecord(stage.what, stage.budget_s)
        if stage.name in report["missing"]:
            rec.status, rec.error = "skipped", "; ".join(report["missing"][stage.name])
        elif not cuda:
            try:
                commands, checks = check_stage(stage, plan)
                rec.status, rec.result = "planned", {"checks": checks}
                rec.commands = [shlex.join(c.argv) for c in commands]
            except Exception as e:  # any bad command is this stage's finding, not the script's crash
                rec.status, rec.error = "invalid", f"{type(e).__name__}: {e}"
        else:
            say(f"[{stage.name}] {stage.what} (budget {stage.budget_s:.0f} s)")
            try:
                commands = stage.commands(plan)
                rec.commands = [shlex.join(c.argv) for c in commands]
                rec.status, rec.wall_s, rec.error = run_stage(commands, stage.budget_s, log)
                rec.result = stage.read(plan)  # what it wrote, also after a failure or a timeout
            except Exception as e:  # one stage's crash is its finding; the next stage still runs
                rec.error = rec.error or f"{type(e).__name__}: {e}"
                rec.status = "failed" if rec.status in ("ok", "pending") else rec.status
        report["stages"][stage.name] = asdict(rec)
        report["summary"] = summarize(report["stages"])
        _write_json(out / "gpu_check.json", report)
        say(
            f"[{stage.name}] {rec.status}"
            + (f" in {rec.wall_s:.0f} s" if rec.wall_s else "")
            + (f": {rec.error}" if rec.error else "")
        )
    say("gpu_check: summary " + json.dumps(_finite(report["summary"]), default=str))
    say(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.log'}")
    statuses = [r["status"] for r in report["stages"].values()]
    if not cuda:
        return 1 if "invalid" in statuses else 0
    return 0 if all(s == "ok" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
