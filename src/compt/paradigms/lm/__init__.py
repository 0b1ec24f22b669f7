"""The language-model paradigm (issue 14): Llama-style decoders trained as a chain on next-token prediction.

CoM-PT's authors call the method agnostic to the paradigm and name LLM pre-training as its next place
(paper §6). One module per concept: ``models`` (``LlamaForCausalLM`` members, MACs), ``families``
(``llama-cpu``, ``llama``), ``layout`` (how a Llama state dict grows: heads with head_dim fixed, GQA
groups, the tie), ``task`` and ``loss`` (one step: cross-entropy, feature or logit distillation),
``tokenizer`` and ``data`` (the embedded standard-library corpus, text folders, token files),
``evaluate`` (validation loss, bits per byte) and ``export`` (a Hugging Face folder).
:class:`LMParadigm` is the one object the shared layers talk to.

A run's tokenizer and token streams live in ``data.cache_dir`` (default ``<out_dir>/data``: beside a
``compt train`` run, or beside all members of a chain, which therefore share one tokenizer). Every
checkpoint carries its tokenizer (``payload["tokenizer"]``), so a checkpoint alone exports and
evaluates, and a chain link refuses a teacher trained with another tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compt.cost import MemberCost
from compt.engine import dist
from compt.paradigms import Paradigm, register_paradigm
from compt.paradigms.lm import task
from compt.paradigms.lm.data import LMData, LMDataConfig, prepare_data
from compt.paradigms.lm.families import LMMember, validate_model_cfg
from compt.paradigms.lm.layout import LAYOUT

__all__ = ["LMParadigm", "LMMember", "LMDataConfig"]

METRICS = ("val_loss", "val_bpb")  # both lower is better


@lru_cache(maxsize=8)
def _prepared(cfg: LMDataConfig) -> LMData:
    """``cfg``'s token streams, once per process; rank 0 builds the cache while the others wait."""
    if cfg.cache_dir is None:
        raise ValueError("data.cache_dir is not set; the run (or chain) fills it in as <out_dir>/data")
    if not dist.is_main():
        dist.barrier()  # rank 0 trains the tokenizer and writes the token files once
    data = prepare_data(cfg, cfg.cache_dir)
    if dist.is_main():
        dist.barrier()
    return data


@lru_cache(maxsize=8)
def _num_ids(cfg: LMDataConfig) -> int:
    """Token ids the data may hold: the tokenizer's size, or past the largest id of token files."""
    data = _prepared(cfg)
    if data.tokenizer is not None:
        return data.tokenizer.get_vocab_size()
    return int(max(data.train.max(), data.val.max())) + 1  # one pass over the memory-mapped files


def _sha(text: str | None) -> str:
    return "none" if text is None else hashlib.sha256(text.encode()).hexdigest()[:12]


def _tokenizer_json(data: LMData) -> str | None:
    return None if data.tokenizer is None else data.tokenizer.to_str()


def _with_tokenizer(cfg: LMDataConfig, tokenizer_json: str | None, where: str) -> LMData:
    """``cfg``'s data encoded with a checkpoint's own tokenizer (seeding an empty cache with it)."""
    from tokenizers import Tokenizer

    from compt.paradigms.lm.tokenizer import FILENAME, save_tokenizer

    cached = Path(cfg.cache_dir) / FILENAME
    if tokenizer_json is not None and not cached.is_file():
        save_tokenizer(Tokenizer.from_str(tokenizer_json), cfg.cache_dir)
    data = _prepared(cfg)
    if tokenizer_json is not None and _tokenizer_json(data) != tokenizer_json:
        raise ValueError(
            f"{where} was trained with tokenizer {_sha(tokenizer_json)} but {cached} is "
            f"{_sha(_tokenizer_json(data))}; pass --data to evaluate on other text"
        )
    return data


