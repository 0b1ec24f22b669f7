"""Data-loading throughput of the embedded set: images + tokenized captions per second.

The issue's bar: 10k training samples (32 px images, M=4 tokenized captions each) in under 10 s on
2 CPU cores. Run::

    python benchmarks/bench_data.py                      # 10k samples, in-process
    python benchmarks/bench_data.py --workers 2          # two DataLoader worker processes
    python benchmarks/bench_data.py --image-size 64 --samples 20000

The tokenizer (open_clip's BPE vocabulary) is built before the clock starts, as in a real run where
it is built once per process; everything else -- scene sampling, rendering, caption pools, caption
draws, tokenization, collation -- is timed.
"""

from __future__ import annotations

import argparse
import time

import torch

from compt.paradigms.clip.data import DataConfig, build_loader, tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000, help="training samples to produce")
    p.add_argument("--image-size", type=int, default=32, help="pixels (tiny family: 32, debug: 16)")
    p.add_argument("--context-length", type=int, default=32, help="tokens per caption")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of this process")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer(args.context_length)  # build the BPE vocabulary once, outside the timing
    cfg = DataConfig(num_samples=args.samples + args.batch_size, workers=args.workers)
    start = time.perf_counter()
    loader = build_loader(
        cfg, image_size=args.image_size, context_length=args.context_length, global_batch_size=args.batch_size
    )
    n = 0
    for images, _texts in loader:
        n += len(images)
        if n >= args.samples:
            break
    elapsed = time.perf_counter() - start
    print(
        f"{n} samples ({args.image_size}px, {cfg.num_captions} captions x {args.context_length} tokens, "
        f"workers={args.workers}) in {elapsed:.2f} s: {n / elapsed:,.0f} samples/s"
    )


if __name__ == "__main__":
    main()
