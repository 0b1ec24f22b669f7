"""Where a member's val_loss is above the oracle's, by kind of scene (issue 12; docs/reproduce.md).

Splits the test split's val_loss (2,048 scenes in fixed batches of 256, 4 fixed caption slots) into
each image's share: the mean of its row in both directions of Eq. 2-3, over the slots. Scenes are
one object (``single``), copies of one object (``multi``) or two different objects (``pair``). The
same split is made for the oracle and the blind oracles of ``benchmarks/bench_floor.py``. A kind's
*gap share* is its mean gap to the oracle times its share of the scenes: the shares sum to the
member's distance to the floor. From the repository root, with finished runs' weights::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench/headroom.py NAME=RUN/final.pt ...

writes ``headroom.json`` (the runs' names and numbers; their weights are not committed).
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from bench_floor import BLIND, blind_likelihood, oracle_rows  # noqa: E402
from reproduce_lib import Protocol  # noqa: E402

from compt.engine.checkpoint import model_from_checkpoint  # noqa: E402
from compt.paradigms.clip.data import tokenizer  # noqa: E402
from compt.paradigms.clip.data.evalsets import EVAL_STREAMS, embedded_val_set  # noqa: E402
from compt.paradigms.clip.data.synthetic import sample_scene, scene_rng  # noqa: E402

_FLOOR = json.loads((HERE / "floor.json").read_text())["oracle"]["test"]
ORACLE_SCALE = float(next(k for k, v in _FLOOR.items() if k != "best" and v == _FLOOR["best"]))


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """Per image of one batch and slot (``logits``: image x caption), the mean of its two directions."""
    labels = torch.arange(logits.shape[0])
    v2t = F.cross_entropy(logits, labels, reduction="none")
    t2v = F.cross_entropy(logits.t(), labels, reduction="none")
    return (v2t + t2v) / 2


class Split:
    """The protocol's test split: its fixed batches, caption slots and the scenes behind them."""

    def __init__(self, proto: Protocol):
        self.proto, self.n, self.bs = proto, proto.val_images, proto.val_batch
        seed = proto.eval_seed
        self.vset = embedded_val_set(32, seed, num_images=self.n, batch_size=self.bs, spec=proto.spec)
        self.scenes = [
            sample_scene(scene_rng(seed, EVAL_STREAMS["val"], i), proto.spec) for i in range(self.n)
        ]
        self.slots = len(self.vset.captions[0])

    def batches(self):
        for start in range(0, self.n, self.bs):
            for slot in range(self.slots):
                yield start, slot, [self.vset.captions[i][slot] for i in range(start, start + self.bs)]

    def oracle(self, blind: str = "") -> torch.Tensor:
        """Per image: the (``blind``) oracle's share of its val_loss, the critic of bench_floor."""
        out = torch.zeros(self.n, dtype=torch.float64)
        for start, _, texts in self.batches():
            p = blind_likelihood(self.scenes[start : start + self.bs], texts, self.proto.spec, blind)
            out[start : start + self.bs] += oracle_rows(p, ORACLE_SCALE) / self.slots
        return out

    @torch.no_grad()
    def member(self, checkpoint: str) -> torch.Tensor:
        """Per image: a trained member's share of its val_loss (its own learned temperature)."""
        model, _ = model_from_checkpoint(checkpoint)
        model.eval()
        tok = tokenizer(model.context_length)
        img = F.normalize(model.encode_image(self.vset.images), dim=-1)
        texts = [t for caps in self.vset.captions for t in caps]
        txt = F.normalize(model.encode_text(tok(texts)), dim=-1).reshape(self.n, self.slots, -1)
        scale = model.logit_scale.exp()
        out = torch.zeros(self.n)
        for start, slot, _ in self.batches():
            end = start + self.bs
            out[start:end] += _rows(scale * img[start:end] @ txt[start:end, slot].t()) / self.slots
        return out

    def by_kind(self, per_image: torch.Tensor) -> dict[str, float]:
        groups = defaultdict(list)
        for scene, value in zip(self.scenes, per_image.tolist(), strict=True):
            groups[scene.kind].append(value)
        return {"all": float(per_image.mean())} | {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def main(named: list[str]) -> dict:
    torch.set_num_threads(1)
    split = Split(Protocol())
    kinds = defaultdict(int)
    for scene in split.scenes:
        kinds[scene.kind] += 1
    oracle = split.oracle()
    out = {"split": "test", "scenes": dict(sorted(kinds.items())), "oracle": split.by_kind(oracle)}
    for blind in BLIND:
        out[f"{blind}-blind oracle"] = split.by_kind(split.oracle(blind))
    for item in named:
        name, _, path = item.partition("=")
        loss = split.member(path)
        row = split.by_kind(loss)
        share = {k: (row[k] - out["oracle"][k]) * kinds[k] / split.n for k in kinds}
        out[name] = {"val_loss": row, "gap_share": dict(sorted(share.items()))}
        print(
            name,
            {k: round(v, 3) for k, v in row.items()},
            "gap share",
            {k: round(v, 3) for k, v in share.items()},
        )
    return out


if __name__ == "__main__":
    result = main(sys.argv[1:])
    (HERE / "headroom.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if "oracle" in k}, indent=1))
