"""The CLIP paradigm (the paper's own): open_clip models, multi-caption contrastive loss, image-caption data.

One module per concept: ``families`` (members and the registered ViT / Swin / tiny / debug
families), ``layout`` (how a CLIP state dict grows), ``task`` and ``loss`` (one training step,
Eq. 1-4), ``data/`` (embedded set, CSV/TSV, webdataset, evaluation sets), ``cost`` (one sample's
MACs), ``evaluate`` (zero-shot and retrieval) and ``export`` (open_clip's ``local-dir:`` folder).
:class:`ClipParadigm` is the one object the shared layers talk to.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compt.paradigms import Paradigm, register_paradigm
from compt.paradigms.clip import cost, task
from compt.paradigms.clip.data import DataConfig
from compt.paradigms.clip.families import ClipMember, validate_model_cfg
from compt.paradigms.clip.layout import LAYOUT

__all__ = ["ClipParadigm"]

# What eval.options may set (compt.paradigms.clip.evaluate.build_evaluator's keywords the chain leaves).
_EVAL_OPTIONS = ("num_images", "val_images", "val_batch_size", "batch_size", "embedded")
_METRIC_HINT = (
    "use mean_zeroshot_top1, mean_retrieval_r1, val_loss, zeroshot/<task>/top1, "
    "retrieval/<set>/{i2t,t2i}_r{1,5,10} or val/<set>/loss"
)


@register_paradigm
class ClipParadigm(Paradigm):
    """CLIP pre-training as in CoM-PT (§3.2): image + M captions per sample, contrastive task loss."""

    name = "clip"
    member_class = ClipMember
    data_config = DataConfig
    layout = LAYOUT
    task_loss_is_global = True  # Eq. 2-3 over the gathered global batch (compt.paradigms.clip.loss)
    sample_fields = ("num_captions",)

    def build(self, model_cfg: Mapping[str, Any], device: torch.device | str | None = None) -> nn.Module:
        from open_clip.model import CLIP

        with torch.device(device if device is not None else "cpu"):
            return CLIP(**dict(model_cfg))

    def validate_model_cfg(self, cfg: Mapping[str, Any], where: str) -> None:
        validate_model_cfg(cfg, where)

    def owns(self, model: nn.Module) -> bool:
        from open_clip.model import CLIP

        return isinstance(model, CLIP)

    def student(self, model: nn.Module, projection: nn.Module, target: str = "feature") -> nn.Module:
        return task.StudentForward(model, projection)

    def task_loss(self, out: dict[str, Any], local_batch_size: int) -> torch.Tensor:
        return task.task_loss(out, local_batch_size)

    def teacher_features(
        self, teacher: nn.Module, batch: tuple[torch.Tensor, ...], target: str = "feature"
    ) -> dict[str, torch.Tensor]:
        return task.teacher_features(teacher, *batch)

    def teacher_task_loss(
        self, teacher: dict[str, torch.Tensor], out: dict[str, Any], local_batch_size: int
    ) -> torch.Tensor:
        return task.teacher_task_loss(teacher, out, local_batch_size)

    def after_step(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return task.clamp_temperature(model)

    def feature_dim(self, member: ClipMember) -> int:
        return int(member.model_cfg["embed_dim"])

    def check_link(self, teacher: ClipMember, student: ClipMember, where: str) -> None:
        for what in ("image_size", "context_length"):
            if getattr(teacher, what) != getattr(student, what):
                raise ValueError(
                    f"teacher {where} ({teacher.name}) has {what} {getattr(teacher, what)} but the student "
                    f"{student.name} has {getattr(student, what)}; a link feeds both the same batch, so "
                    "they must match"
                )

    def progressive_ops(self):
        from compt.paradigms.clip.progressive import ClipProgressive

        return ClipProgressive()  # stateless: one per call is fine

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        from open_clip.transformer import ResidualAttentionBlock
        from timm.models.swin_transformer import SwinTransformerBlock

        # The residual blocks of both towers (open_clip's ViT and text transformers, timm's Swin).
        return [m for m in model.modules() if isinstance(m, (ResidualAttentionBlock, SwinTransformerBlock))]

    def default_eps(self, member: ClipMember) -> float:
        # The official code (OpenCLIP's defaults): 1e-6 for ViT towers, 1e-8 otherwise; Table C
        # prints 1e-8 for both, the code the paper's numbers come from uses 1e-6 for ViTs.
        return 1e-6 if member.vision_kind == "vit" else 1e-8

    def build_loader(self, data_cfg: DataConfig, member: ClipMember, **where: int):
        from compt.paradigms.clip.data import build_loader

        return build_loader(
            data_cfg, image_size=member.image_size, context_length=member.context_length, **where
        )

    def check_data(self, data_cfg: DataConfig, member: ClipMember) -> None:
        from compt.paradigms.clip.data import tokenizer

        # Caught here, not as an IndexError deep in the first forward pass.
        vocab, need = member.text_cfg.get("vocab_size", 49408), tokenizer(2).vocab_size
        if vocab < need:
            raise ValueError(
                f"member {member.name} has text_cfg.vocab_size={vocab}, but compt's data uses open_clip's "
                f"tokenizer with {need} token ids; set vocab_size: {need} in its family definition"
            )

    def num_samples(self, data_cfg: DataConfig, member: ClipMember) -> int:
        from compt.paradigms.clip.data import StreamDataset, build_dataset

        # Built once and cached by build_dataset: the trainer reuses it, so a table is read only once.
        dataset = build_dataset(data_cfg, image_size=member.image_size, context_length=member.context_length)
        return int(dataset.num_samples) if isinstance(dataset, StreamDataset) else len(dataset)

    def data_flag(self, value: str) -> dict[str, Any]:
        """``compt train --data``: a registered kind, a CSV/TSV table or webdataset shards."""
        from compt.paradigms.clip.data import list_datasets

        if value in list_datasets():
            return {"kind": value}
        low = value.lower()
        if low.endswith((".csv", ".tsv")):
            if not Path(value).is_file():
                raise FileNotFoundError(f"--data {value}: no such file")
            return {
                "kind": low[-3:],
                "path": value,
                **({"csv_separator": ","} if low.endswith(".csv") else {}),
            }
        if ".tar" in low:
            return {"kind": "wds", "path": value}
        raise ValueError(
            f"--data {value!r}: expected one of {', '.join(list_datasets())}, a .csv/.tsv table "
            "or .tar shards"
        )

    def sample_cost(self, member: ClipMember, *args: Any, **sample: Any):
        return cost.sample_cost(member, *args, **sample)

    def cost_sample(self, data_cfg: DataConfig) -> dict[str, Any]:
        return {"num_captions": data_cfg.num_captions}

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        return cost.param_counts(model)

    def describe_sample(self, sample: Mapping[str, Any]) -> str:
        return f"{sample.get('images', 1)} image + {sample.get('captions', '?')} captions"

    def evaluator(
        self,
        member: ClipMember,
        *,
        data_cfg: DataConfig | None = None,
        imagefolders: tuple[str, ...] = (),
        seed: int = 0,
        **options: Any,
    ):
        from compt.paradigms.clip.evaluate import build_evaluator

        return build_evaluator(
            member.image_size,
            member.context_length,
            imagefolders=imagefolders,
            seed=seed,
            spec=data_cfg.synthetic if data_cfg is not None else None,  # held-out scenes, same vocabulary
            **options,
        )

    def check_eval(self, member: ClipMember, *, imagefolders: tuple[str, ...] = (), **options: Any) -> None:
        import difflib

        for key, value in options.items():  # eval.options: build_evaluator's keywords
            if key not in _EVAL_OPTIONS:
                close = difflib.get_close_matches(key, _EVAL_OPTIONS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"eval.options: unknown option {key!r}; {hint}"
                    f"CLIP's evaluator takes {', '.join(_EVAL_OPTIONS)}"
                )
            least = 0 if key == "val_images" else 1  # val_images 0: no validation set
            whole = isinstance(value, int) and not isinstance(value, bool)
            if key == "embedded" and not isinstance(value, bool):
                raise ValueError(f"eval.options.embedded must be true or false, got {value!r}")
            if key != "embedded" and not (whole and value >= least):
                raise ValueError(f"eval.options.{key} must be a whole number >= {least}, got {value!r}")
        # The sets are read after training; a folder that is not there would fail only then.
        for folder in map(Path, imagefolders):
            if not folder.is_dir():
                raise ValueError(
                    f"eval.imagefolders: {folder} does not exist (expected a folder with one sub-folder "
                    "of images per class); fix the path or remove it"
                )
            if not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
                raise ValueError(
                    f"eval.imagefolders: {folder} has no class sub-folders (expected {folder}/<class>/*.jpg)"
                )

    def check_metric(self, metric: str) -> None:
        # compt.paradigms.clip.evaluate's keys; a typo here would make until_lossless wait forever.
        if metric not in ("mean_zeroshot_top1", "mean_retrieval_r1", "val_loss") and not metric.startswith(
            ("zeroshot/", "retrieval/", "val/")
        ):
            raise ValueError(f"{metric!r} is not a metric compt computes for CLIP; {_METRIC_HINT}")

    def higher_is_better(self, metric: str) -> bool:
        from compt.paradigms.clip.evaluate import higher_is_better

        return higher_is_better(metric)

    def metric_unit(self, metric: str) -> str:
        return "%" if self.higher_is_better(metric) else "nats"  # evaluate's module docstring

    def evaluate_checkpoint(
        self,
        path: str | Path,
        *,
        imagefolders: tuple[str, ...] = (),
        embedded: bool = True,
        seed: int = 0,
        num_images: int | None = None,
        batch_size: int = 256,
        device: str = "cpu",
        **unknown: Any,
    ) -> tuple[dict[str, float], dict[str, Any]]:
        from compt.paradigms.clip.evaluate import evaluate_checkpoint

        if unknown:
            raise ValueError(f"{path} is a CLIP model: {', '.join(sorted(unknown))} does not apply to it")
        metrics, info = evaluate_checkpoint(
            path,
            imagefolders=imagefolders,
            embedded=embedded,
            seed=seed,
            num_images=num_images,
            batch_size=batch_size,
            device=device,
        )
        return metrics, info | {"setting": f"{info['image_size']} px, context {info['context_length']}"}

    def export(self, checkpoint: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
        from compt.paradigms.clip.export import export_member

        return export_member(checkpoint, out_dir, force=force)

    def how_to_load(self, export_dir: str | Path) -> str:
        return f"open_clip: 'local-dir:{export_dir}'"

    def is_export_dir(self, path: str | Path) -> bool:
        from compt.paradigms.clip.export import is_export_dir

        return is_export_dir(path)
