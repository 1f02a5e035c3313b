"""Peak memory of evaluate_unlearning.py's teacher-forced pass and GradNorm: ours against whole logits.

    python bench/bench_eval_memory.py                     # random Qwen2, vocabulary 151,936, batch 8, 512 tokens
    python bench/bench_eval_memory.py --model_path models/smollm2-135m-instruct --model_family smollm2

Each path runs in its own process (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU, above what
the loaded model already took):

- **stats, whole logits** (the earlier path): one forward per batch building ``batch x length x vocabulary``
  float32 logits, then log-softmax and the moments of log p over all of them;
- **stats, ours** (:func:`evals.unlearning.token_stats`): the head runs at answer positions only, and for a fusable
  head its input is read in chunks of 256 positions (:func:`ops.token_values.position_stats`);
- **GradNorm, whole gradient** (the earlier path): ``torch.autograd.grad`` over every weight at once;
- **GradNorm, ours** (:func:`evals.unlearning.grad_norms`): each weight's gradient squared and dropped as backward
  makes it.

Prints one table; the values of the two stats paths and of the two GradNorm paths agree (checked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PATHS = ("stats_whole", "stats_ours", "gradnorm_whole", "gradnorm_ours")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", default=None, help="model folder (default: a random Qwen2 model)")
    parser.add_argument("--model_family", default="tiny", help="chat tags of the model")
    parser.add_argument("--vocab_size", type=int, default=151936, help="vocabulary of the random model")
    parser.add_argument("--hidden_size", type=int, default=256, help="hidden size of the random model")
    parser.add_argument("--batch_size", type=int, default=8, help="teacher-forced batch")
    parser.add_argument("--length", type=int, default=512, help="tokens per item (question + answer)")
    parser.add_argument("--items", type=int, default=8, help="items scored")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace, workdir: Path) -> str:
    """The random model (unless given): Qwen's vocabulary, so that the logits have a realistic width."""
    if args.model_path:
        return args.model_path
    from zoo.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(vocab_size=4096)
    model = build_model(tokenizer, hidden_size=args.hidden_size, num_layers=2, num_heads=max(1, args.hidden_size // 64))
    model.resize_token_embeddings(args.vocab_size, mean_resizing=False)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    return str(workdir / "model")


def pairs_for(tokenizer, template, count: int, length: int) -> list[tuple[str, str]]:
    """``count`` (question, answer) pairs whose formatted text is about ``length`` tokens, half of it answer."""
    words = "the patient lives at a street in the city and was born in the year of the river".split()
    text = " ".join(words * (length // len(words) + 2))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    half = tokenizer.decode(ids[: length // 2])
    return [(f"{i} {half}", f"{half} {i}") for i in range(count)]


def whole_logits_stats(model, tokenizer, template, pairs, batch_size):
    """The earlier teacher-forced pass: whole float32 logits, log-softmax and moments over every position."""
    import torch

    from evals.answer_nll import qa_batches
    from evals.mia import distribution_moments
    from ops.token_values import shift_labels

    out = []
    for _, batch in qa_batches(model, tokenizer, template, pairs, batch_size, 4 * 512):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        target = shift_labels(batch["labels"])
        logp = torch.log_softmax(logits, dim=-1)
        mu, _ = distribution_moments(logits)
        for row in range(len(target)):
            keep = target[row] != -100
            out.append((logp[row][keep].gather(-1, target[row][keep].unsqueeze(-1)).sum().item(),
                        mu[row][keep].sum().item()))
    return out


def whole_gradient_norms(model, tokenizer, template, pairs):
    """The earlier GradNorm: torch.autograd.grad over every weight at once."""
    import torch

    from evals.answer_nll import qa_batches
    from ops.token_values import token_nll

    params = [p.requires_grad_(True) for p in model.parameters() if p.is_floating_point()]
    norms = []
    for _, batch in qa_batches(model, tokenizer, template, pairs, 1, 4 * 512):
        nll, mask = token_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
        grads = torch.autograd.grad(nll.sum() / mask.sum(), params, allow_unused=True)
        norms.append(math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None)))
    return norms


def peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    from evals.mia import MiaOptions
    from evals.unlearning import grad_norms, token_stats
    from utils.chat_template import load_chat_template
    from utils.loading import load_model, load_tokenizer

    template = load_chat_template(args.model_family)
    tokenizer = load_tokenizer(args.model_path)
    model = load_model(args.model_path, dtype="float32" if not torch.cuda.is_available() else "auto")
    device = model.device.type
    pairs = pairs_for(tokenizer, template, args.items, args.length)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = peak_mb(device) if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if args.worker == "stats_whole":
        values = whole_logits_stats(model, tokenizer, template, pairs, args.batch_size)
    elif args.worker == "stats_ours":
        values = [(sum(st.logprobs), sum(st.mu))
                  for st in token_stats(model, tokenizer, template, pairs, args.batch_size, max_length=4 * 512)]
    elif args.worker == "gradnorm_whole":
        values = whole_gradient_norms(model, tokenizer, template, pairs)
    else:
        values = grad_norms(model, tokenizer, template, pairs, max_length=4 * 512,
                            options=MiaOptions(keep_last=True, gradnorm_reduction="global"))  # as the earlier path
    seconds = time.perf_counter() - start
    return {"path": args.worker, "device": device, "peak_mb": peak_mb(device) - base, "seconds": seconds,
            "values": values, "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = prepare(args, Path(args.workdir or tmp))
        results = []
        for path in PATHS:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", path,
                   "--model_path", model_path]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{path} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(line[0][len("RESULT "):]))
    by = {r["path"]: r for r in results}
    for a, b in (("stats_whole", "stats_ours"), ("gradnorm_whole", "gradnorm_ours")):
        flat_a = [x for v in by[a]["values"] for x in (v if isinstance(v, list) else [v])]
        flat_b = [x for v in by[b]["values"] for x in (v if isinstance(v, list) else [v])]
        assert all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-3) for x, y in zip(flat_a, flat_b, strict=True)), (a, b)
    device = results[0]["device"]
    print(f"\n{args.items} items of ~{args.length} tokens, batch {args.batch_size}, {device}; model "
          f"{args.model_path or f'random Qwen2, vocab {args.vocab_size}, hidden {args.hidden_size}'} "
          f"({results[0]['params'] / 1e6:.1f}M parameters); values of each pair of paths agree")
    mem = "peak GPU MB above the model" if device == "cuda" else "peak RSS MB above the loaded model"
    print(f"| pass | {mem} | seconds |")
    print("| --- | --- | --- |")
    for r in results:
        print(f"| {r['path'].replace('_', ', ')} | {r['peak_mb']:.0f} | {r['seconds']:.1f} |")
    return results


if __name__ == "__main__":
    main()
