"""Merge a LoRA adapter into its base model and save a standalone model (safetensors shards + tokenizer).

    python merge.py --base_model /models/Qwen2.5-7B-Instruct \
        --adapter adapter/ME+GD_epoch5_3e-05_maskFalse_0.9/final_lora_model --output merged_model/me_gd

The merged folder loads with `AutoModelForCausalLM.from_pretrained` (and so with vLLM). After merging,
the merged model's logits on a short probe are compared with the adapter model's; the merge fails if
they differ by more than the dtype's tolerance. It refuses (without `--force`) a base other than the one
the adapter was trained on (recorded in its adapter_config.json) and an adapter that changes nothing. An
existing non-empty output is refused without `--overwrite`; the output appears only when complete.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.utils import (
    ScriptParser,
    UserError,
    atomic_path,
    bool_arg,
    check_adapter_folder,
    check_model_folder,
    check_output_free,
    run_cli,
    setup_logging,
)

logger = logging.getLogger("merge")

# max |logit difference| accepted between the adapter model and the merged one, by dtype
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
PROBE = "The patient asked the doctor a question about the treatment."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    parser.add_argument("--base_model", required=True, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="a PEFT adapter folder (e.g. .../final_lora_model)")
    parser.add_argument("--output", default=None, help="output folder; default: merged_model/<run name>")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--dtype", default=None, choices=sorted(TOLERANCE),
                        help="dtype to merge and save in (default: bfloat16 on GPU, float32 on CPU)")
    bool_arg(parser, "--overwrite", False, "replace an existing non-empty output folder")
    bool_arg(parser, "--force", False, "merge even into a base that is not the adapter's own, or when the adapter "
                                       "changes nothing")
    bool_arg(parser, "--trust_remote_code", False, "allow the model folder's own Python code to run")
    parser.add_argument("--tolerance", type=float, default=None, help="override the logit-check tolerance")
    return parser.parse_args(argv)


def default_output(adapter: Path) -> Path:
    name = adapter.parent.name if adapter.name == "final_lora_model" else adapter.name
    return Path("merged_model") / name


def validate(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    base = check_model_folder(args.base_model, "--base_model")
    adapter = check_adapter_folder(args.adapter)
    output = check_output_free(Path(args.output) if args.output else default_output(adapter), args.overwrite)
    problem = base_mismatch(base, adapter)
    if problem and not args.force:
        raise UserError(f"{problem}; merging into another model gives a model nobody trained (--force to merge "
                        "anyway)")
    if problem:
        logger.warning("%s; merging anyway (--force)", problem)
    return base, adapter, output


def _fingerprint(folder: Path, samples: int = 16, chunk: int = 1 << 16) -> tuple:
    """What identifies a model folder's weights without reading them all: its config.json and, per weight
    file, its name, size and a hash of ``samples`` chunks spread over it (a fine-tuned copy differs there)."""
    import hashlib
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.pop("_name_or_path", None)
    weights = []
    for file in sorted(folder.glob("*.safetensors")):
        size, digest = file.stat().st_size, hashlib.sha256()
        with file.open("rb") as fh:
            for i in range(samples):
                fh.seek(size * i // samples)
                digest.update(fh.read(chunk))
        weights.append((file.name, size, digest.hexdigest()))
    return json.dumps(config, sort_keys=True), tuple(weights)


def base_mismatch(base: Path, adapter: Path) -> str | None:
    """Why ``base`` is not the model the adapter was trained on (``None`` when it is, or cannot be told).

    The adapter records its base (``base_model_name_or_path``). Where that folder exists here it must be
    ``base`` itself or an identical copy (same config, same weight files); where it does not (trained
    elsewhere) the folder names must agree.
    """
    import json

    recorded = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
        "base_model_name_or_path")
    if not recorded:
        return None
    trained_on = Path(recorded)
    if trained_on.is_dir() and (trained_on / "config.json").is_file():
        if trained_on.resolve() == base.resolve() or _fingerprint(trained_on) == _fingerprint(base):
            return None
        return f"--adapter was trained on {recorded}, which differs from --base_model {base}"
    if trained_on.name != base.resolve().name:
        return (f"--adapter was trained on {recorded!r} (not found here), --base_model is {base}: "
                "the names differ")
    return None


def merge(base: Path, adapter: Path, output: Path, dtype_name: str, max_shard_size: str, trust: bool,
          tolerance: float, force: bool = False) -> float:
    """Merge, check the logits on a probe, save atomically; returns the max logit difference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust, use_safetensors=True)
    model = PeftModel.from_pretrained(model.to(device), str(adapter)).eval()
    probe = tokenizer(PROBE, return_tensors="pt").to(device)
    with torch.no_grad():
        before = model(**probe).logits.float()
        with model.disable_adapter():
            untouched = model(**probe).logits.float()
        merged = model.merge_and_unload()
        after = merged(**probe).logits.float()
    diff = (before - after).abs().max().item()
    print(f"max |logit difference| adapter vs merged on the probe: {diff:.3g} (tolerance {tolerance:g}, {dtype_name})")
    if diff > tolerance:
        raise UserError(f"merged logits differ from the adapter model's by {diff:.3g} > {tolerance:g}; "
                        "nothing was written")
    if torch.equal(after, untouched) and not force:
        raise UserError("the merged model equals the base model on the probe: the adapter changes nothing (an "
                        "untrained adapter, or LoRA B still zero); nothing was written (--force to write it anyway)")
    with atomic_path(output) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return diff


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    base, adapter, output = validate(args)
    import torch

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[dtype]
    merge(base, adapter, output, dtype, args.max_shard_size, args.trust_remote_code, tolerance, args.force)
    print(f"merged model saved to {output}")
    return output


if __name__ == "__main__":
    run_cli(main)
