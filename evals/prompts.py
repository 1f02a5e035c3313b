"""Prompts for generation: built from a family's tags (as training formats questions) or the tokenizer's chat
template, and tokenised with one BOS."""

from __future__ import annotations

from collections.abc import Sequence

from utils.chat_template import ChatTemplate
from utils.errors import UserError

__all__ = ["build_prompts", "encode_prompts"]


def build_prompts(questions: Sequence[str], template: ChatTemplate | None, tokenizer=None) -> list[str]:
    """Prompts as training formatted them (the family's tags), or through the tokenizer's chat template."""
    if template is not None:
        return [template.prompt(q) for q in questions]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template; pass --prompt_format tags (with --model_family) "
                        "to build prompts from the family's tags")
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens unless the text already starts with its BOS
    (a rendered chat template: Llama, Gemma and Mistral templates write the BOS themselves; tokenising it again
    with special tokens gives two)."""
    from dataset.encoding import encode_text

    return [encode_text(tokenizer, p) for p in prompts]
