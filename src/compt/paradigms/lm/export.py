"""Export an LM member as a plain Hugging Face checkpoint (issue 14, item 1).

``export_lm`` writes ``save_pretrained``'s ``config.json`` + ``model.safetensors`` and the tokenizer as
a ``transformers`` fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``), so that::

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

load it with no compt installed and give the same logits. A tied member is saved with its one shared
matrix (safetensors drops ``lm_head.weight``) and re-tied by ``from_pretrained``.

The files are written to a temporary folder and moved in with ``config.json`` last, so a folder
holding ``config.json`` is a complete export (:func:`is_export_dir`) even if a run is killed mid-way.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer
from torch import nn

from compt.paradigms.lm.tokenizer import EOS, FILENAME, eos_id

__all__ = ["export_lm", "is_export_dir", "load_export"]

CONFIG_NAME = "config.json"  # save_pretrained's


@contextmanager
def _quiet():
    """No transformers progress bars (one per file saved or loaded) in a chain's log."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def export_lm(model: nn.Module, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``, unwrapped) and ``tokenizer`` to ``out_dir``; returns it.

    ``tokenizer`` may be ``None`` (a token-file source without its tokenizer.json): the model alone.
    """
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"export_lm needs the transformers model itself, got {type(model).__name__}; unwrap DDP "
            "(.module) or torch.compile (._orig_mod) first"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".export.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if tokenizer is not None:
        eos = eos_id(tokenizer)
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                f"{model.config.vocab_size} embedding rows; export the tokenizer the model was trained with"
            )
        # generate() stops at the document separator the model was trained on
        model.config.eos_token_id = eos
        model.generation_config.eos_token_id = eos
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
        fast.model_max_length = model.config.max_position_embeddings
        fast.save_pretrained(tmp)
    with _quiet():
        model.save_pretrained(tmp)
    files = sorted(tmp.iterdir(), key=lambda f: f.name == CONFIG_NAME)  # config.json last
    for f in files:
        os.replace(f, out / f.name)
    tmp.rmdir()
    return out


def check_target(out_dir: str | Path, model: nn.Module, *, force: bool = False) -> None:
    """Refuse an ``out_dir`` that is a file, or that holds the export of a model of another config,
    unless ``force`` (issue 11: an export silently replaced another model's)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export target {out} is a file; pass a folder")
    if force or not is_export_dir(out):
        return
    theirs = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    ours = model.config.to_dict()
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    differ = [k for k in keys if theirs.get(k) != ours.get(k)]
    if differ:
        what = ", ".join(f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in differ)
        raise ValueError(
            f"{out} holds the export of another model ({what}); choose another folder, or pass --force "
            "to replace it"
        )


def is_export_dir(path: str | Path) -> bool:
    """True when ``path`` holds a complete export of a Llama member (its ``config.json`` says llama)."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "llama"
    except (OSError, json.JSONDecodeError):
        return False


def load_export(path: str | Path) -> tuple[nn.Module, Tokenizer | None]:
    """``(model, tokenizer)`` of an export folder, loaded by transformers (tokenizer ``None`` if absent)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(path)
    tok = Tokenizer.from_file(str(path / FILENAME)) if (path / FILENAME).is_file() else None
    return model, tok
