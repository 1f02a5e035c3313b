"""Benchmark an unlearning training step: ours against the original scripts' data path and ME loss.

    python bench/bench_train_step.py                       # ME+GD, bs 4, max_length 400, vocab 151,936
    python bench/bench_train_step.py --loss_type IDK+AP --steps 8
    python bench/bench_train_step.py --model_path /models/Qwen2.5-0.5B --model_family qwen2.5-8b   # a real model

Both paths run the same `UnlearnTrainer` (forward, loss, backward, clipping, AdamW on LoRA) for
`--steps` timed optimizer steps after one warm-up step, each path in its own process (so peak memory
is its own):

- **ours**: batches padded to their longest sample, padding outside every loss, ME in closed form
  (logsumexp - mean - log V) over counted positions in chunks;
- **original**: every sample padded to `--max_length` with EOS (`--pad_to_max_length`: forget labels
  are the padded ids), ME through softmax + a materialised uniform + element-wise `kl_div`.

Prints tokens/s (real tokens: prompt + answer + one EOS per sample part), seconds/step, peak memory
(RSS on CPU; `torch.cuda.max_memory_allocated` on GPU) and the first steps' losses, with ratios
ours/original. By default the model is a random Qwen2-shaped one with Qwen's vocabulary size
(151,936) and a small hidden size that fits a CPU; the text is TOFU's forget01 + retain90 from
`../shared/data/tofu` when present, else the project's demo data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOFU = ROOT.parent / "shared" / "data" / "tofu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", default=None, help="model folder (default: a random Qwen2-shaped model)")
    parser.add_argument("--model_family", default="tiny", help="chat tags of the model")
    parser.add_argument("--preset", default=None, choices=["qwen2.5-0.5b"],
                        help="random model with a real model's shape (for GPU runs)")
    parser.add_argument("--peak_tflops", type=float, default=989.0,
                        help="GPU peak dense bf16 TFLOP/s for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--vocab_size", type=int, default=151936, help="vocabulary of the random model")
    parser.add_argument("--hidden_size", type=int, default=256, help="hidden size of the random model")
    parser.add_argument("--num_layers", type=int, default=2, help="layers of the random model")
    parser.add_argument("--loss_type", default="ME+GD", choices=["ME+GD", "IDK+AP"], help="objective")
    parser.add_argument("--bs", type=int, default=4, help="batch size")
    parser.add_argument("--max_length", type=int, default=400, help="max_length (the original pads to it)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after one warm-up)")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--data", default="auto", help="'tofu', 'demo', or 'auto' (TOFU when present)")
    parser.add_argument("--paths", default="original,ours", help="which paths to run, comma-separated: original, "
                                                                 "ours (fused head), unfused (ours, logits built)")
    parser.add_argument("--roofline", action="store_true",
                        help="also time GEMMs of the model's own shapes and report the step's FLOP/s as a share")
    parser.add_argument("--profile", action="store_true", help="profile one step of each path (top operators)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 (GPU)")
    parser.add_argument("--group_by_length", action="store_true", help="ours: batch items of similar length")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- set-up (parent process)


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """Write the forget/retain/refusal files and (unless given) the random model; returns their paths."""
    from utils.files import write_jsonl
    from zoo.demo_data import REFUSALS

    use_tofu = args.data == "tofu" or (args.data == "auto" and TOFU.is_dir())
    if use_tofu:
        forget = [json.loads(x) for x in (TOFU / "forget01.json").read_text().splitlines()]
        forget = [{"question": r["question"], "answer": r["answer"]} for r in forget if r["task_id"] == "1"]
        retain = [json.loads(x) for x in (TOFU / "retain90.json").read_text().splitlines()][:400]
        refusals = [x for x in (TOFU / "idontknow.jsonl").read_text().splitlines() if x.strip()]
    else:
        forget = [json.loads(x) for x in (ROOT / "data/forget/forget.jsonl").read_text().splitlines()]
        retain = [json.loads(x) for x in (ROOT / "data/retain/retain.jsonl").read_text().splitlines()]
        refusals = REFUSALS
    write_jsonl(workdir / "forget.jsonl", forget)
    write_jsonl(workdir / "retain.jsonl", retain)
    (workdir / "idk.txt").write_text("\n".join(refusals) + "\n")
    model_path = args.model_path
    if model_path is None and args.preset:
        model_path = build_preset(args.preset, workdir)
    if model_path is None:
        from dataset.reading import load_qa_jsonl
        from zoo.tiny import build_model, build_tokenizer

        texts = [f"{i.question} {i.answer}" for p in ("forget", "retain")
                 for i in load_qa_jsonl(workdir / f"{p}.jsonl")]
        tokenizer = build_tokenizer(texts, vocab_size=4096)
        model = build_model(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers,
                            num_heads=max(1, args.hidden_size // 64))
        # Qwen's vocabulary size: logits (and the output head) of realistic width
        model.resize_token_embeddings(args.vocab_size, mean_resizing=False)
        model_path = workdir / "model"
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)
    return {"data": "TOFU forget01 + retain90[:400]" if use_tofu else "demo data", "model": str(model_path)}


def build_preset(preset: str, workdir: Path) -> str:
    """A randomly initialised model with Qwen2.5-0.5B's shape (0.49B parameters) and a local tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dataset.reading import load_qa_jsonl
    from zoo.tiny import build_tokenizer

    texts = [f"{i.question} {i.answer}" for p in ("forget", "retain") for i in load_qa_jsonl(workdir / f"{p}.jsonl")]
    tokenizer = build_tokenizer(texts, vocab_size=4096)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    path = workdir / preset
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# --------------------------------------------------------------------------- one path (worker process)


