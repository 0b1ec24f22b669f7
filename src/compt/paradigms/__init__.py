"""Pre-training paradigms: what differs between a CLIP family and another kind of family.

CoM-PT's chain is agnostic to the paradigm (paper §6): a member is trained, grown into the next one
(inverse weight initialization) and distilled into it (inverse feature distillation), whatever the
model. compt's shared layers — the chain (:mod:`compt.chain`), the training loop
(:mod:`compt.engine.train`), growth (:mod:`compt.grow`), cost accounting (:mod:`compt.cost`),
checkpoints, resume, logging and reports — know no paradigm. Everything that does differs lives
in one sub-package per paradigm behind one :class:`Paradigm` object:

| hook | what it answers | CLIP (:mod:`compt.paradigms.clip`) |
|---|---|---|
| ``member_class``, ``build``, ``validate_model_cfg`` | the members of its families | open_clip ``CLIP`` |
| ``layout`` | which axis of which tensor is which width (growth) | q/k/v per head, two towers |
| ``student``, ``task_loss``, ``after_step`` | one training step | multi-caption loss (Eq. 2-3) |
| ``teacher_features``, ``feature_dim`` | what distillation compares (Eq. 1) | image + text embeddings |
| ``data_config``, ``build_loader``, ``num_samples`` | the training data | embedded set, CSV/TSV, webdataset |
| ``sample_cost``, ``cost_sample`` | training MACs of one sample (App. C.2) | 1 image + M captions |
| ``evaluator``, ``check_eval``, ``export`` | evaluation, export | zero-shot, retrieval, open_clip folder |
| ``progressive_ops`` | AutoProg-One's stage models, growth, sub-nets | ViT depth and image resolution |

A paradigm is registered by name; the built-in ones are imported on first use, so importing this
module is cheap and never imports a paradigm's dependencies::

    @register_paradigm
    class MyParadigm(Paradigm):
        name = "my-paradigm"
        ...
"""

from __future__ import annotations

import abc
import difflib
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from compt.cost import MemberCost
    from compt.engine.progressive_train import ProgressiveOps
    from compt.families import Member
    from compt.grow.layout import GrowLayout

__all__ = [
    "Paradigm",
    "register_paradigm",
    "get_paradigm",
    "list_paradigms",
    "load_builtins",
    "paradigm_of_model",
    "paradigm_of_export",
    "DEFAULT_PARADIGM",
]

# Checkpoints written before paradigms existed (compt <= 0.1) hold no "paradigm" entry: they are CLIP.
DEFAULT_PARADIGM = "clip"
_BUILTIN = {"clip": "compt.paradigms.clip"}
_REGISTRY: dict[str, Paradigm] = {}

Batch = tuple[torch.Tensor, ...]
Evaluate = Callable[[nn.Module, int], dict[str, float]]


