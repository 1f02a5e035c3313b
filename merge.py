"""Merge a LoRA adapter into its base model and save a standalone model (safetensors shards + tokenizer).

    python merge.py --base_model /models/Qwen2.5-7B-Instruct \
        --adapter adapter/ME+GD_epoch5_3e-05_maskFalse_0.9/final_lora_model --output merged_model/me_gd

The merged folder loads with `AutoModelForCausalLM.from_pretrained` (and so with vLLM). The merge runs in
float32 and is then saved in the base's own dtype (`--dtype` to choose). Two checks, on the adapter's own
forget items (from its run's run_args.json; a fixed sentence when they cannot be found): the merged model's
logits equal the adapter model's, and the adapter's change to the weights survives the saved dtype (a small
LoRA delta can round away entirely in bfloat16). It refuses (without `--force`) a base other than the one the
adapter was trained on (by the fingerprint training recorded in base_fingerprint.json, else by the base path in
its adapter_config.json, resolved against the current directory and the adapter's folder) and an adapter that
changes nothing. An existing non-empty output is refused without `--overwrite`; the output appears only when
complete.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.chat_template import load_chat_template
from utils.cli import ScriptParser, bool_arg, run_cli, setup_logging
from utils.errors import UserError
from utils.files import atomic_path, check_adapter_folder, check_model_folder, check_output_free
from utils.fingerprint import FINGERPRINT_FILE, fingerprint_difference, read_base_fingerprint, same_model

logger = logging.getLogger("merge")

# max |logit difference| accepted between the adapter model and the merged one (both float32)
TOLERANCE = 1e-3
# the share of the adapter's effect on the probes' logits the saved model must keep
KEPT_SHARE = 0.5
PROBE = "The patient asked the doctor a question about the treatment."
PROBE_ITEMS = 8  # forget items of the adapter's run used as probes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(__doc__)
    parser.add_argument("--base_model", required=True, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="a PEFT adapter folder (e.g. .../final_lora_model)")
    parser.add_argument("--output", default=None, help="output folder; default: merged_model/<run name>")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype to save in (default: the base model's own, from its config.json); the merge "
                             "itself runs in float32")
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


def _candidates(recorded: str, adapter: Path) -> list[tuple[str, Path]]:
    """The model folders the adapter's recorded base path can mean here, with how each was found: an absolute
    path as it is; a relative one (relative to wherever training ran) against the current directory and against
    the adapter's folder. One entry per distinct folder."""
    path = Path(recorded)
    tries = ([("as an absolute path", path)] if path.is_absolute() else
             [("relative to the current directory", Path.cwd() / path),
              ("relative to the adapter's folder", adapter.resolve() / path)]
             # training records the path relative to where it ran, usually a folder above the run's
             + [("relative to a folder above the adapter's", parent / path) for parent in adapter.resolve().parents])
    found: dict[Path, tuple[str, Path]] = {}
    for how, folder in tries:
        if (folder / "config.json").is_file():
            found.setdefault(folder.resolve(), (how, folder.resolve()))
    return list(found.values())


def base_mismatch(base: Path, adapter: Path) -> str | None:
    """Why ``base`` is not the model the adapter was trained on (``None`` when it is, or cannot be told).

    The adapter's base is identified, in this order, by: the fingerprint of its weights recorded at training
    (``base_fingerprint.json``, :mod:`utils.fingerprint`), which holds wherever merge runs; the base path it
    recorded (``base_model_name_or_path``), where that resolves here (every folder it resolves to must be
    ``base`` or an identical copy); the folder names, with a warning that the base could not be verified.
    """
    import json

    recorded = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
        "base_model_name_or_path")
    fingerprint = read_base_fingerprint(adapter)
    if fingerprint is not None:
        difference = fingerprint_difference(fingerprint, base)
        if difference is None:
            return None
        resolved = fingerprint.get("resolved")
        trained_on = f"{recorded!r} ({resolved} at training)" if resolved and resolved != recorded else \
            repr(recorded or resolved)
        return (f"--adapter was trained on {trained_on} (identified by the fingerprint of its weights recorded at "
                f"training, {adapter / FINGERPRINT_FILE}), which differs from --base_model {base} ({difference})")
    if not recorded:
        logger.warning("--adapter %s names no base model and has no %s: could not verify that --base_model %s is "
                       "the model it was trained on", adapter, FINGERPRINT_FILE, base)
        return None
    found = _candidates(recorded, adapter)
    for how, folder in found:
        if not same_model(folder, base):
            return (f"--adapter was trained on {recorded!r} (found at {folder}, {how}; no {FINGERPRINT_FILE}), "
                    f"which differs from --base_model {base}")
    if found:
        return None
    where = "not found" if Path(recorded).is_absolute() else \
        "not found relative to the current directory or to the adapter's folder"
    if Path(recorded).name != base.resolve().name:
        return (f"--adapter was trained on {recorded!r} ({where}, no {FINGERPRINT_FILE}), --base_model is {base}: "
                "the names differ")
    logger.warning("--adapter was trained on %r (%s, no %s): could not verify that --base_model %s is that model, "
                   "only that the folder names agree", recorded, where, FINGERPRINT_FILE, base)
    return None


