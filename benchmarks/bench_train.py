"""Training-engine speed: compt vs OpenCLIP's own trainer, and the cost of a chain link's distillation.

    python benchmarks/bench_train.py                       # CPU or the first GPU, ~2-3 min on 2 CPU cores
    python benchmarks/bench_train.py --member tiny-M --batch-size 128 --steps 60 --device cuda

Two comparisons, each training run in its own process, on the same machine:

1. ``compt train`` vs ``python -m open_clip_train.main``: the same member (written as an open_clip
   ``local-dir:`` model config), the same TSV table of rendered PNG images with one caption each
   (OpenCLIP trains on one caption per image, so compt runs with ``data.num_captions=1``), the same
   batch size, workers, precision and learning rate. Printed: steady-state samples/s of both
   (median over log windows, the first one dropped) and compt / OpenCLIP.
2. A chain-link step vs an individual step of the same student (compt only, the paper's M=4
   captions): measured slowdown next to the MAC bound ``1 + teacher forward / student training``
   per sample (App. C.2) -- a link runs its teacher forward on every sample.

On a shared machine a neighbour's job can slow one run down several times; every side of a
comparison runs ``--repeats`` times, alternating, and the best steady rate of each side is compared.

OpenCLIP's trainer needs ``pandas`` and ``webdataset`` 0.2.86 to import; when it cannot run here,
the reason is printed and compt's own numbers still are.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from compt.cost import member_cost
from compt.families import get_member
from compt.paradigms.clip.data import SyntheticSpec
from compt.paradigms.clip.data.synthetic import describe, render, sample_scene
from compt.paradigms.clip.export import default_preprocess_cfg


def write_table(folder: Path, num_samples: int, image_size: int, seed: int = 0) -> Path:
    """``num_samples`` rendered scenes as PNG files plus an OpenCLIP-style TSV (filepath, title)."""
    spec, rng = SyntheticSpec(), np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["filepath\ttitle"]
    for i in range(num_samples):
        scene = sample_scene(rng, spec)
        pixels = (render(scene, image_size, rng, spec) * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i:06d}.png")
        rows.append(f"images/{i:06d}.png\t{describe(scene, rng, 0)[0]}")
    table = folder / "train.tsv"
    table.write_text("\n".join(rows) + "\n")
    return table


def _run(cmd: list[str], cwd: Path, timeout_s: float) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, f"timed out after {timeout_s:.0f} s"
    return proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr


def steady(rates: list[float]) -> float:
    """Median samples/s over log windows, the first (start-up, tokenizer load, first batches) dropped."""
    rates = rates[1:] if len(rates) > 2 else rates
    return statistics.median(rates) if rates else float("nan")


def compt_command(
    member: str,
    data: list[str],
    out: Path,
    *,
    steps: int,
    batch_size: int,
    log_every: int,
    device: str,
    workers: int,
    extra: list[str] = (),
) -> list[str]:
    """``compt train`` of ``member`` on ``data`` (its --data/--set arguments), no checkpoints but final.pt."""
    return [
        sys.executable,
        "-m",
        "compt",
        "train",
        "--member",
        member,
        *data,
        "--steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--lr",
        "1e-3",
        "--warmup-steps",
        "10",
        "--log-every",
        str(log_every),
        "--save-every",
        "0",
        "--device",
        device,
        "--out",
        str(out),
        "--set",
        f"data.workers={workers}",
        *extra,
    ]


def compt_rates(out: Path) -> list[float]:
    """samples/s of every ``train`` record of a compt run's metrics.jsonl (one per log window)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["samples_per_s"] for r in records if r.get("kind") == "train"]


def compt_run(args, out: Path, data: list[str], extra: list[str] = ()) -> dict:
    cmd = compt_command(
        args.member,
        data,
        out,
        steps=args.steps,
        batch_size=args.batch_size,
        log_every=args.log_every,
        device=args.device,
        workers=args.workers,
        extra=extra,
    )
    code, wall, log = _run(cmd, out.parent, args.timeout)
    if code != 0:
        raise SystemExit(f"compt train failed ({code}):\n{log[-3000:]}")
    return {"samples_per_s": steady(compt_rates(out)), "process_s": wall}


