"""Sizes for the LM demo: tokenizer training, corpus tokenization and one training step per CPU member.

Run::

    python benchmarks/bench_lm.py                       # stdlib corpus, BPE 4096, batch 16 x 128, 1 thread
    python benchmarks/bench_lm.py --threads 2 --batch-size 8
    python benchmarks/bench_lm.py --skip-data           # only the training steps

Times (wall, ``time.perf_counter``): reading the embedded corpus, training the 4,096-token byte-level
BPE on its training split, encoding both splits, and per member of ``cpu_family()`` the median of
``--steps`` AdamW steps (forward, backward, update) after two warm-up steps on random windows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from compt.paradigms.lm.data import LMDataConfig, is_validation, read_documents
from compt.paradigms.lm.loss import forward_lm
from compt.paradigms.lm.models import build_model, cpu_family, sample_macs
from compt.paradigms.lm.tokenizer import encode_documents, train_bpe


def _data(vocab_size: int) -> None:
    cfg = LMDataConfig(vocab_size=vocab_size)
    start = time.perf_counter()
    docs, _ = read_documents(cfg)
    read_s = time.perf_counter() - start
    train = [t for k, t in docs if not is_validation(k, cfg.val_fraction)]
    val = [t for k, t in docs if is_validation(k, cfg.val_fraction)]
    mb = sum(len(t.encode()) for t in train) / 1e6
    print(
        f"stdlib corpus: {len(train)} train / {len(val)} val documents, {mb:.2f} MB train; "
        f"read {read_s:.2f} s"
    )
    start = time.perf_counter()
    tok = train_bpe(train, vocab_size)
    print(f"train_bpe({vocab_size}): {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    n_train = len(encode_documents(tok, train))
    tokens = n_train + len(encode_documents(tok, val))
    print(
        f"encode both splits: {time.perf_counter() - start:.2f} s, {tokens} tokens, "
        f"{mb * 1e6 / n_train:.2f} bytes per token (train)"
    )


def _steps(batch_size: int, seq_len: int, steps: int) -> None:
    torch.manual_seed(0)
    for name, cfg in cpu_family(context_length=seq_len):
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, cfg["vocab_size"], (batch_size, seq_len + 1))
        times = []
        for _ in range(steps + 2):
            start = time.perf_counter()
            forward_lm(model, x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        macs = sample_macs(cfg, seq_len)["train_macs"] * batch_size
        med = statistics.median(times[2:])
        print(
            f"{name}: {macs / 1e9:.2f} GMAC/step, median step {med * 1e3:.0f} ms "
            f"(min {min(times[2:]) * 1e3:.0f}), {2 * macs / med / 1e9:.1f} GFLOP/s"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE tokens")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--steps", type=int, default=5, help="timed steps per member (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--skip-data", action="store_true", help="time only the training steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} batch={args.batch_size} x {args.seq_len} tokens")
    if not args.skip_data:
        _data(args.vocab_size)
    _steps(args.batch_size, args.seq_len, args.steps)


if __name__ == "__main__":
    main()
