"""What one evaluation costs, per kind of set: is the validation loss the cheap periodic default? (issue 12)

Times, for each member of a chain spec (randomly initialized: the cost does not depend on the
weights), one evaluation on the spec's embedded sets, split by what ``eval.periodic`` can ask for:
the zero-shot tasks, the retrieval set, the validation set, and all of them (the final evaluation).
Set building (rendering the scenes, once per process) is left out, as in a run. Run::

    python benchmarks/bench_eval.py                                   # configs/demo.yaml's members
    python benchmarks/bench_eval.py --spec configs/demo.yaml --members tiny-XS,tiny-M --repeats 3
    python benchmarks/bench_eval.py --json                            # machine-readable

Prints per member the seconds of each part (the median over ``--repeats``) and the share of the
full evaluation that a periodic ``[val_loss]`` evaluation costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from compt.chain import load_spec
from compt.families import get_member

PARTS = {  # what an eval.periodic of these keys evaluates (None: everything)
    "zero-shot": ["mean_zeroshot_top1"],
    "retrieval": ["mean_retrieval_r1"],
    "validation": ["val_loss"],
    "full": None,
}


def time_member(spec, name: str, repeats: int) -> dict[str, float]:
    """Median seconds of one evaluation of each part for member ``name``."""
    member = get_member(name)
    model = member.paradigm.build(member.model_config()).eval()
    out = {}
    for part, keys in PARTS.items():
        options = dict(spec.eval.options) | ({"metrics": keys} if keys is not None else {})
        evaluate = member.paradigm.evaluator(member, data_cfg=spec.data, seed=spec.eval.seed, **options)
        evaluate(model, 0)  # builds the sets (cached per process) and the tokenizer
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                evaluate(model, 0)
            times.append(time.perf_counter() - start)
        out[part] = statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="configs/demo.yaml", help="chain spec: data, eval sets, members")
    p.add_argument("--members", help="comma-separated members (default: the spec's)")
    p.add_argument("--repeats", type=int, default=1, help="timed evaluations per part (median)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args()
    spec = load_spec(args.spec, ["out_dir=/tmp/compt-bench-eval"])
    names = args.members.split(",") if args.members else [m.name for m in spec.resolved_members()]
    results = {n: time_member(spec, n, args.repeats) for n in names}
    if args.json:
        print(json.dumps({"torch_threads": torch.get_num_threads(), "members": results}, indent=1))
        return
    print(f"{'member':10} " + " ".join(f"{p:>11}" for p in PARTS) + "  validation/full")
    for n, r in results.items():
        print(f"{n:10} " + " ".join(f"{r[p]:10.2f}s" for p in PARTS) + f"  {r['validation'] / r['full']:.0%}")


if __name__ == "__main__":
    main()
