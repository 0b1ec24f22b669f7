"""The linear probe, as the CLIP paper measures transfer (Radford et al. 2021, App. A.3; issue 16).

The image tower is frozen and each image's feature is computed once: the L2-normalized
``encode_image`` embedding, what open_clip's zero-shot classifier scores and what the CLIP
repository's linear-probe example fits. A multinomial logistic regression (scikit-learn's L-BFGS,
at most 1,000 iterations, as the paper) is fitted on them with its L2 strength chosen on a
validation split held out of the training set (stratified, seeded): the paper's *parametric binary
search* starts from C in {1e-6, 1e-4, ..., 1e6} and halves the interval around the best value
until it reaches 8 steps per decade. The chosen C is refitted on the whole training set and scored
top-1 (%) on the test split, which plays no part in the choice.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from compt.engine.loader import DataError
from compt.paradigms.clip.data.evalsets import ZeroShotTask

__all__ = [
    "ProbeConfig",
    "ProbeResult",
    "image_features",
    "choose_c",
    "fit_probe",
    "linear_probe",
    "probe_checkpoint",
]

_START_LOG10_C = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)  # App. A.3: 1e-6 .. 1e6, every 2 decades


@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe's settings (defaults: the CLIP paper's App. A.3)."""

    val_fraction: float = 0.2  # share of the training set held out to choose C (stratified)
    max_iter: int = 1000  # L-BFGS iterations per fit
    steps_per_decade: int = 8  # resolution at which the binary search over log10 C stops
    batch_size: int = 256  # images per feature-extraction batch
    seed: int = 0  # the validation split

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"probe.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        for name in ("max_iter", "steps_per_decade", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"probe.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ProbeResult:
    """A probe's outcome: the chosen C, every validation score the search saw, and test top-1 (%)."""

    c: float  # inverse L2 strength chosen on the validation split (sklearn's C = 1 / lambda)
    val_top1: tuple[tuple[float, float], ...]  # (C, validation top-1 %) for every C tried, by C
    test_top1: float
    train_top1: float  # of the refitted probe on the whole training set
    num_train: int
    num_test: int
    num_classes: int
    feature_dim: int
    not_converged: int  # fits that hit max_iter (scikit-learn's ConvergenceWarning, counted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def image_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """L2-normalized ``encode_image`` features ``[N, D]`` (float32), in eval mode, on the model's device."""
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        feats = [
            model.encode_image(images[i : i + batch_size].to(p.device, p.dtype), normalize=True).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(feats).numpy()


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> tuple[LogisticRegression, bool]:
    clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    return clf, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _top1(clf: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float((clf.predict(x) == y).mean()) if len(y) else 0.0


def choose_c(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    cfg: ProbeConfig = ProbeConfig(),
) -> tuple[float, dict[float, float], int]:
    """The C of the best validation top-1 by the paper's parametric binary search over log10 C.

    Returns ``(C, {C: validation top-1 %}, fits that did not converge)``. Among equal scores the
    smallest C (the strongest regularization) wins.
    """
    scores: dict[float, float] = {}
    failed = 0

    def score(log_c: float) -> None:
        nonlocal failed
        if log_c not in scores:
            clf, ok = _fit(train_x, train_y, 10.0**log_c, cfg.max_iter)
            scores[log_c], failed = _top1(clf, val_x, val_y), failed + (not ok)

    def best() -> float:
        return max(sorted(scores), key=lambda lc: scores[lc])  # max keeps the first (smallest) on ties

    for log_c in _START_LOG10_C:
        score(log_c)
    step = 2.0
    while step > 1.0 / cfg.steps_per_decade:
        step /= 2
        centre = best()
        for log_c in (centre - step, centre + step):
            if _START_LOG10_C[0] <= log_c <= _START_LOG10_C[-1]:
                score(log_c)
    return 10.0 ** best(), {10.0**lc: s for lc, s in sorted(scores.items())}, failed


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cfg: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    """Choose C on a validation split of the training features, refit on all of them, score the test ones."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    classes, counts = np.unique(train_y, return_counts=True)
    if len(classes) < 2:
        raise DataError(
            f"linear probe: the training set has {len(classes)} class(es); a classifier needs two"
        )
    if counts.min() < 2:
        few = [int(c) for c, n in zip(classes, counts, strict=True) if n < 2]
        raise DataError(
            f"linear probe: class(es) {few} have a single training image; each class needs at least 2 "
            "(one can be held out to choose the regularization)"
        )
    n_val = max(len(classes), round(cfg.val_fraction * len(train_y)))
    if len(train_y) - n_val < len(classes):
        raise DataError(
            f"linear probe: {len(train_y)} training images are too few to hold out {n_val} for validation "
            f"and keep all {len(classes)} classes in the rest; add images or lower probe.val_fraction"
        )
    fit_x, val_x, fit_y, val_y = train_test_split(
        train_x, train_y, test_size=n_val, stratify=train_y, random_state=cfg.seed
    )
    c, val_scores, failed = choose_c(fit_x, fit_y, val_x, val_y, cfg)
    clf, ok = _fit(train_x, train_y, c, cfg.max_iter)
    return ProbeResult(
        c=c,
        val_top1=tuple(val_scores.items()),
        test_top1=_top1(clf, test_x, test_y),
        train_top1=_top1(clf, train_x, train_y),
        num_train=len(train_y),
        num_test=len(test_y),
        num_classes=len(classes),
        feature_dim=int(train_x.shape[1]),
        not_converged=failed + (not ok),
    )


def _check_images(task: ZeroShotTask, image_size: int, split: str) -> None:
    shape = tuple(task.images.shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2:] != (image_size, image_size):
        raise DataError(
            f"linear probe: the {split} images are {shape[2:] if len(shape) == 4 else shape} but the member "
            f"takes {image_size}x{image_size}; load both splits at that size (load_splits(..., {image_size}))"
        )


def linear_probe(
    model: torch.nn.Module,
    image_size: int,
    train: ZeroShotTask,
    test: ZeroShotTask,
    cfg: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    """Linear-probe top-1 of a CLIP ``model`` (image tower frozen) on labelled ``train`` / ``test`` images."""
    _check_images(train, image_size, "train")
    _check_images(test, image_size, "test")
    if train.classnames != test.classnames:
        raise DataError(
            "linear probe: train and test splits have different classes; give both the same class folders"
        )
    train_x = image_features(model, train.images, cfg.batch_size)
    test_x = image_features(model, test.images, cfg.batch_size)
    return fit_probe(train_x, train.labels.numpy(), test_x, test.labels.numpy(), cfg)


def probe_checkpoint(
    path: str | Path,
    train_dir: str | Path,
    test_dir: str | Path,
    cfg: ProbeConfig = ProbeConfig(),
    device: str | torch.device = "cpu",
) -> tuple[ProbeResult, dict[str, Any]]:
    """Linear probe of a checkpoint, run folder or exported member on a train/test ImageFolder pair.

    Returns ``(result, info)``; ``info`` names the member and the file loaded (as ``compt eval``).
    """
    from compt.paradigms.clip.finetune.head import load_clip
    from compt.paradigms.clip.finetune.sets import load_splits

    model, model_cfg, info = load_clip(path)
    image_size = int(model_cfg["vision_cfg"].get("image_size", 224))
    train, test = load_splits(train_dir, test_dir, image_size)
    return linear_probe(model.to(device), image_size, train, test, cfg), {**info, "image_size": image_size}
