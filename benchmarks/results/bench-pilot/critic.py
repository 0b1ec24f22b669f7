"""How low can ``val_loss`` go with the members' critic when perception is perfect? (issue 12)

Every top member of both bench families stops at about 1.92 nats of test ``val_loss`` (bench-S4 at
32000 steps and bench-M4 at 16000 reach the same loss), while the generator's oracle scores 1.537
(``benchmarks/bench_floor.py``). The oracle's critic is ``log p(c | i)``, which can be -inf; a member's
is ``s * cos(u_i, v_c)`` with 32-d unit vectors and ``s <= 100``. This pilot asks which of the two the
plateau is: it trains the same loss (Eq. 2-3, :func:`compt.paradigms.clip.loss.multi_caption_clip_loss`,
batch 128, M = 4, the protocol's 10,000 scenes with their fixed caption pools) with the image tower
replaced by an MLP that reads the scene's attributes (kind, count, each object's shape, colour, size
and 3 x 3 region, the pair's relation, the background: everything a caption can name) and a
word-level GRU text tower far wider than any member's. Its ``val_loss`` on the same fixed batches is
then what the critic allows when seeing is free: near 1.92 says the plateau is the critic's, not the
members' capacity; near 1.54 says the members' towers are what stops them. ``position`` as the third
argument hides each object's region and the pair's relation from the image tower (the members'
probes, ``position.py``, find them blind to both). From the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench-pilot/critic.py [steps] [embed_dim] [position]
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from compt.paradigms.clip.data.captions import sample_captions
from compt.paradigms.clip.data.evalsets import EVAL_STREAMS, embedded_val_set
from compt.paradigms.clip.data.scene_captions import _where, all_captions, describe, relation
from compt.paradigms.clip.data.synthetic import Scene, sample_scene, scene_rng
from compt.paradigms.clip.loss import multi_caption_clip_loss

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent / "bench"))
from headroom import _rows  # noqa: E402
from reproduce_lib import Protocol  # noqa: E402

PROTO = Protocol()
SPEC = PROTO.spec
CELLS = [_where((c + 0.5) / 3, (r + 0.5) / 3) for r in range(3) for c in range(3)]  # the nine regions
RELATIONS = ("to the left of", "to the right of", "above", "below")


def _onehot(values, value) -> list[float]:
    return [float(v == value) for v in values]


def scene_features(sc: Scene, blind: str = "") -> list[float]:
    """Everything a caption of ``sc`` can name, one-hot (zeros for an absent second object; and for
    where objects are, ``blind="position"``)."""
    f = _onehot(("single", "multi", "pair"), sc.kind) + _onehot(range(1, SPEC.max_count + 1), sc.count)
    for j in range(2):
        if j < len(sc.objects):
            o = sc.objects[j]
            region = _where(*o.positions[0]) if sc.kind != "multi" and blind != "position" else None
            f += _onehot(SPEC.shapes, o.shape) + _onehot(SPEC.colours, o.colour) + _onehot(SPEC.sizes, o.size)
            f += _onehot(CELLS, region)
        else:
            f += [0.0] * (len(SPEC.shapes) + len(SPEC.colours) + len(SPEC.sizes) + 9)
    rel = relation(*sc.objects)[0] if sc.kind == "pair" and blind != "position" else None
    return f + _onehot(RELATIONS, rel) + _onehot(SPEC.backgrounds, sc.background)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[.,:]", text.lower())


class Vocab:
    def __init__(self, scenes: list[Scene]) -> None:
        seen: dict[str, int] = {"<pad>": 0}
        for sc in scenes:
            primary, subs = all_captions(sc)
            for t in [primary, *subs]:
                for w in words(t):
                    seen.setdefault(w, len(seen))
        self.ids = seen
        self.length = 24

    def encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.ids[w] for w in words(t)][: self.length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class Towers(nn.Module):
    def __init__(self, in_dim: int, vocab: int, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.embed = nn.Embedding(vocab, 128, padding_idx=0)
        self.gru = nn.GRU(128, 256, batch_first=True, bidirectional=True)
        self.text_out = nn.Sequential(nn.Linear(512, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids > 0).sum(1).clamp_min(1)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.gru(packed)  # [2, N, 256]: the last state of each direction
        return self.text_out(torch.cat([h[0], h[1]], dim=-1))


def val_batches(seed: int, scenes: list[Scene], vocab: Vocab, blind: str):
    """The fixed batches and caption draws of ``val_loss`` (the same texts every member is scored on)."""
    vset = embedded_val_set(32, seed, num_images=PROTO.val_images, batch_size=PROTO.val_batch, spec=SPEC)
    for start in range(0, PROTO.val_images, PROTO.val_batch):
        idx = range(start, start + PROTO.val_batch)
        feats = torch.tensor([scene_features(scenes[i], blind) for i in idx])
        caps = [c for i in idx for c in vset.captions[i]]
        yield feats, vocab.encode(caps).view(len(idx), -1, vocab.length), [scenes[i].kind for i in idx]


@torch.no_grad()
def val_loss(model: Towers, batches) -> dict[str, float]:
    """The mean over fixed batches of Eq. 2-3, and per scene kind the mean of its images' rows."""
    total, per_kind = [], {"single": [], "multi": [], "pair": []}
    scale = model.logit_scale.exp()
    for feats, ids, kinds in batches:
        b, m, _ = ids.shape
        img = nn.functional.normalize(model.image(feats), dim=-1)
        txt = nn.functional.normalize(model.encode_text(ids.view(b * m, -1)), dim=-1).view(b, m, -1)
        total.append(float(multi_caption_clip_loss(img, txt, scale)))
        logits = scale * torch.matmul(img, txt.permute(1, 2, 0))  # [M, N images, N texts]
        rows = torch.stack([_rows(lg) for lg in logits]).mean(0)  # per image, over the slots
        for k, r in zip(kinds, rows.tolist(), strict=True):
            per_kind[k].append(r)
    return {"all": sum(total) / len(total)} | {k: sum(v) / len(v) for k, v in per_kind.items()}


