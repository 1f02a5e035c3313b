"""Prompts for generation: built from a family's tags (as training formats questions) or the tokenizer's chat
template, and tokenised with one BOS."""

from __future__ import annotations

from collections.abc import Sequence

from utils.chat_template import ChatTemplate
from utils.errors import UserError

__all__ = ["build_prompts", "encode_prompts", "unseen_system_prompt"]

# stand-ins for a question and an answer when rendering a chat template to see what it adds around them
_QUESTION, _ANSWER, _QUESTION_2 = "QUESTION_8e1f", "ANSWER_8e1f", "QUESTION_2_8e1f"


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


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n :]


def unseen_system_prompt(tokenizer, template: ChatTemplate) -> str | None:
    """The system turn the tokenizer's chat template writes before a lone question (a default system prompt, as
    SmolLM2's, Qwen2.5's or Llama 3's templates have) that ``template``'s tags, as training formats questions,
    do not write; ``None`` when there is none (or the chat template cannot be read this way).

    What precedes the question in a one-question conversation is BOS + system turn + the user turn's header; the
    header is the part it shares with what precedes a second question (after an answer) or the family's
    question_start_tag, whichever is longer."""
    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if not getattr(tokenizer, "chat_template", None):
        return None
    first = render([{"role": "user", "content": _QUESTION}])
    if first.count(_QUESTION) != 1:  # a template that rewrites or repeats the question: nothing to compare
        return None
    prefix = first[: first.index(_QUESTION)]
    headers = [template.question_start_tag] if prefix.endswith(template.question_start_tag) else []
    try:
        turns = render([{"role": "user", "content": _QUESTION}, {"role": "assistant", "content": _ANSWER},
                        {"role": "user", "content": _QUESTION_2}])
        if turns.count(_ANSWER) == 1 and turns.count(_QUESTION_2) == 1:
            between = turns[turns.index(_ANSWER) + len(_ANSWER) : turns.index(_QUESTION_2)]
            headers.append(_common_suffix(prefix, between))
    except Exception:  # noqa: BLE001 - templates raise what they like (e.g. one turn only): the tags' header then
        pass
    system = prefix[: len(prefix) - max(map(len, headers), default=0)]
    bos = tokenizer.bos_token or ""
    rest = system[len(bos) :] if bos and system.startswith(bos) else system  # the BOS alone is no system turn
    seen = template.prompt(_QUESTION).split(_QUESTION)[0]  # what training writes before the question
    if not rest.strip() or rest.strip() in seen or system.strip() in seen:
        return None
    return system
