"""compt.paradigms.clip.finetune.probe: the CLIP paper's linear probe, its C search, and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from compt.engine.checkpoint import CheckpointError, save_checkpoint
from compt.engine.loader import DataError
from compt.families import get_member
from compt.paradigms.clip.data.evalsets import ZeroShotTask
from compt.paradigms.clip.finetune.probe import (
    ProbeConfig,
    choose_c,
    fit_probe,
    image_features,
    linear_probe,
    probe_checkpoint,
)
from compt.paradigms.clip.finetune.sets import write_finetune_set


def _correlated(n, seed):
    """Two features sharing a large common factor; the label is in their difference only.

    The class means differ along feature 0 alone, so a heavily regularized probe (weights ~ the
    mean difference) sees mostly the common factor and fails; a weakly regularized one learns x0 - x1.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    z = 5 * rng.normal(size=n)
    x = np.stack([z + 0.5 * (2 * y - 1) + 0.1 * rng.normal(size=n), z + 0.1 * rng.normal(size=n)], 1)
    return x, y


def test_the_search_picks_the_smallest_c_with_the_best_validation_score_at_8_steps_per_decade():
    x, y = _correlated(60, 0)
    vx, vy = _correlated(60, 1)
    c, scores, _ = choose_c(x, y, vx, vy)
    best = max(scores.values())
    assert scores[c] == best and all(s < best for cc, s in scores.items() if cc < c)
    assert scores[1e-6] < 60 < best  # strong regularization fails here, so the choice is not the default
    for log_c in (-6, -4, -2, 0, 2, 4, 6):  # the paper's starting grid
        assert any(math.isclose(math.log10(cc), log_c) for cc in scores)
    below = [cc for cc in scores if cc < c]
    assert math.isclose(math.log10(c) - math.log10(max(below)), 1 / 8)  # refined to 1/8 decade


def test_ties_go_to_the_strongest_regularization():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = rng.normal(size=(40, 3)) + 3.0 * (2 * y - 1)[:, None]  # separable at every C
    c, scores, _ = choose_c(x, y, x, y)
    assert set(scores.values()) == {100.0} and c == 1e-6


def test_fit_probe_refits_the_chosen_c_on_the_whole_training_set():
    x, y = _correlated(60, 0)
    tx, ty = _correlated(200, 2)
    res = fit_probe(x, y, tx, ty, ProbeConfig(seed=3))
    ref = LogisticRegression(C=res.c, max_iter=1000).fit(x, y)
    assert res.test_top1 == pytest.approx(100 * ref.score(tx, ty))
    assert res.test_top1 > 90 and (res.num_train, res.num_test, res.num_classes, res.feature_dim) == (
        60,
        200,
        2,
        2,
    )
    assert res.to_dict()["c"] == res.c


def test_a_class_with_one_training_image_is_a_clear_error():
    x, y = np.zeros((5, 2)), np.array([0, 0, 1, 1, 2])
    with pytest.raises(DataError, match=r"class\(es\) \[2\] have a single training image"):
        fit_probe(x, y, x, y)
    with pytest.raises(DataError, match="1 class"):
        fit_probe(x[:2], y[:2], x, y)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    member = get_member("debug-L")
    return member, member.create().eval()


def test_features_are_the_normalized_image_embeddings_in_any_batch_size(clip):
    _, model = clip
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        ref = model.encode_image(x, normalize=True).numpy()
    assert np.allclose(image_features(model, x, batch_size=3), ref, atol=1e-6)


def test_probe_checkpoint_end_to_end_on_a_written_set(tmp_path, clip):
    member, model = clip
    ckpt = save_checkpoint(
        tmp_path / "final.pt",
        {"model": model.state_dict(), "model_cfg": member.model_cfg, "member": member.name},
    )
    train, test = write_finetune_set(tmp_path / "set", "shape", num_train=32, num_test=16, image_size=16)
    res, info = probe_checkpoint(ckpt, train, test, ProbeConfig(max_iter=100, steps_per_decade=1))
    assert info["member"] == "debug-L" and info["image_size"] == 16
    assert (res.num_train, res.num_test, res.num_classes, res.feature_dim) == (32, 16, 8, 32)
    assert 0 <= res.test_top1 <= 100
    tried = [math.log10(c) for c, _ in res.val_top1]  # the start grid, then one halving to 1 decade
    assert {-6, -4, -2, 0, 2, 4, 6} <= {round(t) for t in tried} and all(t == round(t) for t in tried)


def test_images_that_do_not_match_the_member_size_are_a_clear_error(clip):
    _, model = clip
    y = torch.arange(8) % 2
    small = ZeroShotTask("train", ["a", "b"], ["{}"], torch.zeros(8, 3, 16, 16), y)
    big = ZeroShotTask("test", ["a", "b"], ["{}"], torch.zeros(8, 3, 32, 32), y)
    with pytest.raises(DataError, match=r"test images are \(32, 32\) but the member takes 16x16"):
        linear_probe(model, 16, small, big)


def test_a_checkpoint_that_is_not_a_clip_is_a_clear_error(tmp_path):
    path = save_checkpoint(
        tmp_path / "lm.pt", {"model": {}, "model_cfg": {"vocab_size": 8, "hidden_size": 4}}
    )
    with pytest.raises(CheckpointError, match="does not hold a clip model"):
        probe_checkpoint(path, tmp_path, tmp_path)
