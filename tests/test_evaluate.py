"""CLIP evaluation: zero-shot top-1 and retrieval recall on real tiny models, checked against plain loops."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from compt.cli import main as cli_main
from compt.engine.checkpoint import save_checkpoint
from compt.families import get_member
from compt.lossless import Tolerance
from compt.paradigms import get_paradigm
from compt.paradigms.clip.data import DataError
from compt.paradigms.clip.data import tokenizer as make_tokenizer
from compt.paradigms.clip.data.evalsets import ValidationSet
from compt.paradigms.clip.evaluate import (
    build_evaluator,
    evaluate_checkpoint,
    evaluate_model,
    higher_is_better,
    retrieval_chance,
    retrieval_recall,
    validation_loss,
    zeroshot_chance,
    zeroshot_top1,
)
from compt.paradigms.clip.export import export_member
from compt.paradigms.clip.loss import multi_caption_clip_loss


@dataclass
class Task:  # the fields compt.paradigms.clip.data.evalsets.ZeroShotTask has
    name: str
    classnames: list[str]
    templates: list[str]
    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class RSet:  # the fields compt.paradigms.clip.data.evalsets.RetrievalSet has
    name: str
    images: torch.Tensor
    captions: list[list[str]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = get_member("tiny-XS").create()
    m.train()
    return m


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(get_member("tiny-XS").context_length)


def _task(n=23, classes=("circle", "square", "star", "ring", "cross"), seed=0, name="shapes"):
    g = torch.Generator().manual_seed(seed)
    return Task(
        name,
        list(classes),
        ["a photo of a {}.", "a {} shape"],
        torch.randn(n, 3, 32, 32, generator=g),
        torch.randint(0, len(classes), (n,), generator=g),
    )


def _rset(n=11, seed=1, name="captions"):
    g = torch.Generator().manual_seed(seed)
    caps = [
        [f"object number {i}", f"a picture of thing {i}", f"item {i} in red"][: 1 + i % 3] for i in range(n)
    ]
    return RSet(name, torch.randn(n, 3, 32, 32, generator=g), caps)


def _reference_top1(model, task, tok):
    """Plain, unbatched zero-shot: mean of normalized template embeddings per class, then argmax."""
    with torch.no_grad():
        w = []
        for c in task.classnames:
            e = model.encode_text(tok([t.format(c) for t in task.templates]), normalize=True).mean(0)
            w.append(e / e.norm())
        w = torch.stack(w)
        pred = [int((model.encode_image(x[None], normalize=True) @ w.T).argmax()) for x in task.images]
    return 100.0 * sum(p == int(y) for p, y in zip(pred, task.labels, strict=True)) / len(pred)


def _vset(n=12, m=3, batch=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    caps = [[f"thing {i} view {j}" for j in range(m)] for i in range(n)]
    return ValidationSet("held-out", torch.randn(n, 3, 32, 32, generator=g), caps, batch)


def _reference_recall(model, rset, tok, k):
    """Plain ranks: sort all scores for every query."""
    texts = [c for caps in rset.captions for c in caps]
    owner = [i for i, caps in enumerate(rset.captions) for _ in caps]
    with torch.no_grad():
        img = model.encode_image(rset.images, normalize=True)
        txt = model.encode_text(tok(texts), normalize=True)
    sim = img @ txt.T
    i2t = sum(
        any(owner[j] == i for j in sim[i].argsort(descending=True)[:k].tolist()) for i in range(len(img))
    )
    t2i = sum(owner[j] in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(len(texts)))
    return 100.0 * i2t / len(img), 100.0 * t2i / len(texts)


def test_zeroshot_matches_a_plain_loop_for_any_batch_size(model, tok):
    model.eval()
    task = _task()
    ref = _reference_top1(model, task, tok)
    for bs in (1, 4, 256):
        assert zeroshot_top1(model, task, tok, batch_size=bs) == pytest.approx(ref, abs=1e-9)


def test_retrieval_matches_a_plain_loop_for_any_batch_size(model, tok):
    model.eval()
    rset = _rset()
    for bs in (2, 5, 256):  # chunks that split the similarity matrix unevenly
        rec = retrieval_recall(model, rset, tok, batch_size=bs)
        for k in (1, 5, 10):
            i2t, t2i = _reference_recall(model, rset, tok, k)
            assert rec[f"i2t_r{k}"] == pytest.approx(i2t) and rec[f"t2i_r{k}"] == pytest.approx(t2i)
    assert (
        rec["i2t_r1"] <= rec["i2t_r5"] <= rec["i2t_r10"] and rec["t2i_r1"] <= rec["t2i_r5"] <= rec["t2i_r10"]
    )
    assert retrieval_recall(model, _rset(n=8), tok)["t2i_r10"] == 100.0  # 10 >= 8 candidate images


def test_validation_loss_is_the_training_loss_of_its_fixed_batches(model, tok):
    model.eval()
    vset = _vset()
    with torch.no_grad():  # what a training step computes (Eq. 2-3) on each fixed batch, averaged
        ref = []
        for s in range(0, 12, 4):
            texts = tok([c for caps in vset.captions[s : s + 4] for c in caps])
            image = model.encode_image(vset.images[s : s + 4])
            text = model.encode_text(texts).reshape(4, 3, -1)
            ref.append(float(multi_caption_clip_loss(image, text, model.logit_scale.exp())))
    for bs in (1, 5, 256):  # the compute batch chunks the forward only; the contrastive batch stays 4
        assert validation_loss(model, vset, tok, batch_size=bs) == pytest.approx(sum(ref) / 3, rel=1e-5)
    # The batch composition is part of the metric: regrouping the same pairs changes the negatives.
    regrouped = ValidationSet("held-out", vset.images, vset.captions, 6)
    assert validation_loss(model, regrouped, tok) != pytest.approx(sum(ref) / 3, rel=1e-5)
    with pytest.raises(DataError, match="multiple of batch_size=5"):
        ValidationSet("bad", vset.images, vset.captions, 5)
    with pytest.raises(DataError, match="same number"):
        ValidationSet("bad", vset.images[:4], [["a"], ["b"], ["c", "d"], ["e"]], 4)


def test_metric_direction_unit_and_default_tolerance():
    assert higher_is_better("mean_zeroshot_top1") and higher_is_better("retrieval/synthetic/i2t_r10")
    assert not higher_is_better("val_loss") and not higher_is_better("val/synthetic/loss")
    clip = get_paradigm("clip")  # what compt.lossless and the report ask (issue 12 item 5)
    top1, loss = clip.metric_rule("mean_zeroshot_top1"), clip.metric_rule("val/synthetic/loss")
    assert (top1.higher_is_better, top1.unit, top1.tolerance) == (True, "%", Tolerance(absolute=0.5))
    assert (loss.higher_is_better, loss.unit, loss.tolerance) == (False, "nats", Tolerance(absolute=0.01))


def test_evaluate_model_keys_means_mode_and_no_grad(model, tok):
    model.train()
    tasks, rsets = [_task(), _task(seed=3, name="other")], [_rset(), _rset(seed=4, name="second")]
    m = evaluate_model(model, tasks, rsets, tok, batch_size=8)
    assert model.training, "train/eval mode must be restored for the training loop"
    assert all(p.grad is None for p in model.parameters())
    expected = {"zeroshot/shapes/top1", "zeroshot/other/top1", "mean_zeroshot_top1", "mean_retrieval_r1"}
    expected |= {
        f"retrieval/{s}/{d}_r{k}" for s in ("captions", "second") for d in ("i2t", "t2i") for k in (1, 5, 10)
    }
    assert set(m) == expected | {f"chance/{k}" for k in expected}
    assert m["mean_zeroshot_top1"] == pytest.approx(
        (m["zeroshot/shapes/top1"] + m["zeroshot/other/top1"]) / 2
    )
    r1 = [(m[f"retrieval/{s}/i2t_r1"] + m[f"retrieval/{s}/t2i_r1"]) / 2 for s in ("captions", "second")]
    assert m["mean_retrieval_r1"] == pytest.approx(sum(r1) / 2)
    assert all(0.0 <= v <= 100.0 for v in m.values())
    # DDP-style wrappers expose the model as .module; evaluation unwraps them.
    wrapped = torch.nn.DataParallel(model)
    assert evaluate_model(wrapped, tasks, rsets, tok, batch_size=8) == m
    other = ValidationSet("other", *dataclasses.astuple(_vset(seed=5))[1:])
    with_val = evaluate_model(model, tasks, rsets, tok, batch_size=8, val_sets=[_vset(), other])
    val_keys = {"val/held-out/loss", "val/other/loss", "val_loss"}
    assert set(with_val) - set(m) == val_keys | {f"chance/{k}" for k in val_keys}
    assert with_val["chance/val_loss"] == pytest.approx(math.log(_vset().batch_size))  # a blind guess
    assert with_val["val_loss"] == pytest.approx(
        (with_val["val/held-out/loss"] + with_val["val/other/loss"]) / 2
    )
    assert {k: with_val[k] for k in m} == m


def test_bad_eval_sets_give_clear_errors(model, tok):
    t = _task()
    with pytest.raises(ValueError, match=r"'shapes'.*labels"):
        zeroshot_top1(model, Task(t.name, t.classnames[:2], t.templates, t.images, t.labels), tok)
    with pytest.raises(ValueError, match="placeholder"):
        zeroshot_top1(model, Task(t.name, t.classnames, ["no slot"], t.images, t.labels), tok)
    with pytest.raises(ValueError, match=r"image #0 has no caption"):
        retrieval_recall(model, RSet("r", torch.zeros(2, 3, 32, 32), [[], ["x"]]), tok)
    with pytest.raises(ValueError, match="unique"):
        evaluate_model(model, [t, t], [], tok)
    with pytest.raises(ValueError, match="unique"):
        evaluate_model(model, [], [], tok, val_sets=[_vset(), _vset()])


def _write_imagefolder(root, classes=("red", "blue"), per_class=3):
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(colours[c]) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def _checkpoint(tmp_path, name="tiny-XS"):
    torch.manual_seed(0)
    member = get_member(name)
    model = member.create()
    payload = {"model": model.state_dict(), "model_cfg": member.model_cfg, "member": member.name}
    return save_checkpoint(tmp_path / "run" / "final.pt", payload)


def test_checkpoint_and_its_export_evaluate_identically(tmp_path):
    ckpt = _checkpoint(tmp_path)
    folder = _write_imagefolder(tmp_path / "colours")
    m1, info = evaluate_checkpoint(ckpt, imagefolders=[folder], num_images=40, batch_size=64)
    assert info["member"] == "tiny-XS" and info["image_size"] == 32 and info["format"] == "checkpoint"
    assert "zeroshot/colours/top1" in m1 and "mean_zeroshot_top1" in m1 and "mean_retrieval_r1" in m1
    export = export_member(ckpt, tmp_path / "export")
    m2, info2 = evaluate_checkpoint(export, imagefolders=[folder], num_images=40, batch_size=64)
    assert info2["format"] == "export"
    assert m1 == pytest.approx(m2, abs=1e-9)


def test_build_evaluator_is_a_train_callback(tmp_path, model):
    evaluate = build_evaluator(32, 32, imagefolders=[_write_imagefolder(tmp_path / "f")], embedded=False)
    model.train()
    first = evaluate(model, 10)
    keys = {"zeroshot/f/top1", "mean_zeroshot_top1"}
    assert set(first) == keys | {f"chance/{k}" for k in keys} and model.training
    assert first["chance/zeroshot/f/top1"] == 50.0  # two balanced classes
    assert evaluate(model, 20) == first  # same sets, same model: same numbers
    # Two ImageFolders with the same folder name get distinct metric keys.
    a, b = _write_imagefolder(tmp_path / "a" / "val"), _write_imagefolder(tmp_path / "b" / "val")
    both = build_evaluator(32, 32, imagefolders=[a, b], embedded=False)(model, 0)
    assert {"zeroshot/val/top1", "zeroshot/b_val/top1"} <= set(both)


def test_build_evaluator_scores_the_embedded_validation_loss(model):
    evaluate = build_evaluator(32, 32, num_images=8, val_images=64, val_batch_size=32)
    metrics = evaluate(model, 0)
    assert metrics["val_loss"] == metrics["val/synthetic/loss"] > 0
    # An untrained CLIP is near chance: ln(32) for a contrastive batch of 32 at its initial temperature.
    assert abs(metrics["val_loss"] - np.log(32)) < 1.0
    assert "val_loss" not in build_evaluator(32, 32, num_images=8, val_images=0)(model, 0)
    # The cheap evaluation during training (issue 12): only the sets the asked-for keys come from.
    cheap = build_evaluator(32, 32, num_images=8, val_images=64, val_batch_size=32, metrics=["val_loss"])
    assert cheap(model, 0) == {k: v for k, v in metrics.items() if k.startswith(("val", "chance/val"))}
    retrieval = build_evaluator(32, 32, num_images=8, val_images=64, metrics=["retrieval/synthetic/i2t_r1"])
    assert {k.split("/")[0] for k in retrieval(model, 0)} == {"retrieval", "mean_retrieval_r1", "chance"}
    with pytest.raises(ValueError, match="nothing to evaluate for val_loss"):
        build_evaluator(32, 32, embedded=False, metrics=["val_loss"])(model, 0)


def test_cli_eval_json_and_table(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    folder = _write_imagefolder(tmp_path / "colours")
    assert cli_main(["eval", str(ckpt.parent), "--no-embedded", "--imagefolder", str(folder), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    keys = {"zeroshot/colours/top1", "mean_zeroshot_top1"}
    assert doc["member"] == "tiny-XS" and set(doc["metrics"]) == keys | {f"chance/{k}" for k in keys}
    assert cli_main(["eval", str(ckpt), "--no-embedded", "--imagefolder", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "zeroshot/colours/top1" in out and "(chance  50.00)" in out and "chance/" not in out
    assert cli_main(["eval", str(ckpt), "--no-embedded"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert cli_main(["eval", str(tmp_path / "garbage.pt")]) == 2
    assert "garbage.pt cannot be read" in capsys.readouterr().err


def test_chance_levels_are_the_majority_class_and_the_expected_random_recall():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])  # the best blind guess, class 0, is right 3 times in 6
    assert zeroshot_chance(Task("t", ["a", "b", "c", "d"], ["{}"], torch.zeros(6, 3, 8, 8), labels)) == 50.0
    caps = [["a"], ["b", "c"], ["d"]]  # 4 texts
    rset = RSet("r", torch.zeros(3, 3, 8, 8), caps)
    owner = [0, 1, 1, 2]
    for k in (1, 2, 10):  # every ordering of the 4 texts equally likely, for every image
        orders = list(itertools.permutations(range(4)))
        hits = [sum(any(owner[t] == i for t in o[:k]) for o in orders) / len(orders) for i in range(3)]
        chance = retrieval_chance(rset, ks=(k,))
        assert chance[f"i2t_r{k}"] == pytest.approx(100 * sum(hits) / 3)
        assert chance[f"t2i_r{k}"] == pytest.approx(100 * min(k, 3) / 3)


def test_an_untrained_model_scores_near_its_chance_level(model, tok):
    task = _task(n=200, seed=5)
    m = evaluate_model(model, [task], [], tok, batch_size=64)
    assert m["chance/zeroshot/shapes/top1"] == zeroshot_chance(task) == m["chance/mean_zeroshot_top1"]
    assert abs(m["zeroshot/shapes/top1"] - 20.0) < 10.0  # 5 classes, noise images, random weights


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ("tpu", "'tpu' is not a torch device: use cpu, cuda or cuda:N"),
        pytest.param(
            "cuda",
            "no CUDA device is available here; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        ("cuda:99", "cuda:99"),
    ],
)
def test_eval_on_a_device_this_machine_lacks_is_one_line(tmp_path, capsys, device, fragment):
    ckpt = _checkpoint(tmp_path)
    assert cli_main(["eval", str(ckpt), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compt eval: error: --device") and fragment in err and "Traceback" not in err