def main(steps: int, dim: int, blind: str = "") -> dict:
    torch.manual_seed(0)
    train_rngs = [scene_rng(7, 999, i) for i in range(PROTO.num_samples)]
    train = [sample_scene(r, SPEC) for r in train_rngs]
    pools = [describe(sc, r, SPEC.num_sub_captions) for sc, r in zip(train, train_rngs, strict=True)]
    val_scenes = {
        s: [sample_scene(scene_rng(s, EVAL_STREAMS["val"], i), SPEC) for i in range(PROTO.val_images)]
        for s in (0, PROTO.eval_seed)
    }
    vocab = Vocab(train + val_scenes[0] + val_scenes[PROTO.eval_seed])
    feats = torch.tensor([scene_features(sc, blind) for sc in train])
    model = Towers(feats.shape[1], len(vocab.ids), dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(0)
    batch, m = PROTO.batch, 4
    val = {s: list(val_batches(s, val_scenes[s], vocab, blind)) for s in val_scenes}
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        idx = rng.choice(len(train), size=batch, replace=False)
        caps = [c for i in idx for c in sample_captions(pools[i], m, rng)]
        ids = vocab.encode(caps)
        img = model.image(feats[idx])
        txt = model.encode_text(ids).view(batch, m, -1)
        loss = multi_caption_clip_loss(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % max(1, steps // 10) == 0 or step == steps:
            point = {"step": step, "train_loss": float(loss), "scale": float(model.logit_scale.exp())}
            point |= {f"val{s}": val_loss(model, val[s]) for s in val}
            curve.append(point)
            print(f"step {step}/{steps} {time.time() - t0:.0f}s {json.dumps(point)}", flush=True)
    return {"steps": steps, "embed_dim": dim, "blind": blind, "batch": batch, "curve": curve}


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    blind = sys.argv[3] if len(sys.argv) > 3 else ""
    out = main(steps, dim, blind)
    path = HERE / f"critic-{steps}-d{dim}{'-' + blind if blind else ''}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
