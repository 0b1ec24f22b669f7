"""compt.paradigms.clip.finetune.head and .sid: the zero-shot-initialized classifier, any resolution, SID."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compt.engine.checkpoint import CheckpointError, save_checkpoint
from compt.families import get_member
from compt.paradigms.clip.data import tokenizer as make_tokenizer
from compt.paradigms.clip.data.evalsets import ZeroShotTask
from compt.paradigms.clip.evaluate import zeroshot_top1
from compt.paradigms.clip.export import export_member
from compt.paradigms.clip.finetune.head import (
    ImageClassifier,
    build_classifier,
    classification_loss,
    load_clip,
    top1,
)
from compt.paradigms.clip.finetune.sid import StageEmbedding
from compt.paradigms.clip.progressive import encode_image, resize_images

CLASSES = ["circle", "square", "star"]
TEMPLATES = ["a {}.", "a picture of a {}."]


@pytest.fixture(scope="module")
def member():
    return get_member("debug-L")  # 16 px, patch 4, 2 blocks, a real open_clip CLIP


@pytest.fixture
def clip(member):
    torch.manual_seed(0)
    return member.create().eval()


def _images(n=10, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, len(CLASSES), (n,), generator=g)


def test_the_head_starts_as_the_zero_shot_classifier(clip, member):
    clf = build_classifier(clip, member.model_cfg, CLASSES, TEMPLATES)
    x, y = _images()
    tok = make_tokenizer(member.context_length)
    with torch.no_grad():
        w = []
        for c in CLASSES:  # open_clip's recipe, by hand: mean of normalized prompts, normalized
            e = clip.encode_text(tok([t.format(c) for t in TEMPLATES]), normalize=True).mean(0)
            w.append(e / e.norm())
        expected = clip.logit_scale.exp() * clip.encode_image(x, normalize=True) @ torch.stack(w).T
        assert torch.allclose(clf(x), expected, atol=1e-5)
    task = ZeroShotTask("t", CLASSES, TEMPLATES, x, y)
    assert top1(clf, x, y) == pytest.approx(zeroshot_top1(clip, task, tok))
    assert not any(n.startswith("transformer.") or "token_embedding" in n for n, _ in clf.named_parameters())


def test_classification_loss_is_the_cross_entropy_of_the_logits(clip, member):
    clf = build_classifier(clip, member.model_cfg, CLASSES, TEMPLATES)
    x, y = _images()
    loss, logits = classification_loss(clf, x, y)
    assert torch.allclose(loss, nn.functional.cross_entropy(clf(x), y))
    assert logits.shape == (10, 3)


def test_a_lower_resolution_runs_autoprog_ones_encoder_under_the_head(clip, member):
    # One interpolation for AutoProg-One and -Zero (issue 16): the classifier's image tower at 8 px is
    # compt.paradigms.clip.progressive.encode_image at 8 px, the head applied to it.
    clf = build_classifier(clip, member.model_cfg, CLASSES, TEMPLATES)
    small = resize_images(_images(size=16)[0], 8)
    with torch.no_grad():
        expected = clf.head(encode_image(clip, small, normalize=True))
        assert torch.allclose(clf(small), expected, atol=1e-6)


def test_a_lower_resolution_trains_the_full_size_position_embedding(clip, member):
    clf = build_classifier(clip, member.model_cfg, CLASSES, TEMPLATES).train()
    x, y = _images(size=16)
    small = resize_images(x, 8)
    assert small.shape == (10, 3, 8, 8)
    loss, _ = classification_loss(clf, small, y)
    loss.backward()
    pos = clf.visual.positional_embedding
    assert pos.shape == (1 + 4 * 4, pos.shape[1])  # stored at full resolution
    assert pos.grad is not None and pos.grad[1:].abs().sum() > 0


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 10, 10), "multiples of its 4 px patch"),
        ((2, 3, 32, 32), "up to 16 px"),
        ((2, 3, 16, 8), "square"),
    ],
)
def test_images_of_a_size_the_tower_cannot_take_are_a_clear_error(clip, member, shape, match):
    clf = build_classifier(clip, member.model_cfg, CLASSES, TEMPLATES)
    with pytest.raises(ValueError, match=match):
        clf(torch.zeros(shape))


def test_sid_is_added_to_the_class_token_per_sample(clip, member):
    clf = build_classifier(clip, member.model_cfg, CLASSES, TEMPLATES, num_stages=4)
    x, _ = _images(n=4)
    with torch.no_grad():
        plain = ImageClassifier(clip.visual, clf.head)(x)  # the same tower and head without SID
        clf.stage_embedding.table.weight.zero_()
        assert torch.allclose(clf(x, torch.tensor([0, 1, 2, 4])), plain, atol=1e-6)
        clf.stage_embedding.table.weight.normal_(std=0.5)
        a = clf(x, torch.tensor([0, 0, 3, 3]))
        b = clf(x, torch.tensor([0, 1, 3, 4]))
        assert torch.allclose(a[[0, 2]], b[[0, 2]]) and not torch.allclose(a[[1, 3]], b[[1, 3]])
        assert torch.allclose(clf(x), clf(x, torch.full((4,), 3)))  # default: the last stage's id
    loss, _ = classification_loss(clf, x, torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 2, 2]))
    loss.backward()
    grad_rows = clf.stage_embedding.table.weight.grad.abs().sum(dim=1)
    assert grad_rows[2] > 0 and grad_rows[[0, 1, 3, 4]].sum() == 0


def test_sid_draws_the_null_id_with_its_probability():
    sid = StageEmbedding(4, 8, null_prob=0.1)
    torch.manual_seed(0)
    ids = sid.draw_ids(2, 20_000)
    assert set(ids.tolist()) == {2, sid.null_id}
    assert (ids == sid.null_id).float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert (StageEmbedding(4, 8, null_prob=0.0).draw_ids(1, 100) == 1).all()
    with pytest.raises(ValueError, match="outside 0..3"):
        sid.draw_ids(4, 2)


def _payload(member, clip):
    return {"model": clip.state_dict(), "model_cfg": member.model_cfg, "member": member.name}


def test_load_clip_reads_a_checkpoint_and_an_export_alike(tmp_path, clip, member):
    ckpt = save_checkpoint(tmp_path / "run" / "final.pt", _payload(member, clip))
    export = export_member(_payload(member, clip), tmp_path / "export")
    x, _ = _images()
    outs = []
    for path in (ckpt, tmp_path / "run", export):
        model, cfg, info = load_clip(path)
        assert cfg["vision_cfg"] == member.model_cfg["vision_cfg"] and info["member"] == member.name
        with torch.no_grad():
            outs.append(model.eval().encode_image(x))
    assert all(torch.allclose(outs[0], o, atol=1e-6) for o in outs[1:])


@pytest.mark.parametrize(
    "model_cfg",
    [
        {"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2},  # a language model's config
        {"embed_dim": 32, "text_cfg": {"context_length": 16, "width": 16, "heads": 1, "layers": 1}},
    ],
    ids=["language-model", "no-vision-tower"],
)
def test_a_checkpoint_that_is_not_a_clip_is_a_clear_error(tmp_path, model_cfg):
    path = save_checkpoint(tmp_path / "final.pt", {"model": {"w": torch.zeros(2)}, "model_cfg": model_cfg})
    with pytest.raises(CheckpointError, match="does not hold a clip model"):
        load_clip(path)


def test_a_checkpoint_without_a_model_config_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "final.pt", {"model": {"w": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="holds no 'model_cfg'"):
        load_clip(path)