def naive_me_loss(logits, labels):
    """The original ME: softmax, a materialised uniform distribution, element-wise KL, masked mean."""
    import torch
    import torch.nn.functional as F

    vocab = logits.shape[-1]
    labels, logits = labels[:, 1:].clone(), logits[:, :-1, :]
    soft = F.softmax(logits, dim=-1).view(-1, vocab)
    uniform = torch.full_like(soft, 1.0 / vocab)
    mask = (labels != -100).view(-1)
    kl = F.kl_div((soft + 1e-12).log(), uniform, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum()


def run_worker(args: argparse.Namespace) -> dict:
    import torch
    from transformers import TrainerCallback

    import trainer.recipe as unlearn
    from trainer.arguments import add_unlearn_args
    from trainer.losses import LOSSES
    from trainer.unlearn_trainer import UnlearnTrainer

    torch.manual_seed(0)
    workdir = Path(args.workdir)
    original = args.worker == "original"
    parser = argparse.ArgumentParser()
    add_unlearn_args(parser, loss_type=args.loss_type, max_length=args.max_length, forget_coeff=1.0,
                     loss_choices=sorted(LOSSES))
    uargs = parser.parse_args([
        "--model_path", args.model_path, "--model_family", args.model_family, "--loss_type", args.loss_type,
        "--forget_data_path", str(workdir / "forget.jsonl"), "--retain_data_path", str(workdir / "retain.jsonl"),
        "--idk_data_path", str(workdir / "idk.txt"), "--bs", str(args.bs), "--max_length", str(args.max_length),
        "--lora_r", str(args.lora_r), "--lr", "1e-4", "--warmup_ratio", "0", "--lr_scheduler_type", "constant",
        "--output_dir", str(workdir / f"run_{args.worker}"), "--overwrite", "--bf16", str(args.bf16).lower(),
        "--lora_dropout", "0", *(["--pad_to_max_length"] if original else []),
        "--fused_head_loss", "true" if args.worker == "ours" else "false",
        *(["--group_by_length"] if args.group_by_length and not original else []),
    ])
    template = unlearn.load_chat_template(uargs.model_family)
    tokenizer = unlearn.load_tokenizer(uargs, template)
    dataset = unlearn.build_dataset(uargs, tokenizer, template)
    model = unlearn.build_model(uargs, template, args.bf16)
    training_args = unlearn.build_training_args(uargs, Path(uargs.output_dir.replace("${", "")), args.bf16)
    training_args.max_steps = args.steps + 1
    training_args.save_strategy = "no"
    training_args.disable_tqdm = True
    forget_term, retain_term = LOSSES[args.loss_type]
    if original and args.loss_type == "ME+GD":
        # ME's parts and units, the original's computation on whole logits
        forget_term = dataclasses.replace(forget_term, compute=lambda o, b: naive_me_loss(o["forget"].logits,
                                                                                          o["forget"].labels),
                                          fusable=False)

    real_tokens: list[int] = []
    shapes: list[dict[str, tuple[int, int, int]]] = []  # per step and part: (rows, padded length, kept positions)

    def collate(items):
        real_tokens.append(sum(s["n_text"] + 1 for item in items for s in item.values()))
        batch = unlearn.ForgetRetainCollator(tokenizer.pad_token_id)(items)
        shapes.append({name: part_shape(part["labels"], trainer) for name, part in batch.items()})
        return batch

    step_times: list[float] = []
    losses: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "forget_loss" in logs:
                losses.append({k: logs[k] for k in ("forget_loss", "retain_loss") if k in logs})

    training_args.forget_coeff = training_args.retain_coeff = 1.0
    training_args.skip_unlabelled_logits = not original
    trainer = UnlearnTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                             processing_class=tokenizer, terms=(forget_term, retain_term), callbacks=[Timer()])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args.profile:  # the step after the warm-up, by operator
        from torch.profiler import ProfilerActivity, profile, schedule

        class Step(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                prof.step()

        trainer.add_callback(Step())
        trainer.args.max_steps = 2
        with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=1)) as prof:
            trainer.train()
        print(f"== {args.worker}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return {"path": args.worker, "profile": True}
    trainer.train()
    timed = step_times[1:]
    tokens = sum(real_tokens[1 : 1 + len(timed)])
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # MFU as the issue defines it: 4 x params on the trainable path (the whole network: gradients flow
    # through the frozen base) x tokens/s / peak bf16 FLOP/s
    n_params = sum(p.numel() for p in model.parameters())
    mfu = (4 * n_params * tokens / sum(timed) / (args.peak_tflops * 1e12)) if torch.cuda.is_available() else None
    result = {"path": args.worker, "s_per_step": sum(timed) / len(timed), "tokens_per_s": tokens / sum(timed),
              "params": n_params, "mfu": mfu,
            "peak_mb": peak, "rss_before_train_mb": rss_before, "losses": losses[:3],
              "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}
    if args.roofline:
        spec = model_spec(model.config, uargs.lora_r)
        terms = [t for t in (forget_term, retain_term) if t is not None]
        ref_parts = {p for t in terms if t.needs_ref for p in t.parts}
        flops = [step_flops(spec, step, ref_parts) for step in shapes[1 : 1 + len(timed)]]
        result["step_gflop"] = sum(flops) / len(flops) / 1e9
        result["achieved_gflops"] = sum(flops) / sum(timed) / 1e9
        result["gemm_gflops"] = gemm_throughput(spec, shapes[1 : 1 + len(timed)], model.dtype, model.device) / 1e9
    return result


# --------------------------------------------------------------------------- the roofline


def part_shape(labels, trainer) -> tuple[int, int, int]:
    """(rows, padded length, positions the output head runs on) of one batch part, as ``trainer`` runs it."""
    rows, length = labels.shape
    keep, _ = trainer._kept_positions(labels)
    return rows, length, length if keep is None else keep.numel()


def model_spec(config, lora_r: int) -> dict:
    """The shapes the FLOP count needs: every linear layer of a decoder block as (in, out), attention sizes,
    vocabulary, layers, LoRA rank."""
    cfg = config.get_text_config()
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = getattr(cfg, "num_key_value_heads", heads)
    linears = [(hidden, heads * head_dim), (hidden, kv * head_dim), (hidden, kv * head_dim), (heads * head_dim, hidden),
               (hidden, cfg.intermediate_size), (hidden, cfg.intermediate_size), (cfg.intermediate_size, hidden)]
    return {"linears": linears, "layers": cfg.num_hidden_layers, "heads": heads, "head_dim": head_dim,
            "hidden": hidden, "vocab": cfg.vocab_size, "lora_r": lora_r}


def step_flops(spec: dict, step: dict[str, tuple[int, int, int]], ref_parts: set[str]) -> float:
    """Matmul FLOPs of one optimizer step (2 per multiply-add), as README "Roofline" states them.

    Per part of ``rows x length`` tokens (padding included: it is computed) with the head on ``kept``
    positions: forward = linear layers + LoRA (rank r on each linear: r x (in + out)) + attention (QK^T and
    AV over the full length x length square) + head (kept x hidden x vocab). Backward = the base linears'
    input gradient (= their forward), LoRA's input and weight gradients (2 x its forward), attention's
    (2 x its forward: dQ, dK, dV, dP), the head's input gradient (= its forward); no weight gradient for
    the frozen base. A part with a reference (NPO, DPO, KL) adds one more forward.
    """
    total = 0.0
    for name, (rows, length, kept) in step.items():
        tokens = rows * length
        linear = 2 * tokens * sum(i * o for i, o in spec["linears"]) * spec["layers"]
        lora = 2 * tokens * spec["lora_r"] * sum(i + o for i, o in spec["linears"]) * spec["layers"]
        attention = 2 * 2 * rows * spec["heads"] * length * length * spec["head_dim"] * spec["layers"]
        head = 2 * rows * kept * spec["hidden"] * spec["vocab"]
        forward = linear + lora + attention + head
        total += forward + linear + 2 * lora + 2 * attention + head
        if name in ref_parts:
            total += linear + attention + head
    return total


def gemm_throughput(spec: dict, steps: list[dict], dtype, device) -> float:
    """FLOP/s of plain matrix products with the model's own shapes (each linear layer and the head, at the
    steps' mean token count), in the training dtype and thread count: this machine's matmul limit for
    this model."""
    import torch

    tokens = max(1, round(sum(r * n for step in steps for r, n, _ in step.values()) / max(1, sum(map(len, steps)))))
    kept = max(1, round(sum(r * k for step in steps for r, _, k in step.values()) / max(1, sum(map(len, steps)))))
    shapes = [(tokens, i, o) for i, o in spec["linears"]] + [(kept, spec["hidden"], spec["vocab"])]
    mats = [(torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device))
            for m, k, n in shapes]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in mats:  # warm-up
        a @ b
    best = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        for a, b in mats:
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return flops / best


# --------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        info = prepare(args, workdir)
        results = []
        for path in args.paths.split(","):
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", path,
                   "--workdir", str(workdir), "--model_path", info["model"]]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            if args.profile:
                print(proc.stdout.split("RESULT ")[0])
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{path} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(line[0][len("RESULT "):]))
    if not args.profile:
        report(args, info, results)
    return results


