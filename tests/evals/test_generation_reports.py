"""What generation reports beside the texts: per answer whether it ran to its token budget and its token count
(evals/generation.py's Answers, both transformers decoders), the progress bar's tokens/s, and a chat template's
default system turn that the family's tags do not write (evals/prompts.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evals.decoding import greedy_decode
from evals.generation import Answers, _stop_ids, generate_with_model
from evals.prompts import encode_prompts, unseen_system_prompt
from evals.sampling import GenerationConfig
from tests.conftest import REAL_MODEL_DIR
from zoo.tiny import CHAT_TEMPLATE

PROMPTS = ["a b c", "d e f g h", "k", "one two"]
BUDGETS = [12, 6, 0, 9]


def free_tokens(model, ids: list[int], limit: int, stop: set[int]) -> list[int]:
    """Greedy tokens from whole forwards (no cache), through the first stop token or ``limit`` tokens."""
    sequence, tokens = list(ids), []
    with torch.no_grad():
        while len(tokens) < limit and not (tokens and tokens[-1] in stop):
            tokens.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
            sequence.append(tokens[-1])
    return tokens


@pytest.mark.parametrize("decoder", ["auto", "generate"])
def test_answers_say_which_ran_to_their_budget(tiny_model, tokenizer, decoder, capsys):
    """A token the first prompt's free continuation emits early is made an end token: that answer ends before its
    budget, others run to theirs. Both decoders (ours and transformers' generate) report the same: at_budget is
    "no end token within the budget", new_tokens the tokens generated (the end token included); a zero budget
    gives "" at its budget. The progress bar shows tokens/s."""
    model = tiny_model.eval()
    ids = encode_prompts(tokenizer, PROMPTS)
    end = free_tokens(model, ids[0], 3, set())[2]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
    stop = set(_stop_ids(model, tokenizer))
    expected = [free_tokens(model, p, b, stop) for p, b in zip(ids, BUDGETS, strict=True)]
    capsys.readouterr()

    answers = generate_with_model(model, tokenizer, PROMPTS, GenerationConfig(batch_size=2, decoder=decoder),
                                  max_new_tokens=BUDGETS)
    assert isinstance(answers, Answers) and isinstance(answers, list)
    assert answers == [tokenizer.decode(t, skip_special_tokens=True) for t in expected]  # still the plain texts
    assert answers.new_tokens == [len(t) for t in expected]
    assert answers.at_budget == [not (t and t[-1] in stop) for t in expected]
    assert answers.at_budget[0] is False and answers.new_tokens[0] <= 3  # ended on the planted end token
    assert answers.at_budget[2] is True and answers[2] == ""
    assert answers.at_budget[1] or answers.at_budget[3]  # and one with room to answer ran to its budget
    assert answers.seconds > 0 and answers.tokens_per_second > 0
    assert "tokens/s" in capsys.readouterr().err


def test_decoder_reports_every_token_as_it_goes(tiny_model):
    """on_tokens sees each generated token once, also while no row finishes (progress for an answer that loops)."""
    model = tiny_model.eval()
    seen, finished = [], []
    out = greedy_decode(model, [[5, 6, 7], [8, 9], [10]], [20, 7, 3], set(), pad_id=0, batch_size=2,
                        on_finished=finished.append, on_tokens=seen.append)
    assert sum(seen) == sum(map(len, out)) == 30
    assert len(seen) > len(finished)  # reported at steps where nothing finished too


def test_answers_refuse_mismatched_reports():
    with pytest.raises(ValueError, match="2 answers, 1 budget flags"):
        Answers(["a", "b"], [True], [1, 2])


SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
DEFAULT_SYSTEM_TEMPLATE = (  # Qwen2.5's way: a system turn of its own unless the conversation brings one
    "{% if messages[0]['role'] != 'system' %}{{ '" + SYSTEM.replace("\n", "\\n") + "' }}{% endif %}" + CHAT_TEMPLATE)


@pytest.fixture()
def own_tokenizer(tiny_model_dir):
    """A fresh copy of the tiny tokenizer, whose chat template a test may change."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_default_system_turn_is_found(own_tokenizer, template):
    assert unseen_system_prompt(own_tokenizer, template) is None  # the tiny template: user turn only, as the tags
    own_tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    assert unseen_system_prompt(own_tokenizer, template) == "<|im_start|>system\nYou are a helpful assistant."
    # a family whose tags write that system prompt themselves: training saw it
    assert unseen_system_prompt(own_tokenizer, dataclasses.replace(template, system_prompt=SYSTEM)) is None


def test_bos_alone_is_no_system_turn_and_one_turn_templates_still_read(tiny_model_dir, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, bos_token="<|endoftext|>")
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE  # as Llama's and Gemma's templates write their BOS
    assert unseen_system_prompt(tok, template) is None
    # a template that takes one question only (raises on more): the user turn's header is the tags' one, the
    # system turn all before it
    tok.chat_template = ("{% if messages | length > 1 %}{{ raise_exception('one turn only') }}{% endif %}"
                         + DEFAULT_SYSTEM_TEMPLATE)
    assert unseen_system_prompt(tok, template) == SYSTEM


def test_smollm2_template_system_prompt():
    """SmolLM2's own template writes its default system prompt; the smollm2 tags (training's format) do not."""
    from transformers import AutoTokenizer

    from utils.chat_template import load_chat_template

    if not (REAL_MODEL_DIR / "tokenizer_config.json").is_file():
        pytest.skip(f"no SmolLM2 tokenizer at {REAL_MODEL_DIR} (python fetch_model.py installs it)")
    found = unseen_system_prompt(AutoTokenizer.from_pretrained(REAL_MODEL_DIR), load_chat_template("smollm2"))
    assert found == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