def run_record(adapter: Path) -> dict:
    """The adapter's training run record (``run_args.json`` beside ``final_lora_model``), or {}."""
    import json

    path = adapter.parent / "run_args.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def probe_texts(adapter: Path, record: dict) -> list[str]:
    """The checks' probes: the adapter's first forget items as training formatted them (question + answer with
    its family's tags), or :data:`PROBE` when the run record or its files are not found here."""
    from dataset.reading import load_qa_jsonl

    try:
        template = load_chat_template(record["model_family"])
        path = Path(record["forget_data_path"])
        if not path.is_file() and (adapter.parent / path).is_file():
            path = adapter.parent / path
        items = load_qa_jsonl(path)[:PROBE_ITEMS]
    except (KeyError, TypeError, UserError):
        logger.info("the adapter's forget items are not found here: checking on a fixed sentence")
        return [PROBE]
    return [template.prompt(it.question) + it.answer for it in items]


def kept_share(adapter_logits, base_logits, saved_logits) -> float:
    """How much of the adapter's effect on the probes' logits the saved model keeps: ``1 - ||saved - adapter|| /
    ||adapter - base||`` (1: all of it; 0 or below: the saved weights are as far from the adapter model as the base
    is, e.g. a LoRA delta below the saved dtype's resolution rounds away)."""
    effect = float((adapter_logits - base_logits).norm())
    if effect == 0:
        return 1.0
    return 1.0 - float((saved_logits - adapter_logits).norm()) / effect


def merge(base: Path, adapter: Path, output: Path, dtype_name: str, max_shard_size: str, trust: bool,
          tolerance: float, force: bool = False, probes: list[str] | None = None) -> float:
    """Merge in float32, check the logits on the probes and that the change survives ``dtype_name``, save
    atomically in that dtype; returns the max logit difference."""
    import torch

    from utils.loading import load_model, load_tokenizer

    dtype = getattr(torch, dtype_name)
    tokenizer = load_tokenizer(base, adapter, trust)
    model = load_model(base, adapter, dtype="float32", device="auto", trust_remote_code=trust, flag="--base_model")
    probe = tokenizer(probes or [PROBE], return_tensors="pt", padding=True).to(model.device)
    mask = probe["attention_mask"].bool()

    def logits(net) -> torch.Tensor:
        return net(**probe).logits.float()[mask]

    with torch.no_grad():
        before = logits(model)
        with model.disable_adapter():
            untouched = logits(model)
        merged = model.merge_and_unload()
        after = logits(merged)
        merged = merged.to(dtype)  # what is saved; its logits computed in float32 from those weights
        share = kept_share(before, untouched, logits(merged.float())) if dtype != torch.float32 else 1.0
        merged = merged.to(dtype)
    diff = (before - after).abs().max().item()
    print(f"max |logit difference| adapter vs merged on {len(probes or [PROBE])} probe(s): {diff:.3g} "
          f"(tolerance {tolerance:g}, float32); the adapter's effect kept in {dtype_name}: {share:.1%}")
    if diff > tolerance:
        raise UserError(f"merged logits differ from the adapter model's by {diff:.3g} > {tolerance:g}; "
                        "nothing was written")
    if torch.equal(after, untouched) and not force:
        raise UserError("the merged model equals the base model on the probe: the adapter changes nothing (an "
                        "untrained adapter, or LoRA B still zero); nothing was written (--force to write it anyway)")
    if share < KEPT_SHARE and not force:
        raise UserError(f"saved in {dtype_name}, the merged model keeps only {share:.0%} of the adapter's effect on "
                        f"its forget items (its weight changes are small against {dtype_name}'s rounding); save "
                        "with --dtype float32, or --force to save anyway; nothing was written")
    with atomic_path(output) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return diff


def stored_dtype(base: Path) -> str:
    """The dtype the base model's weights are stored in (its config.json), float32 when it does not say."""
    import json

    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return value if value in ("float32", "bfloat16", "float16") else "float32"


def main(argv: list[str] | None = None) -> Path:
    from utils.loading import trusts_remote_code

    args = parse_args(argv)
    setup_logging()
    base, adapter, output = validate(args)
    record = run_record(adapter)
    family = None
    if record.get("model_family"):
        try:
            family = load_chat_template(record["model_family"])
        except UserError:
            family = None
    dtype = args.dtype or stored_dtype(base)
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE
    merge(base, adapter, output, dtype, args.max_shard_size, trusts_remote_code(args.trust_remote_code, family),
          tolerance, args.force, probe_texts(adapter, record))
    print(f"merged model saved to {output} ({dtype})")
    return output


if __name__ == "__main__":
    run_cli(main)
