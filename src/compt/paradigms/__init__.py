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
| ``teacher_features``, ``distance``, ``feature_dim`` | what distillation compares (Eq. 1) | embeddings |
| ``data_config``, ``build_loader``, ``num_samples`` | the training data | embedded set, CSV/TSV, webdataset |
| ``sample_cost``, ``cost_sample`` | training MACs of one sample (App. C.2) | 1 image + M captions |
| ``evaluator``, ``check_eval``, ``evaluate_checkpoint`` | evaluation | zero-shot, retrieval |
| ``higher_is_better``, ``lossless_tolerance``, ``metric_unit`` | comparing a metric | % up, nats down |
| ``export``, ``is_export_dir`` | export | open_clip ``local-dir:`` folder |
| ``shard_units`` | what FSDP2 shards as one unit (``train.parallel=fsdp2``) | the residual blocks |
| ``progressive_ops`` | AutoProg-One's stage models, growth, sub-nets | ViT depth and image resolution |

The built-in paradigms are ``clip`` (:mod:`compt.paradigms.clip`) and ``lm``
(:mod:`compt.paradigms.lm`, Llama-style language models).

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

from compt.lossless import LOSSLESS_NATS, LOSSLESS_POINTS, MetricRule, Tolerance

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
    "paradigm_of_path",
    "DEFAULT_PARADIGM",
]

