"""Do trained members see where an object is? Two probes on the test split (issue 12).

* ``where``: on the one-object scenes, zero-shot choice among the nine phrasings of the caption
  "a <colour> <shape> <where>." (the sub-caption every one-object scene's pool may hold); and, as a
  control, between "a small <shape>." and "a medium <shape>.". On the 4 x 4 grid the centre region
  holds 4 of the 16 cells, so a critic that always answers "in the center" scores 25 %.
* ``shift``: the cosine between a member's embedding of an image and of the same image rolled one
  patch (8 px) to the right, averaged over the test images: 1 means the member's image embedding
  does not depend on where anything is.

From the repository root, with finished runs' weights (not committed)::

    PYTHONPATH=src .venv/bin/python benchmarks/results/bench-pilot/position.py NAME=RUN/final.pt ...

adds their rows to ``position.json`` (rows of runs not probed again stay); with ``data=PILOT`` first
(a data pilot of ``pilot.py``, e.g. ``grid3``), the probes use that pilot's test split and
``position-PILOT.json``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent / "bench"))
from headroom import Split  # noqa: E402
from reproduce_lib import Protocol  # noqa: E402

from compt.engine.checkpoint import model_from_checkpoint  # noqa: E402
from compt.paradigms.clip.data import tokenizer  # noqa: E402
from compt.paradigms.clip.data.scene_captions import _WHERE, _where  # noqa: E402

WHERE = [w for row in _WHERE for w in row]


@torch.no_grad()
def probe(split: Split, checkpoint: str) -> dict[str, float]:
    model, _ = model_from_checkpoint(checkpoint)
    model.eval()
    tok = tokenizer(model.context_length)
    images = split.vset.images
    single = [i for i, sc in enumerate(split.scenes) if sc.kind == "single"]
    img = F.normalize(model.encode_image(images[single]), dim=-1)
    where = size = 0
    for row, i in enumerate(single):
        o = split.scenes[i].objects[0]
        texts = [f"a {o.colour} {o.shape} {w}." for w in WHERE]
        texts += [f"a {s} {o.shape}." for s in ("small", "medium")]
        sims = F.normalize(model.encode_text(tok(texts)), dim=-1) @ img[row]
        where += WHERE[int(sims[:9].argmax())] == _where(*o.positions[0])
        size += ("small", "medium")[int(sims[9:].argmax())] == o.size
    patch = model.visual.patch_size[0]  # open_clip keeps (h, w)
    full = F.normalize(model.encode_image(images), dim=-1)
    rolled = F.normalize(model.encode_image(torch.roll(images, shifts=patch, dims=3)), dim=-1)
    return {
        "where_top1": 100 * where / len(single),
        "size_top1": 100 * size / len(single),
        "shift_cos": float((full * rolled).sum(-1).mean()),
        "between_images_cos": float((full @ full.t()).mean()),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    args, proto, out_name = sys.argv[1:], Protocol(), "position"
    if args and args[0].startswith("data="):
        from pilot import PILOTS

        pilot = args.pop(0).removeprefix("data=")
        out_name, proto = f"position-{pilot}", PILOTS[pilot].protocol
    split = Split(proto)
    # runs' weights are not committed: probes already recorded stay, a probed run replaces its row
    path = HERE / f"{out_name}.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    out |= {"split": "test", "one_object_scenes": sum(sc.kind == "single" for sc in split.scenes)}
    for item in args:
        name, _, checkpoint = item.partition("=")
        out[name] = probe(split, checkpoint)
        print(name, {k: round(v, 4) for k, v in out[name].items()}, flush=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
