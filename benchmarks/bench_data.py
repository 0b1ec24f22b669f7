"""Data-loading throughput of the embedded set (or a table): images + tokenized captions per second.

The issue's bar: 10k training samples (32 px images, M=4 tokenized captions each) in under 10 s on
2 CPU cores. Run::

    python benchmarks/bench_data.py                      # 10k samples, in-process
    python benchmarks/bench_data.py --workers 2          # two DataLoader worker processes
    python benchmarks/bench_data.py --image-size 64 --samples 20000
    python benchmarks/bench_data.py --table data/train.tsv --image-size 224 --context-length 77 \\
        --captions 1 --workers 12 --device cuda          # the loader alone, as it feeds a GPU

The tokenizer (open_clip's BPE vocabulary) is built before the clock starts, as in a real run where
it is built once per process; everything else -- scene sampling, rendering (or image decoding),
caption pools, caption draws, tokenization, collation -- is timed. ``--device cuda`` also pins the
batches (with workers, as the trainer does) and copies them to the GPU. Besides the total rate, the
steady rate leaves out the first round of batches (one per worker, all started at once: start-up),
to compare with a trainer's steady step; ask for several rounds (``--samples``) to get one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compt.engine.loader import pin_batches
from compt.paradigms.clip.data import DataConfig, build_loader, tokenizer


def parser() -> argparse.ArgumentParser:
    """The command line (benchmarks/gpu_check.py checks the commands it renders against it)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000, help="training samples to produce")
    p.add_argument("--image-size", type=int, default=32, help="pixels (tiny family: 32, debug: 16)")
    p.add_argument("--context-length", type=int, default=32, help="tokens per caption")
    p.add_argument("--captions", type=int, default=4, help="captions per image (M)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of this process")
    p.add_argument("--table", help="an OpenCLIP-style .tsv/.csv table instead of the embedded set")
    p.add_argument("--device", default="cpu", help="cpu | cuda: pin and copy each batch to the GPU")
    p.add_argument("--json", help="also write the result to this JSON file")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    tokenizer(args.context_length)  # build the BPE vocabulary once, outside the timing
    common = dict(workers=args.workers, num_captions=args.captions)
    if args.table:
        kind = Path(args.table).suffix.lstrip(".").lower()
        cfg = DataConfig(kind=kind, path=args.table, csv_separator="\t" if kind == "tsv" else ",", **common)
    else:
        cfg = DataConfig(num_samples=args.samples + args.batch_size, **common)
    start = time.perf_counter()
    loader = build_loader(
        cfg,
        image_size=args.image_size,
        context_length=args.context_length,
        global_batch_size=args.batch_size,
        pin_memory=pin_batches(device, args.workers),
    )
    n = batches = first = 0
    first_s = 0.0
    while n < args.samples:  # a table shorter than --samples is read again, epoch after epoch
        for images, texts in loader:
            images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
            n, batches = n + len(images), batches + 1
            if batches == max(1, args.workers):  # the end of the first round
                first, first_s = n, time.perf_counter() - start
            if n >= args.samples:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    steady = (n - first) / (elapsed - first_s) if n > first else float("nan")
    print(
        f"{n} samples ({args.image_size}px, {cfg.num_captions} captions x {args.context_length} tokens, "
        f"workers={args.workers}) in {elapsed:.2f} s: {n / elapsed:,.0f} samples/s "
        f"({steady:,.0f} samples/s after the first round of batches)"
    )
    if args.json:
        result = {
            "samples": n,
            "wall_s": elapsed,
            "samples_per_s": n / elapsed,
            "steady_samples_per_s": steady,
        }
        Path(args.json).write_text(json.dumps(result | {"workers": args.workers, "device": str(device)}))


if __name__ == "__main__":
    main()