def write_open_clip_model(folder: Path, member_name: str) -> Path:
    """``member_name`` as an open_clip ``local-dir:`` model folder (its config only, no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    member = get_member(member_name)
    config = {
        "model_cfg": member.open_clip_config(),
        "preprocess_cfg": default_preprocess_cfg(member.image_size),
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def open_clip_command(
    model_dir: Path,
    table: Path,
    logs: Path,
    *,
    steps: int,
    batch_size: int,
    log_every: int,
    device: str,
    workers: int,
    compile: bool = False,
) -> list[str]:
    """``python -m open_clip_train.main`` on the same member (``model_dir``), table, batch and steps."""
    cuda = device.startswith("cuda")
    steps_per_epoch = max(1, (sum(1 for _ in open(table)) - 1) // batch_size)
    epochs = max(1, -(-steps // steps_per_epoch))
    # OpenCLIP's default trainer, as its users run it; --torchcompile only when asked.
    return [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--model",
        f"local-dir:{model_dir}",
        "--train-data",
        str(table),
        "--dataset-type",
        "csv",
        "--csv-separator",
        "\t",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(epochs),
        "--lr",
        "1e-3",
        "--wd",
        "0.1",
        "--warmup",
        "10",
        "--workers",
        str(workers),
        "--precision",
        "amp_bf16" if cuda else "fp32",
        "--device",
        "cuda" if cuda else "cpu",
        "--logs",
        str(logs),
        "--name",
        "bench",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--log-every-n-steps",
        str(log_every),
        "--report-to",
        "",
        "--seed",
        "0",
        *(["--torchcompile"] if compile else []),
    ]


def open_clip_rates(text: str, batch_size: int) -> list[float]:
    """samples/s per log window of an OpenCLIP training log (``batch_size`` per step, one process).

    OpenCLIP logs ``Batch (t): AVG, RATE/s`` where AVG is the window's mean step time and RATE is
    the batch over the *last* step's time alone. On a GPU that last step is only the launch of
    its kernels (the log's .item() waits for them after the timer stopped), so RATE overstates the
    speed; the window mean, which includes that wait in the next window, is read instead.
    """
    return [batch_size / float(avg) for avg in re.findall(r"Batch \(t\): ([\d.]+),", text) if float(avg) > 0]


def open_clip_error(code: int, log: str) -> str:
    """The line that says why OpenCLIP's trainer failed (its exception line, not torch's chatter)."""
    lines = [line for line in log.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^\w*(Error|Exception)\b", line)]
    return f"exit {code}: {(errors or lines or ['(no output)'])[-1]}"


def open_clip_run(args, work: Path, table: Path) -> dict:
    """OpenCLIP's trainer on the same member/table/batch; {'error': why} when it cannot run."""
    logs = work / "open_clip_logs"
    shutil.rmtree(logs, ignore_errors=True)
    cmd = open_clip_command(
        write_open_clip_model(work / "open_clip_model", args.member),
        table,
        logs,
        steps=args.steps,
        batch_size=args.batch_size,
        log_every=args.log_every,
        device=args.device,
        workers=args.workers,
    )
    # OpenCLIP resolves the table's relative image paths against its working directory.
    code, wall, log = _run(cmd, table.parent, args.timeout)
    if code != 0:
        return {"error": open_clip_error(code, log)}
    text = (logs / "bench" / "out.log").read_text() if (logs / "bench" / "out.log").is_file() else log
    rates = open_clip_rates(text, args.batch_size)
    if not rates:
        return {"error": "ran, but its log holds no 'Batch (t): ...' line to read the speed from"}
    return {"samples_per_s": steady(rates), "process_s": wall}