class Paradigm(abc.ABC):
    """One kind of pre-training: what the shared layers ask of a family's members (module docstring)."""

    name: ClassVar[str]
    member_class: ClassVar[type[Member]]  # the Member subclass of its families
    data_config: ClassVar[type]  # the frozen dataclass of a run's `data:` section
    layout: ClassVar[GrowLayout]  # how its state dicts grow (compt.grow)
    # True when the task loss is one global-batch value on every rank whose graph reaches only the
    # local features (CLIP's gathered contrastive loss): DDP averages gradients over ranks, so the
    # engine multiplies such a loss by the world size. False for a plain per-rank mean (e.g. an LM).
    task_loss_is_global: ClassVar[bool] = False

    # --- members ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def build(self, model_cfg: Mapping[str, Any], device: torch.device | str | None = None) -> nn.Module:
        """A freshly initialized model of ``model_cfg`` (``device='meta'``: no memory)."""

    @abc.abstractmethod
    def validate_model_cfg(self, cfg: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError`` naming ``where`` and the field when ``cfg`` is not a model config."""

    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` (unwrapped) is one of this paradigm's models."""
        return False

    # --- one training step -------------------------------------------------------------------------

    @abc.abstractmethod
    def student(self, model: nn.Module, projection: nn.Module) -> nn.Module:
        """The module the engine compiles and wraps in DDP: ``forward(*batch) -> dict``.

        The dict holds what :meth:`task_loss` reads and, under ``"distill"``, the student's features
        for Eq. 1, already mapped by the projection T (so DDP synchronizes T's gradients too).
        """

    @abc.abstractmethod
    def task_loss(self, out: dict[str, Any], local_batch_size: int) -> torch.Tensor:
        """The task loss of a micro-batch from the student's ``out`` (see ``task_loss_is_global``)."""

    @abc.abstractmethod
    def teacher_features(self, teacher: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """The frozen teacher's features of ``batch``, keyed like the student's ``out["distill"]``."""

    def teacher_task_loss(
        self, teacher: dict[str, torch.Tensor], out: dict[str, Any], local_batch_size: int
    ) -> torch.Tensor:
        """The teacher's task loss on the batch, from its features (for the distillation gate)."""
        raise ValueError(f"train.distill_gate is not defined for the {self.name} paradigm; set it to false")

    def after_step(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Work after each optimizer step (e.g. clamping CLIP's temperature); returns stats to log."""
        return {}

    @abc.abstractmethod
    def feature_dim(self, member: Member) -> int:
        """Width of the features distilled (the projection T maps the student's to the teacher's)."""

    def check_link(self, teacher: Member, student: Member, where: str) -> None:
        """Raise ``ValueError`` when ``teacher`` cannot teach ``student`` (they read one batch)."""
        return None

    def default_eps(self, member: Member) -> float:
        """AdamW's eps when the run does not set one."""
        return 1e-8

    def progressive_ops(self) -> ProgressiveOps | None:
        """AutoProg-One's model operations on this paradigm's members (``train.progressive``); ``None``:
        the paradigm has no progressive training."""
        return None

    # --- data ----------------------------------------------------------------------------------------

    @abc.abstractmethod
    def build_loader(
        self,
        data_cfg: Any,
        member: Member,
        *,
        global_batch_size: int,
        rank: int,
        world_size: int,
        epoch: int,
        start_step: int,
    ):
        """The per-rank loader of one epoch from ``start_step`` (``len()`` = steps in a full epoch)."""

    def data_flag(self, value: str) -> dict[str, Any]:
        """The data-config fields of ``compt train --data VALUE`` (a kind name, a file, ...)."""
        return {"kind": value}

    def check_data(self, data_cfg: Any, member: Member) -> None:
        """Raise ``ValueError`` when ``member`` cannot read ``data_cfg``'s batches."""
        return None

    def num_samples(self, data_cfg: Any, member: Member) -> int | None:
        """Samples in one epoch of ``data_cfg`` as ``member`` reads them; ``None``: known only by loading.

        Called before anything trains (``compt.chain.load_spec``, ``compt plan SPEC``), so it also
        raises ``ValueError`` for a config that cannot be read at all (an unknown kind, a missing file).
        """
        return None

    # --- cost ----------------------------------------------------------------------------------------

    @abc.abstractmethod
    def sample_cost(self, member: Member, **sample: Any) -> MemberCost:
        """Per-sample forward/training MACs of ``member`` (App. C.2); ``sample`` says what a sample is."""

    def cost_sample(self, data_cfg: Any) -> dict[str, Any]:
        """The :meth:`sample_cost` keywords of one training sample of ``data_cfg``."""
        return {}

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        """Parameter counts of ``model``: ``total``, plus whatever parts the paradigm names."""
        return {"total": sum(p.numel() for p in model.parameters())}

    def describe_sample(self, sample: Mapping[str, Any]) -> str:
        """One training sample in words (``compt plan`` prints it), from ``MemberCost.sample``."""
        return ", ".join(f"{k} {v}" for k, v in sample.items())

    # --- evaluation and export -----------------------------------------------------------------------

    @abc.abstractmethod
    def evaluator(self, member: Member, *, data_cfg: Any = None, **options: Any) -> Evaluate:
        """``evaluate(model, step) -> metrics`` on this paradigm's held-out sets at ``member``'s size."""

    def check_eval(self, member: Member, **options: Any) -> None:
        """Raise ``ValueError`` now when :meth:`evaluator` with ``options`` would fail after training."""
        return None

    @abc.abstractmethod
    def check_metric(self, metric: str) -> None:
        """Raise ``ValueError`` when ``metric`` is not a key :meth:`evaluator` returns."""

    def higher_is_better(self, metric: str) -> bool:
        """Direction of ``metric`` (accuracies up, losses down)."""
        return True

    @abc.abstractmethod
    def export(self, checkpoint: str | Path, out_dir: str | Path) -> Path:
        """Write a checkpoint in its ecosystem's loadable layout; returns the folder."""

    @abc.abstractmethod
    def is_export_dir(self, path: str | Path) -> bool:
        """Whether ``path`` is a complete export of this paradigm."""


def register_paradigm(cls: type[Paradigm]) -> type[Paradigm]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"paradigm {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def load_builtins() -> None:
    """Import the built-in paradigms (each registers itself and its families)."""
    for module in _BUILTIN.values():
        importlib.import_module(module)


def list_paradigms() -> list[str]:
    load_builtins()
    return sorted(_REGISTRY)


def get_paradigm(name: str | None) -> Paradigm:
    """The registered paradigm ``name`` (``None``: the default, for files older than paradigms)."""
    name = name or DEFAULT_PARADIGM
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        known = list_paradigms()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown paradigm {name!r}.{hint} Known: {', '.join(known)}")
    return _REGISTRY[name]


def paradigm_of_model(model: nn.Module) -> Paradigm:
    """The paradigm whose models ``model`` is one of; ``ValueError`` when none claims it."""
    for name in list_paradigms():
        if _REGISTRY[name].owns(model):
            return _REGISTRY[name]
    raise ValueError(
        f"a {type(model).__name__} is not a model of any paradigm ({', '.join(list_paradigms())})"
    )


def paradigm_of_export(path: str | Path) -> Paradigm | None:
    """The paradigm of the export folder ``path``, or ``None`` when it is not a complete export."""
    for name in list_paradigms():
        if _REGISTRY[name].is_export_dir(path):
            return _REGISTRY[name]
    return None
