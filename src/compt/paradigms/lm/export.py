"""Export an LM member as a plain Hugging Face checkpoint (issue 14, item 1).

``export_lm`` writes ``save_pretrained``'s ``config.json`` + ``model.safetensors`` and the tokenizer as
a ``transformers`` fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``), so that::

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

load it with no compt installed and give the same logits. A tied member is saved with its one shared
matrix (safetensors drops ``lm_head.weight``) and re-tied by ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from compt.paradigms.lm.tokenizer import EOS, eos_id

__all__ = ["export_lm"]


def export_lm(model: nn.Module, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``, unwrapped) and ``tokenizer`` to ``out_dir``; returns it.

    ``tokenizer`` may be ``None`` (a token-file source without its tokenizer.json): the model alone.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"export_lm needs the transformers model itself, got {type(model).__name__}; unwrap DDP "
            "(.module) or torch.compile (._orig_mod) first"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
        fast.save_pretrained(out)
    model.save_pretrained(out)
    return out
