"""A target model for unlearning: a pretrained model fine-tuned until it has memorised some items.

The competition's target model had memorised private data; the real-model demo and tests make theirs
the same way, by full fine-tuning of a real instruct model on the items to memorise (formatted with the
family's chat tags, question masked, as training formats them).

    python -m zoo.target --base models/smollm2-135m-instruct --family smollm2 \
        --data data/demo/smollm2/train.jsonl --prefixes privacy choice --out runs/target --epochs 8
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from utils.chat_template import load_chat_template
from utils.cli import seed_everything
from utils.errors import UserError
from utils.files import atomic_path, check_model_folder

logger = logging.getLogger(__name__)


def build_memorised_model(base: str | os.PathLike, out: str | os.PathLike, pairs: list[tuple[str, str]],
                          family: str, epochs: int = 8, lr: float = 5e-4, batch_size: int = 8,
                          seed: int = 0, replay: list[str] | None = None, replay_tokens: int = 48) -> Path:
    """Fine-tune ``base`` (all weights) on ``pairs`` and save the result to ``out`` (atomically).

    ``replay``: other questions whose answers by ``base`` itself (greedy, up to ``replay_tokens``) join the
    training set, so the model keeps its own way of answering everything else.
    """
    from evals.generation import generate_with_model
    from evals.sampling import GenerationConfig
    from utils.loading import load_model, load_tokenizer, trusts_remote_code
    from zoo.tiny import memorise

    seed_everything(seed)
    template = load_chat_template(family)
    trust = trusts_remote_code(False, template)
    tokenizer = load_tokenizer(base, trust_remote_code=trust)
    model = load_model(base, dtype="float32", device=None, trust_remote_code=trust, flag="--base")
    if replay:
        own = generate_with_model(model, tokenizer, [template.prompt(q) for q in replay],
                                  GenerationConfig(max_new_tokens=replay_tokens, batch_size=len(replay)))
        pairs = pairs + [(q, a.strip()) for q, a in zip(replay, own, strict=True) if a.strip()]
    memorise(model.train(), tokenizer, template, pairs, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)


def main(argv: list[str] | None = None) -> Path:
    from dataset.reading import load_qa_jsonl
    from utils.cli import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", required=True, help="the pretrained model folder")
    parser.add_argument("--family", required=True, help="chat-tag family of the model")
    parser.add_argument("--data", required=True, help="JSONL of items (conversation or question/answer format)")
    parser.add_argument("--prefixes", nargs="*", default=None, help="memorise only items whose name_key starts so")
    parser.add_argument("--replay", default=None,
                        help="JSONL of other questions: the base model's own answers to them are trained on too")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate (AdamW, cosine)")
    parser.add_argument("--bs", type=int, default=8, help="batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    args = parser.parse_args(argv)
    setup_logging()
    check_model_folder(args.base, "--base")
    load_chat_template(args.family)
    items = load_qa_jsonl(args.data)
    if args.prefixes is not None:
        items = [it for it in items if any(it.name_key.startswith(p) for p in args.prefixes)]
    if not items:
        raise UserError(f"{args.data}: no item to memorise (--prefixes {' '.join(args.prefixes or [])})")
    logger.info("memorising %d items of %s into %s", len(items), args.data, args.out)
    replay = [it.question for it in load_qa_jsonl(args.replay)] if args.replay else None
    return build_memorised_model(args.base, args.out, [(it.question, it.answer) for it in items], args.family,
                                 epochs=args.epochs, lr=args.lr, batch_size=args.bs, seed=args.seed, replay=replay)


if __name__ == "__main__":
    from utils.cli import run_cli

    run_cli(main)