def _best(sides: list, repeats: int) -> list[dict]:
    """Run each side ``repeats`` times, alternating; keep each side's fastest run (or its error)."""
    best: list[dict | None] = [None] * len(sides)
    for i in range(repeats):
        for k, run in enumerate(sides):
            if best[k] is not None and "error" in best[k]:
                continue  # a side that cannot run will not run the second time either
            res = run(i)
            if best[k] is None or res.get("samples_per_s", 0) > best[k].get("samples_per_s", 0):
                best[k] = res
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--member", default="tiny-S", help="member trained in comparison 1 (default tiny-S)")
    p.add_argument(
        "--teacher", default="tiny-XS", help="teacher of the link in comparison 2 (default tiny-XS)"
    )
    p.add_argument("--student", default="tiny-S", help="student of the link in comparison 2 (default tiny-S)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--workers", type=int, default=1, help="data-loading workers, both trainers (default 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; best kept (default 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per training process")
    p.add_argument("--work-dir", help="keep the data and runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="compt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    member = get_member(args.member)
    num_samples = args.batch_size * max(4, min(args.steps, 16))
    print(
        f"device {args.device}, member {args.member}, batch {args.batch_size}, {args.steps} steps per run, "
        f"{args.workers} worker(s); data: {num_samples} rendered {member.image_size}px PNGs in {work}"
    )
    table = write_table(work / "data", num_samples, member.image_size)

    # 1. compt vs OpenCLIP's trainer, one caption per image.
    for stale in [*work.glob("compt_run*"), *work.glob("baseline*"), *work.glob("link*"), work / "teacher"]:
        shutil.rmtree(stale, ignore_errors=True)
    compt_data = ["--data", str(table), "--set", "data.num_captions=1"]
    sides = [
        lambda i: compt_run(args, work / f"compt_run{i}", compt_data),
        lambda i: open_clip_run(args, work, table),
    ]
    compt, oc = _best(sides, args.repeats)
    print("\n1. compt train vs open_clip_train.main (same member, data, batch; 1 caption per image)")
    print(f"   compt train        {compt['samples_per_s']:10.1f} samples/s")
    if "error" in oc:
        print(f"   open_clip_train    did not run: {oc['error']}")
        print(
            "   ratio compt/OpenCLIP: n/a (install pandas and webdataset==0.2.86 to run OpenCLIP's trainer)"
        )
    else:
        print(f"   open_clip_train    {oc['samples_per_s']:10.1f} samples/s")
        print(f"   ratio compt/OpenCLIP: {compt['samples_per_s'] / oc['samples_per_s']:.2f}x")

    # 2. A chain link (teacher forward + IFD) vs individual training of the same student, M=4 captions.
    link_args = argparse.Namespace(**{**vars(args), "member": args.teacher, "steps": 4})
    compt_run(link_args, work / "teacher", ["--data", "synthetic", "--set", "data.num_samples=2048"])
    student_args = argparse.Namespace(**{**vars(args), "member": args.student})
    synthetic = ["--data", "synthetic", "--set", "data.num_samples=4096"]
    teacher = ["--teacher", str(work / "teacher" / "final.pt")]
    sides = [
        lambda i: compt_run(student_args, work / f"baseline{i}", synthetic),
        lambda i: compt_run(student_args, work / f"link{i}", [*synthetic, *teacher]),
    ]
    baseline, link = _best(sides, args.repeats)
    s, t = member_cost(args.student, 4), member_cost(args.teacher, 4)
    bound = 1 + t.forward_macs / s.train_macs
    measured = baseline["samples_per_s"] / link["samples_per_s"]
    print(f"\n2. chain-link step vs individual step ({args.teacher} -> {args.student}, M=4 captions)")
    print(f"   individual {args.student}   {baseline['samples_per_s']:10.1f} samples/s")
    print(f"   link {args.teacher}->{args.student}  {link['samples_per_s']:10.1f} samples/s")
    print(
        f"   distillation overhead: {measured:.2f}x measured vs {bound:.2f}x MAC bound "
        f"(1 + teacher forward {t.forward_macs / 1e6:.2f} MMACs"
        f" / student training {s.train_macs / 1e6:.2f} MMACs)"
    )
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