# Checkpoints written before paradigms existed (compt <= 0.1) hold no "paradigm" entry: they are CLIP.
DEFAULT_PARADIGM = "clip"
_BUILTIN = {"clip": "compt.paradigms.clip", "lm": "compt.paradigms.lm"}
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
    # What a chain link may distill (``train.distill``), the first being the default: "feature" is
    # Eq. 1 on the paradigm's features through the projection T; "logit" a KL on the shared output space.
    distill_targets: ClassVar[tuple[str, ...]] = ("feature",)
    # The keywords of :meth:`sample_cost` (what ``compt plan`` may set per sample).
    sample_fields: ClassVar[tuple[str, ...]] = ()

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
    def student(self, model: nn.Module, projection: nn.Module, target: str = "feature") -> nn.Module:
        """The module the engine compiles and wraps in DDP (or shards): ``forward(*batch) -> dict``.

        The dict holds what :meth:`task_loss` reads and, under ``"distill"``, the student's features
        of distillation ``target`` (one of :attr:`distill_targets`), already mapped by the projection T
        (so DDP synchronizes T's gradients too). The module keeps ``model`` and ``projection`` as its
        ``.model`` and ``.projection`` (FSDP2 checkpoints read them by those names).
        """

    @abc.abstractmethod
    def task_loss(self, out: dict[str, Any], local_batch_size: int) -> torch.Tensor:
        """The task loss of a micro-batch from the student's ``out`` (see ``task_loss_is_global``)."""

    @abc.abstractmethod
    def teacher_features(
        self, teacher: nn.Module, batch: Batch, target: str = "feature"
    ) -> dict[str, torch.Tensor]:
        """The frozen teacher's features of ``batch``, keyed like the student's ``out["distill"]``."""

    def distance(self, target: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Eq. 1's unweighted distance of one feature pair (default: MSE of L2-normalized features)."""
        from compt.distill import feature_mse

        return feature_mse(student, teacher)

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

    def checkpoint_extras(self, data_cfg: Any) -> dict[str, Any]:
        """What a checkpoint carries besides the model so that it stands alone (e.g. a tokenizer)."""
        return {}

    def check_teacher(self, payload: Mapping[str, Any], data_cfg: Any, where: str) -> None:
        """Raise ``ValueError`` when the teacher checkpoint ``payload`` cannot teach a run on ``data_cfg``:
        by default, its :meth:`checkpoint_extras` must be this run's."""
        for key, value in self.checkpoint_extras(data_cfg).items():
            if payload.get(key) != value:
                raise ValueError(
                    f"teacher {where} was trained with another {key} than this run's; a chain link reads "
                    f"its teacher's batches, so every member of a chain must share it"
                )

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The sub-modules FSDP2 shards one by one (its blocks); the rest goes in the root unit."""
        raise ValueError(f"train.parallel=fsdp2 is not available for the {self.name} paradigm; use ddp")

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

    def bind_data(self, data_cfg: Any, out_dir: str) -> Any:
        """``data_cfg`` with run-relative defaults filled in for a run writing to ``out_dir``."""
        return data_cfg

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
        """``evaluate(model, step) -> metrics`` on this paradigm's held-out sets at ``member``'s size.

        ``options`` are the chain spec's ``eval.options`` and, for the evaluations during training,
        ``metrics``: the keys they need (only the sets those keys come from are evaluated; issue 12).
        """

    def check_eval(self, member: Member, **options: Any) -> None:
        """Raise ``ValueError`` now when :meth:`evaluator` with ``options`` would fail after training."""
        return None

    @abc.abstractmethod
    def check_metric(self, metric: str) -> None:
        """Raise ``ValueError`` when ``metric`` is not a key :meth:`evaluator` returns."""

    def higher_is_better(self, metric: str) -> bool:
        """Direction of ``metric`` (accuracies up, losses down)."""
        return True

    def lossless_tolerance(self, metric: str) -> Tolerance:
        """The shortfall against its twin on ``metric`` still lossless when the chain spec sets none.

        Default (compt.lossless): the paper's 0.5 points for a higher-is-better metric (a percentage),
        0.01 for a lower-is-better one (a loss in nats); a paradigm with other units overrides it.
        """
        return Tolerance(absolute=LOSSLESS_POINTS if self.higher_is_better(metric) else LOSSLESS_NATS)

    def metric_unit(self, metric: str) -> str:
        """The unit a report labels ``metric`` with ("%", "nats"; "" when unknown)."""
        return ""

    def metric_rule(self, metric: str, tolerance: Tolerance | None = None) -> MetricRule:
        """How ``metric`` is compared (direction, tolerance, unit); ``tolerance`` overrides the default."""
        return MetricRule(
            higher_is_better=self.higher_is_better(metric),
            tolerance=tolerance or self.lossless_tolerance(metric),
            unit=self.metric_unit(metric),
        )

    @abc.abstractmethod
    def evaluate_checkpoint(
        self, path: str | Path, **options: Any
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """``(metrics, info)`` of a checkpoint file, run folder or export (``compt eval``); ``info`` names
        the ``member`` and the ``source`` read. An option this paradigm does not take is a ``ValueError``."""

    @abc.abstractmethod
    def export(self, checkpoint: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
        """Write a checkpoint in its ecosystem's loadable layout; returns the folder.

        An ``out_dir`` holding another model's export is refused, naming it, unless ``force`` (issue 11).
        """

    def how_to_load(self, export_dir: str | Path) -> str:
        """One line telling a user how to load an export without compt."""
        return str(export_dir)

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


def paradigm_of_path(path: str | Path) -> Paradigm:
    """The paradigm of a checkpoint file, a run folder (its final.pt, else newest step_*.pt) or an export.

    Falls back to the default paradigm when the path says nothing (missing, unreadable, or written
    before paradigms existed), so that its loader raises the error that names the problem.
    """
    path = Path(path)
    if path.is_dir():
        found = paradigm_of_export(path)
        if found is not None:
            return found
        from compt.engine.checkpoint import latest_checkpoint

        path = path / "final.pt" if (path / "final.pt").is_file() else latest_checkpoint(path) or path
    if not path.is_file():
        return get_paradigm(None)
    try:  # mmap: only the small entries are read, not the weights
        payload = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # a damaged file: the paradigm's loader says what is wrong with it
        return get_paradigm(None)
    name = payload.get("paradigm") if isinstance(payload, dict) else None
    return get_paradigm(name if name in list_paradigms() else None)