@register_paradigm
class LMParadigm(Paradigm):
    """Causal language modelling: windows of ``seq_len + 1`` tokens, next-token cross-entropy."""

    name = "lm"
    member_class = LMMember
    data_config = LMDataConfig
    layout = LAYOUT
    task_loss_is_global = False  # a per-rank mean: DDP's gradient average is the global mean
    distill_targets = task.TARGETS
    sample_fields = ("seq_len",)

    # --- members ---------------------------------------------------------------------------------

    def build(self, model_cfg: Mapping[str, Any], device: torch.device | str | None = None) -> nn.Module:
        from compt.paradigms.lm.models import build_model

        return build_model(model_cfg, device)

    def validate_model_cfg(self, cfg: Mapping[str, Any], where: str) -> None:
        validate_model_cfg(cfg, where)

    def owns(self, model: nn.Module) -> bool:
        from transformers import LlamaForCausalLM

        return isinstance(model, LlamaForCausalLM)

    # --- one training step -----------------------------------------------------------------------

    def student(self, model: nn.Module, projection: nn.Module, target: str = "feature") -> nn.Module:
        return task.StudentForward(model, projection, target)

    def task_loss(self, out: dict[str, Any], local_batch_size: int) -> torch.Tensor:
        return out["loss"]

    def teacher_features(
        self, teacher: nn.Module, batch: tuple[torch.Tensor, ...], target: str = "feature"
    ) -> dict[str, torch.Tensor]:
        return task.teacher_features(teacher, *batch, target=target)

    def distance(self, target: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if target == "logit":
            from compt.paradigms.lm.loss import logit_distance

            return logit_distance(student, teacher)
        return super().distance(target, student, teacher)

    def feature_dim(self, member: LMMember) -> int:
        return member.width

    def check_link(self, teacher: LMMember, student: LMMember, where: str) -> None:
        if teacher.vocab_size != student.vocab_size:
            raise ValueError(
                f"teacher {where} ({teacher.name}) has vocab_size {teacher.vocab_size} but the student "
                f"{student.name} has {student.vocab_size}; a chain shares one tokenizer"
            )

    def checkpoint_extras(self, data_cfg: LMDataConfig) -> dict[str, Any]:
        return {"tokenizer": _tokenizer_json(_prepared(data_cfg))}

    def check_teacher(self, payload: Mapping[str, Any], data_cfg: LMDataConfig, where: str) -> None:
        ours = _tokenizer_json(_prepared(data_cfg))
        theirs = payload.get("tokenizer")
        if theirs != ours:
            raise ValueError(
                f"teacher {where} was trained with tokenizer {_sha(theirs)}, this run's "
                f"({data_cfg.cache_dir}) is {_sha(ours)}; every member of a chain must use the same "
                "tokenizer: set data.cache_dir to the teacher's run data folder"
            )

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)  # the decoder layers; embeddings, final norm, lm_head: the root

    # --- data ------------------------------------------------------------------------------------

    def bind_data(self, data_cfg: LMDataConfig, out_dir: str) -> LMDataConfig:
        if data_cfg.cache_dir is not None:
            return data_cfg
        return replace(data_cfg, cache_dir=str(Path(out_dir) / "data"))

    def build_loader(
        self, data_cfg: LMDataConfig, member: LMMember, *, pin_memory: bool = False, **where: int
    ):
        from compt.paradigms.lm.data import TokenLoader, TokenWindows

        data = _prepared(data_cfg)
        windows = TokenWindows(data.train, data_cfg.seq_len, "the training split")
        loader = TokenLoader(windows, seed=data_cfg.seed, source=data_cfg.source, **where)
        loader.pin_memory = pin_memory
        return loader

    def data_flag(self, value: str) -> dict[str, Any]:
        """``compt train --data``: ``stdlib``, a folder of .txt/.jsonl, or a folder of train.bin/val.bin."""
        if value == "stdlib":
            return {"source": "stdlib"}
        path = Path(value)
        if path.is_dir() and (path / "train.bin").is_file():
            tok = path / "tokenizer.json"
            return {"source": "tokens", "path": value, "tokenizer": str(tok) if tok.is_file() else "none"}
        if path.is_dir():
            return {"source": "text", "path": value}
        raise ValueError(
            f"--data {value!r}: expected stdlib, a folder of .txt/.jsonl files or a folder holding "
            "train.bin and val.bin"
        )

    def check_data(self, data_cfg: LMDataConfig, member: LMMember) -> None:
        if data_cfg.seq_len > member.context_length:
            raise ValueError(
                f"data.seq_len={data_cfg.seq_len} exceeds {member.name}'s max_position_embeddings "
                f"{member.context_length}; use a smaller data.seq_len"
            )
        # Caught here, not as an IndexError deep in the first forward pass (lm-report problem 7).
        ids = _num_ids(data_cfg)
        if ids > member.vocab_size:
            what = (
                "the tokenizer has" if _prepared(data_cfg).tokenizer is not None else "the token files hold"
            )
            raise ValueError(
                f"{what} {ids} token ids but {member.name} has vocab_size {member.vocab_size}; train a "
                f"member with vocab_size >= {ids} or a smaller tokenizer (data.vocab_size)"
            )

    # --- cost ------------------------------------------------------------------------------------

    def sample_cost(self, member: LMMember, seq_len: int | None = None) -> MemberCost:
        """One sample is a window of ``seq_len`` tokens (default: the member's context length)."""
        from compt.paradigms.lm.models import sample_macs

        seq_len = member.context_length if seq_len is None else seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ValueError(f"seq_len (tokens per sample) must be a positive integer, got {seq_len!r}")
        m = sample_macs(member.model_cfg, seq_len)
        return MemberCost(
            name=member.name,
            params={"total": m["params"], "total_no_embed": m["params_no_embed"]},
            sample={"tokens": seq_len},
            forward_macs=m["forward_macs"],
            first_layer_macs=0,  # the token lookup (Eq. 6's first layer) is not a matmul
            train_macs=m["train_macs"],
            update_macs=m["update_macs"],
        )

    def cost_sample(self, data_cfg: LMDataConfig) -> dict[str, Any]:
        return {"seq_len": data_cfg.seq_len}

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        total = sum(p.numel() for p in model.parameters())  # a tied matrix once
        return {"total": total, "total_no_embed": total - model.get_input_embeddings().weight.numel()}

    def describe_sample(self, sample: Mapping[str, Any]) -> str:
        return f"a window of {sample.get('tokens', '?')} tokens"

    # --- evaluation and export -------------------------------------------------------------------

    def evaluator(
        self, member: LMMember, *, data_cfg: LMDataConfig | None = None, batch_size: int = 16, **options
    ):
        from compt.paradigms.lm.data import eval_windows
        from compt.paradigms.lm.evaluate import evaluate_lm

        if data_cfg is None:
            raise ValueError("the LM evaluator needs the run's data config (its validation split)")
        data = _prepared(data_cfg)
        windows = eval_windows(data.val, data_cfg.seq_len, data_cfg.eval_windows)

        def evaluate(model: nn.Module, step: int) -> dict[str, float]:
            metrics = evaluate_lm(model, windows, data.token_bytes, batch_size)
            return {k: metrics[k] for k in METRICS}

        return evaluate

    def check_metric(self, metric: str) -> None:
        if metric not in METRICS:
            raise ValueError(
                f"eval.metric {metric!r} is not a metric compt computes for LMs; use {' or '.join(METRICS)}"
            )

    def higher_is_better(self, metric: str) -> bool:
        return metric not in METRICS  # losses and bits per byte go down

    def metric_unit(self, metric: str) -> str:
        return {"val_loss": "nats", "val_bpb": "bits/byte"}.get(metric, "")

    def evaluate_checkpoint(
        self,
        path: str | Path,
        *,
        data: str | None = None,
        num_windows: int | None = None,
        batch_size: int = 16,
        device: str = "cpu",
        **unknown: Any,
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Validation loss and bits per byte of a checkpoint (on its run's data, or on ``data``, a
        ``--data`` value) or of an export (on ``data``, default the stdlib corpus, tokenized once into a
        temporary folder named after the export's tokenizer)."""
        import tempfile

        from tokenizers import Tokenizer

        from compt.config import from_dict

        if unknown:
            raise ValueError(f"{path} is a language model: {', '.join(sorted(unknown))} does not apply to it")
        model, tok_json, info, cfg = self._load(path)
        if data is not None or cfg is None:
            cfg = from_dict(LMDataConfig, self.data_flag(data or "stdlib"), where="--data")
            # windows as long as the model reads, tokenized by its own tokenizer
            seq_len = min(cfg.seq_len, int(info["model_cfg"]["max_position_embeddings"]))
            vocab = cfg.vocab_size if tok_json is None else Tokenizer.from_str(tok_json).get_vocab_size()
            key = _sha(f"{tok_json}{data}")
            cache = Path(tempfile.gettempdir()) / f"compt-eval-{key}"
            cfg = replace(cfg, seq_len=seq_len, vocab_size=vocab, cache_dir=str(cache))
        if num_windows is not None:
            cfg = replace(cfg, eval_windows=num_windows)
        _with_tokenizer(cfg, tok_json, info["source"])
        member = LMMember(name=info["member"] or "?", family="", model_cfg=info.pop("model_cfg"))
        self.check_data(cfg, member)
        metrics = self.evaluator(member, data_cfg=cfg, batch_size=batch_size)(model.to(device), -1)
        return metrics, info | {
            "setting": f"{cfg.source} validation, {cfg.eval_windows} x {cfg.seq_len} tokens"
        }

    def _load(self, path: str | Path):
        """``(model, tokenizer json, info, data config or None)`` of a checkpoint, run folder or export."""
        from compt.config import from_dict
        from compt.engine.checkpoint import model_from_checkpoint, resolve_checkpoint
        from compt.paradigms.lm.export import is_export_dir, load_export

        if is_export_dir(path):
            model, tok = load_export(path)
            cfg = LAYOUT.hints_from_model(model, "export")  # the member's model_cfg fields
            info = {"member": None, "source": str(path), "format": "export", "model_cfg": cfg}
            return model, None if tok is None else tok.to_str(), info, None
        file = resolve_checkpoint(path)
        model, payload = model_from_checkpoint(file)
        data = (payload.get("config") or {}).get("data")
        cfg = from_dict(LMDataConfig, data, where=f"{file} data") if data else None
        info = {"member": payload.get("member"), "source": str(file), "format": "checkpoint"}
        return model, payload.get("tokenizer"), info | {"model_cfg": payload["model_cfg"]}, cfg

    def export(self, checkpoint: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
        from tokenizers import Tokenizer

        from compt.paradigms.lm.export import check_target, export_lm

        model, tok_json, _, _ = self._load(checkpoint)
        check_target(out_dir, model, force=force)
        return export_lm(model, None if tok_json is None else Tokenizer.from_str(tok_json), out_dir)

    def is_export_dir(self, path: str | Path) -> bool:
        from compt.paradigms.lm.export import is_export_dir

        return is_export_dir(path)

    def how_to_load(self, export_dir: str | Path) -> str:
        return f"transformers: AutoModelForCausalLM.from_pretrained({str(export_dir)!r})"
