"""Task loss and distillation targets of the LM paradigm (issue 14, item 3).

- Task loss: next-token cross-entropy, the mean over every predicted position of a batch of windows
  ``[B, T + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``).
- Feature distillation, the paper's Eq. 1 carried over: the distance between the student's and the
  teacher's **final hidden state** (the output of the last RMSNorm, what the lm_head reads, one vector
  per position), both L2-normalized, the student's projected by ``T`` when the widths differ -- exactly
  :func:`compt.distill.feature_mse` and :func:`compt.distill.make_projection`. The lm_head only reads
  the RMS-normalized state, so its direction carries the knowledge, as CLIP's normalized embeddings do.
- Logit distillation (optional, beyond the paper): ``T^2 KL(p_t || p_s)`` at temperature ``T`` over the
  shared vocabulary, per position, as Knowledge Inheritance does (Qin et al. 2022: temperature 2).

Both return the *unweighted* distance ``D``: a link adds ``alpha * D`` to the task loss (Eq. 4), with
alpha fixed, ``"auto"`` (:class:`compt.distill.AutoAlpha`) or gated, as on the CLIP side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compt.distill import feature_mse

__all__ = ["LMOutput", "forward_lm", "next_token_loss", "feature_distance", "logit_distance"]


@dataclass
class LMOutput:
    """One forward pass over a batch of windows: the task loss and what distillation reads."""

    loss: torch.Tensor  # next-token cross-entropy (mean over positions, float32)
    hidden: torch.Tensor  # final hidden state [B, T, d] (after the last RMSNorm)
    logits: torch.Tensor  # [B, T, V]


def _split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"expected token windows [B, T + 1] with T >= 1, got shape {tuple(tokens.shape)}")
    return tokens[:, :-1], tokens[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` against ``targets [B, T]``, in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def forward_lm(model: nn.Module, tokens: torch.Tensor) -> LMOutput:
    """Run a ``LlamaForCausalLM`` on windows ``[B, T + 1]``: loss, final hidden state and logits.

    The model is called through its own ``forward`` (not ``model.model`` + ``model.lm_head``) so that
    wrappers hooked on the root module run: FSDP2's ``fully_shard`` all-gathers the root's parameters
    (embeddings, final norm, lm_head) in that hook. ``hidden_states[-1]`` is transformers' final
    hidden state after the last RMSNorm (its ``last_hidden_state``); the others are activations
    autograd keeps anyway.
    """
    inputs, targets = _split(tokens)
    out = model(input_ids=inputs, output_hidden_states=True)
    return LMOutput(next_token_loss(out.logits, targets), out.hidden_states[-1], out.logits)


def feature_distance(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: nn.Module
) -> torch.Tensor:
    """Eq. 1's distance on final hidden states: MSE of L2-normalized ``T(student)`` and teacher."""
    return feature_mse(projection(student_hidden), teacher_hidden)


def logit_distance(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over positions (float32).

    The ``T^2`` factor keeps the gradient's scale independent of ``T`` (Hinton et al. 2015).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; logit distillation needs the same tokenizer"
        )
    if not temperature > 0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
