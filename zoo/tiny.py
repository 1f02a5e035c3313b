"""Build a tiny Qwen2-architecture chat model and a byte-level BPE tokenizer in code, offline.

Tests and the demo use it instead of downloaded weights. ``head_dim = hidden_size / num_attention_heads``
is kept at 32 or more because vLLM's CPU attention supports only certain head sizes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a of and to in is was for on with as by at from that this his her their patient doctor "
    "hospital diagnosis address phone number birthday born lives street road city river mountain "
    "definition means refers process disease medicine treatment symptom blood heart lung liver kidney "
    "question answer choice correct option which what who when where how why not sure know cannot "
    "share private information sorry I don't remember author book novel wrote written published year "
    "name called one two three four five six seven eight nine zero"
).split()


def default_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic filler text (English words, digits, punctuation, some CJK) for training the BPE."""
    rng = random.Random(seed)
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.append("".join(rng.choice(cjk) for _ in range(rng.randint(2, 6))))
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]))
    return lines


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1024, bos_token: str | None = None):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``.

    EOS is ``<|im_end|>`` (the end of an assistant turn), padding ``<|endoftext|>``. With ``bos_token`` the
    tokenizer puts that token before every text it encodes with special tokens (as Llama's, Gemma's and
    Mistral's do), and its chat template writes it first.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    lines = list(corpus) if corpus is not None else []
    lines += default_corpus()  # a tiny corpus makes the BPE trainer stop short of the vocabulary size
    tok = Tokenizer(models.BPE())
    # The same normaliser and pre-tokeniser as transformers' Qwen2Tokenizer: AutoTokenizer reloads a
    # qwen2 model folder as that class, which installs them; training with others would make the
    # reloaded tokenizer split text (digits, notably) differently from the one the model learned.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + ([bos_token] if bos_token else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    if bos_token:
        bos = (bos_token, tok.token_to_id(bos_token))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
                                                           special_tokens=[bos])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        **({"bos_token": bos_token} if bos_token else {}),
    )
    fast.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE if bos_token else CHAT_TEMPLATE
    return fast


def build_model(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, seed: int = 0):
    """A randomly initialised ``Qwen2ForCausalLM`` sized for ``tokenizer`` (float32, CPU)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size // num_heads < 32:
        raise ValueError("keep hidden_size / num_heads >= 32 (vLLM's CPU attention needs it)")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


def save_tiny_model(path: str | Path, corpus: Iterable[str] | None = None, seed: int = 0, **model_kwargs) -> Path:
    """Build the tokenizer and model and save both to ``path`` (a normal transformers folder)."""
    path = Path(path)
    tokenizer = build_tokenizer(corpus)
    model = build_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def memorise(model, tokenizer, template, pairs: list[tuple[str, str]], epochs: int = 60, lr: float = 3e-3,
             batch_size: int = 8, seed: int = 0, output_dir: str | Path | None = None):
    """Fine-tune ``model`` (all weights) on question/answer ``pairs`` until it has memorised them.

    This makes the "original model" that tests and the demo unlearn from. The Trainer owns the loop; the
    samples are the same as training's (chat tags, question masked, EOS label).
    """
    import tempfile

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from dataset.encoding import encode_qa

    samples = [encode_qa(tokenizer, template, q, a, max_length=256, mask=True) for q, a in pairs]
    samples = [{**s, "attention_mask": [1] * len(s["input_ids"])} for s in samples if s is not None]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=str(output_dir or tmp), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, seed=seed,
            save_strategy="no", report_to=[], logging_steps=50, use_cpu=True,
            dataloader_pin_memory=False,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        Trainer(model=model, args=args, train_dataset=samples, data_collator=collator).train()
    return model.eval()


def build_target_model(
    path: str | Path,
    pairs: list[tuple[str, str]],
    family: str = "tiny",
    hidden_size: int = 128,
    num_layers: int = 2,
    epochs: int = 60,
    lr: float = 3e-3,
    seed: int = 0,
    bos_token: str | None = None,
    repetition_penalty: float | None = None,
    vocabulary: list[tuple[str, str]] | None = None,
) -> Path:
    """Build a tiny model that has memorised ``pairs`` (the "original model" to unlearn from) and save it.

    The tokenizer is trained on the pairs' text (plus filler), the model from scratch, then fine-tuned on
    the pairs formatted with ``family``'s chat tags. Deterministic for a given seed. ``bos_token``: a tokenizer
    that adds it (see :func:`build_tokenizer`); ``repetition_penalty``: written to the model's generation_config;
    ``vocabulary``: the pairs whose text the tokenizer learns (default ``pairs``; models built with the same
    vocabulary share one tokenizer, e.g. a target and its retain-only control).
    """
    from utils.chat_template import load_chat_template
    from utils.cli import seed_everything

    seed_everything(seed)
    template = load_chat_template(family)
    tokenizer = build_tokenizer([f"{q} {a}" for q, a in (vocabulary or pairs)], bos_token=bos_token)
    model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers,
                        num_heads=max(1, hidden_size // 32), seed=seed)
    memorise(model, tokenizer, template, pairs, epochs=epochs, lr=lr, seed=seed)
    if bos_token:
        model.config.bos_token_id = model.generation_config.bos_token_id = tokenizer.bos_token_id
    if repetition_penalty is not None:
        model.generation_config.repetition_penalty = repetition_penalty
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    # python -m zoo.tiny --data data/demo/train.jsonl --out runs/demo/target [--epochs 60]
    import argparse

    from dataset.reading import load_qa_jsonl
    from utils.cli import run_cli, setup_logging

    def _main(argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser(description="build a tiny model that has memorised a QA file")
        parser.add_argument("--data", required=True, help="JSONL of items to memorise")
        parser.add_argument("--out", required=True, help="output model folder")
        parser.add_argument("--family", default="tiny", help="chat-tag family used to format the items")
        parser.add_argument("--epochs", type=int, default=60, help="fine-tuning epochs")
        parser.add_argument("--seed", type=int, default=0, help="seed")
        args = parser.parse_args(argv)
        setup_logging()
        items = load_qa_jsonl(args.data)
        build_target_model(args.out, [(i.question, i.answer) for i in items], family=args.family,
                           epochs=args.epochs, seed=args.seed)

    run_cli(_main)