def describe_model(args: argparse.Namespace, info: dict) -> str:
    if args.model_path:
        return info["model"]
    if args.preset:
        return f"random {args.preset}-shaped Qwen2"
    return f"random Qwen2, vocab {args.vocab_size}, hidden {args.hidden_size}, {args.num_layers} layers"


def report(args: argparse.Namespace, info: dict, results: list[dict]) -> None:
    by = {r["path"]: r for r in results}
    device = results[0]["device"]
    mem = "peak GPU MB (max_memory_allocated)" if device == "cuda" else "peak RSS MB"
    print(f"\n{args.loss_type}, bs {args.bs}, max_length {args.max_length}, {args.steps} timed steps, {device} "
          f"({results[0]['threads']} threads); model {describe_model(args, info)} "
          f"({results[0]['params'] / 1e6:.1f}M parameters); data: {info['data']}")
    print(f"| path | tokens/s | s/step | {mem} | MFU | first losses (forget, retain) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        first = "; ".join(f"{x['forget_loss']:.4f}, {x.get('retain_loss', float('nan')):.4f}" for x in r["losses"])
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['path']} | {r['tokens_per_s']:.1f} | {r['s_per_step']:.3f} | {r['peak_mb']:.0f} | {mfu} "
              f"| {first} |")
    if args.roofline:
        print("\n| path | GFLOP/step | achieved GFLOP/s | GEMM GFLOP/s (model shapes) | share of GEMM |")
        print("| --- | --- | --- | --- | --- |")
        for r in results:
            print(f"| {r['path']} | {r['step_gflop']:.1f} | {r['achieved_gflops']:.1f} | {r['gemm_gflops']:.1f} | "
                  f"{100 * r['achieved_gflops'] / r['gemm_gflops']:.0f}% |")
    if "ours" in by and "unfused" in by:
        o, u = by["ours"], by["unfused"]
        print(f"| fused/unfused | {o['tokens_per_s'] / u['tokens_per_s']:.2f}x | "
              f"{o['s_per_step'] / u['s_per_step']:.2f}x | {o['peak_mb'] / u['peak_mb']:.2f}x | | |")
    if "ours" in by and "original" in by:
        o, g = by["ours"], by["original"]
        print(f"| ours/original | {o['tokens_per_s'] / g['tokens_per_s']:.2f}x | "
              f"{o['s_per_step'] / g['s_per_step']:.2f}x | {o['peak_mb'] / g['peak_mb']:.2f}x | | |")


if __name__ == "__main__":
    main()
