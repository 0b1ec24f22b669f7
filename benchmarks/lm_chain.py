"""Does the chain pay for LMs? llama-cpu-S -> M -> L on the embedded corpus (issue 14, docs/lm.md).

Run from the repository root::

    python benchmarks/lm_chain.py --runs runs/lm-bench --workers 2     # train (resumable), then report
    python benchmarks/lm_chain.py --runs runs/lm-bench --report-only   # tables from finished runs

For each seed (model init and data order): the three members trained individually for
``--baseline-steps``; then four chains from the same first member (its baseline twin), each link
training its own cosine schedule of ``--link-fractions`` x the baseline steps:

- ``feature``: grown by insert width / duplicate depth, feature distillation (final hidden state), the
  paper's recipe carried over (the headline);
- ``logit``: the same growth, logit distillation (KL on the shared vocabulary) instead;
- ``net2net``: feature distillation, grown by function-preserving Net2Net width;
- ``none``: feature distillation, no growth at all (width and depth ``none``: "IFD only").

Every setting was fixed before the first run (nothing was tuned on these numbers): batch 16 x 128
tokens, AdamW lr 3e-3 (betas 0.9/0.95, decay 0.1), grad clip 1, cosine to 0, warmup 20 steps
(10 for a link), alpha "auto" at r = 0.1 (App. D.2). The validation split serves as the test split:
there is no selection on it. A finished run is skipped, an interrupted one resumes; ``--workers N``
processes claim runs from one queue (a link waits for its teacher). Results: ``<out>/results.json``
(every run) and ``<out>/README.md`` (tables); the last line printed is the headline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MEMBERS = ("llama-cpu-S", "llama-cpu-M", "llama-cpu-L")
VARIANTS = {  # name -> (distill target, width strategy, depth strategy)
    "feature": ("feature", "insert", "duplicate"),
    "logit": ("logit", "insert", "duplicate"),
    "net2net": ("feature", "net2net", "duplicate"),
    "none": ("feature", "none", "none"),
}
TRAIN = dict(global_batch_size=16, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0)
TRAIN |= dict(log_every_steps=10, save_every_steps=50, eval_every_steps=50, device="cpu")


@dataclass(frozen=True)
class Job:
    member: str
    seed: int
    variant: str  # "baseline" or a key of VARIANTS

    @property
    def name(self) -> str:
        return f"seed{self.seed}/{self.variant}/{self.member}"

    def teacher(self) -> Job | None:
        i = MEMBERS.index(self.member)
        if self.variant == "baseline" or i == 0:
            return None
        prev = MEMBERS[i - 1]
        return Job(prev, self.seed, "baseline" if i == 1 else self.variant)


def jobs(seeds: list[int]) -> list[Job]:
    """Baselines first (every link needs the first member's), then the chains, seed by seed."""
    out = [Job(m, s, "baseline") for s in seeds for m in MEMBERS]
    out += [Job(m, s, v) for s in seeds for v in VARIANTS for m in MEMBERS[1:]]
    return out


def _config(job: Job, args, runs: Path):
    from compt.engine.train import TrainConfig

    steps = args.baseline_steps
    data = {"source": "stdlib", "seq_len": 128, "seed": job.seed, "eval_windows": 128}
    fields = dict(TRAIN, member=job.member, seed=job.seed, out_dir=str(runs / job.name))
    fields |= dict(data=data | {"cache_dir": str(runs / "data")}, steps=steps, warmup_steps=20)
    if job.variant != "baseline" and job.member != MEMBERS[0]:
        target, width, depth = VARIANTS[job.variant]
        frac = args.link_fractions[MEMBERS.index(job.member) - 1]
        teacher = runs / job.teacher().name / "final.pt"
        fields |= dict(steps=max(1, round(frac * steps)), warmup_steps=10, teacher=str(teacher))
        fields |= dict(distill=target, width=width, depth=depth, alpha="auto")
    return TrainConfig(**fields)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _claim(path: Path) -> bool:
    """Take the run at ``path`` for this process (a claim of a dead process is taken over)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = path / "claim"
    path.mkdir(exist_ok=True)
    if claim.exists():
        try:
            owner = int(claim.read_text() or 0)
        except ValueError:
            owner = 0
        if owner and owner != os.getpid() and _alive(owner):
            return False
        claim.unlink(missing_ok=True)
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def work(args, runs: Path) -> None:
    """Claim and train runs until every one is finished."""
    import torch

    from compt.engine.train import train_member
    from compt.families import get_member

    torch.set_num_threads(1)  # one thread per worker: 2 threads lose to contention (bench_lm.py)
    todo = jobs(args.seeds)
    while True:
        pending = [j for j in todo if not (runs / j.name / "final.pt").is_file()]
        if not pending:
            return
        ready = [
            j for j in pending if j.teacher() is None or (runs / j.teacher().name / "final.pt").is_file()
        ]
        job = next((j for j in ready if _claim(runs / j.name)), None)
        if job is None:
            time.sleep(5)  # every runnable run is taken: wait for a teacher
            continue
        cfg = _config(job, args, runs)
        member = get_member(job.member)
        evaluate = member.paradigm.evaluator(member, data_cfg=cfg.data)
        cpu = time.process_time()
        result = train_member(cfg, evaluate=evaluate)
        stats = runs / job.name / "cpu_s.json"
        if not stats.exists():  # a resumed run counts only its last process's CPU time
            stats.write_text(json.dumps({"cpu_s": time.process_time() - cpu}))
        print(f"{job.name}: {result.steps} steps, val_loss {result.metrics.get('val_loss'):.4f}", flush=True)
        (runs / job.name / "claim").unlink(missing_ok=True)


# --- results -------------------------------------------------------------------------------------


def collect(args, runs: Path) -> dict[str, dict]:
    from compt.engine.checkpoint import load_checkpoint
    from compt.engine.runlog import read_metrics

    out = {}
    for job in jobs(args.seeds):
        folder = runs / job.name
        if not (folder / "final.pt").is_file():
            continue
        p = load_checkpoint(folder / "final.pt")
        curve = [(r["step"], r["val_loss"]) for r in read_metrics(folder / "metrics.jsonl", "eval")]
        cpu = (
            json.loads((folder / "cpu_s.json").read_text())["cpu_s"]
            if (folder / "cpu_s.json").exists()
            else None
        )
        out[job.name] = dict(member=job.member, seed=job.seed, variant=job.variant, steps=p["steps"],
                             train_macs=p["train_macs"], wall_s=p["wall_s"], cpu_s=cpu,
                             **p["metrics"], curve=curve)  # fmt: skip
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan)


def tables(args, res: dict[str, dict]) -> tuple[str, str]:
    """README.md and the headline line."""
    seeds = args.seeds

    def runs_of(member: str, variant: str) -> list[dict]:
        v = "baseline" if member == MEMBERS[0] else variant
        return [res[n] for s in seeds if (n := f"seed{s}/{v}/{member}") in res]

    lines = [
        "# LM chain on the embedded corpus: results (benchmarks/lm_chain.py)",
        "",
        f"Seeds {seeds}; baseline {args.baseline_steps} steps of 16 x 128 tokens; links "
        f"{args.link_fractions} of that. Validation loss in nats/token (mean ± std over seeds).",
        "Lossless: the chain's mean validation loss at most 2 std (of the baseline over seeds) above the "
        "baseline's mean.",
        "",
        "| variant | member | val_loss | baseline | Δ | tol (2σ) | lossless | MACs acc. indiv. "
        "| MACs acc. accum. | wall acc. indiv. | wall acc. accum. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    headline = ""
    for variant in VARIANTS:
        acc = {"base_macs": 0.0, "chain_macs": 0.0, "base_wall": 0.0, "chain_wall": 0.0}
        all_ok = True
        for member in MEMBERS:
            chain, base = runs_of(member, variant), runs_of(member, "baseline")
            if len(chain) < len(seeds) or len(base) < len(seeds):
                all_ok = False
                continue
            cm, cs = _mean_std([r["val_loss"] for r in chain])
            bm, bs = _mean_std([r["val_loss"] for r in base])
            tol = 2 * bs
            ok = cm - bm <= tol
            all_ok &= ok
            macs = (
                sum(r["train_macs"] for r in base) / len(base),
                sum(r["train_macs"] for r in chain) / len(chain),
            )
            wall = (sum(r["wall_s"] for r in base) / len(base), sum(r["wall_s"] for r in chain) / len(chain))
            acc["base_macs"] += macs[0]
            acc["chain_macs"] += macs[1]
            acc["base_wall"] += wall[0]
            acc["chain_wall"] += wall[1]
            ratios = [macs[0] / macs[1], acc["base_macs"] / acc["chain_macs"]]
            ratios += [wall[0] / wall[1], acc["base_wall"] / acc["chain_wall"]]
            cells = [variant, member, f"{cm:.4f} ± {cs:.4f}", f"{bm:.4f} ± {bs:.4f}", f"{cm - bm:+.4f}"]
            cells += [f"{tol:.4f}", "yes" if ok else "no", *(f"{r:.2f}x" for r in ratios)]
            lines.append("| " + " | ".join(cells) + " |")
        if variant == "feature" and acc["chain_macs"]:
            headline = (
                f"lm-chain: accumulated MAC acceleration={acc['base_macs'] / acc['chain_macs']:.2f}x "
                f"wall={acc['base_wall'] / acc['chain_wall']:.2f}x lossless={'yes' if all_ok else 'no'}"
            )
    lines += ["", "Per run: `results.json` (steps, train_macs, wall_s, cpu_s, val_loss, val_bpb, curve)."]
    return "\n".join(lines) + "\n", headline


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/lm-bench", help="run folders (checkpoints; not committed)")
    p.add_argument("--out", default="benchmarks/results/lm", help="results.json and README.md")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baseline-steps", type=int, default=200)
    p.add_argument("--link-fractions", type=float, nargs=2, default=[0.5, 1 / 3], help="of M and of L")
    p.add_argument("--workers", type=int, default=1, help="processes claiming runs from the queue")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    if args.worker:
        work(args, runs)
        return 0
    if not args.report_only:
        from compt.paradigms.lm import LMDataConfig
        from compt.paradigms.lm.data import prepare_data

        prepare_data(LMDataConfig(), runs / "data")  # once, before the workers share it
        argv = ["--runs", str(runs), "--baseline-steps", str(args.baseline_steps), "--worker"]
        argv += ["--seeds", *map(str, args.seeds), "--link-fractions", *map(str, args.link_fractions)]
        procs = [subprocess.Popen([sys.executable, __file__, *argv]) for _ in range(args.workers)]
        if any(proc.wait() for proc in procs):
            print("a worker failed; rerun the same command to resume", file=sys.stderr)
            return 1
    res = collect(args, runs)
    readme, headline = tables(args, res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": res}, indent=1))
    (out / "README.md").write_text(readme)
    print(readme)
    print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
