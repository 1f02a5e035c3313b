"""The output head, computed only where a loss reads it or never built whole: the kernels under both the training
losses (`trainer.losses`) and the evaluation metrics (`evals`).

A causal LM's logits are ``lm_head(hidden)``, ``batch x length x vocabulary``: on a 152k or 262k vocabulary the
largest tensor of a step. :class:`HeadInput` holds them as the head's input and frozen weight instead, taken with
:func:`head_input_taken`; :mod:`ops.token_values` reads per-token values from it chunk by chunk.
:func:`kept_positions` chooses the positions whose logits some loss reads at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dataset.encoding import IGNORE_INDEX

__all__ = ["FUSABLE_ARCHITECTURES", "HeadInput", "accepts_logits_to_keep", "fusable_head", "gathered",
           "head_input_taken", "kept_positions", "whole_shape"]


class HeadInput:
    """Logits ``(B, K, V)`` held as what makes them: the output head's input ``hidden (B, K, H)`` and its frozen
    weight ``(V, H)``. Per-token losses read them through :mod:`ops.token_values`, which runs the head chunk
    by chunk, so neither the logits nor their gradient ever exist whole.

    Stands in for a logits tensor where a loss only needs per-token NLL or entropy-like values (the trainer
    decides, see ``LossTerm.fusable``): ``size`` reports the logits' shape, ``sum`` connects an empty
    selection's zero to the graph.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        self.hidden, self.weight = hidden, weight

    def size(self, dim: int | None = None):
        shape = torch.Size((*self.hidden.shape[:-1], whole_shape(self.weight)[0]))
        return shape if dim is None else shape[dim]

    def sum(self) -> torch.Tensor:
        return self.hidden.sum()


# Architectures whose logits are exactly ``lm_head(hidden)`` (no soft-capping or scaling after the head): the
# fused head may stand in for their logits. Gemma-3's text model has no final soft-capping (Gemma-2's had):
# tests/test_real_gemma.py holds the equality on the real model.
FUSABLE_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "qwen2_moe", "qwen3_moe",
                                   "gemma3_text"})


def whole_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's full shape, also when DeepSpeed ZeRO-3 holds only this process's slice of it (``ds_shape``)."""
    return torch.Size(getattr(weight, "ds_shape", weight.shape))


@contextmanager
def gathered(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """The whole ``weight`` while active: under DeepSpeed ZeRO-3 (a partitioned parameter, ``ds_id``) its slices
    are gathered from every process (read-only) and released afterwards; any other tensor is itself."""
    if getattr(weight, "ds_id", None) is None:
        yield weight
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        yield weight


def fusable_head(model: torch.nn.Module | None, inference: bool = False) -> torch.nn.Linear | None:
    """The model's output head when per-token losses may be computed from its input (frozen, bias-free plain
    ``Linear``, an architecture in ``FUSABLE_ARCHITECTURES``), else ``None``. Under DeepSpeed ZeRO-3 the head's
    weight is a slice on each process; the losses gather it whole for their chunks (:func:`gathered`).
    ``inference``: the values are computed without gradients, so a trainable head is fine too."""
    if model is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if (type(head) is not torch.nn.Linear or head.bias is not None or (head.weight.requires_grad and not inference)
            or whole_shape(head.weight).numel() == 0 or model_type not in FUSABLE_ARCHITECTURES):
        return None
    return head


@contextmanager
def head_input_taken(head: torch.nn.Linear) -> Iterator[list[torch.Tensor]]:
    """While active, every call of ``head`` records its input in the yielded list and computes one position
    only: the model's own logits shrink to ``B x 1 x V``; the recorded input makes a :class:`HeadInput`."""
    taken: list[torch.Tensor] = []

    def take(module, args):
        taken.append(args[0])
        return (args[0][..., :1, :], *args[1:])

    # prepended: the input is taken before other pre-hooks (DeepSpeed ZeRO-3 wraps a module's inputs for its
    # backward bookkeeping; the taken input must bypass the head, whose output no loss reads)
    handle = head.register_forward_pre_hook(take, prepend=True)
    try:
        yield taken
    finally:
        handle.remove()


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (the output head then runs at chosen positions
    only); older or custom architectures compute every position."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def kept_positions(labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Positions whose logits some loss reads, and the labels re-aligned to them.

    Position p is needed when some row has a label at p + 1. The output head (``hidden x vocab`` per position,
    the largest matmul of a small model) then runs only there: masked questions and padding cost nothing. The
    last position is kept as the shift's spare, so the kept logits and the re-aligned labels keep the losses'
    convention (logit j predicts label j + 1). ``None`` (every position) when nearly all are needed.
    """
    needed = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,)
    length = labels.size(1)
    if needed.numel() + 1 >= length:
        return None, labels
    keep = torch.cat([needed, needed.new_tensor([length - 1])])
    spare = labels.new_full((labels.size(0), 1), IGNORE_INDEX)
    return keep, torch.cat([spare, labels[:, needed + 1]], dim=1)

