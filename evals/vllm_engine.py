"""The vLLM backend: one engine per process and model (tensor-parallel on GPUs, vLLM's CPU build here), the same
sampling settings and prompt token ids as the transformers backend."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from evals.prompts import encode_prompts
from evals.sampling import GenerationConfig, model_generation_config, sampling_settings

logger = logging.getLogger(__name__)

__all__ = ["release_engines", "vllm_available", "vllm_engine"]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


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


def generate_vllm(model_path: str, prompts: list[str],
                  config: GenerationConfig) -> tuple[list[tuple[str, bool, int]], float]:
    """vLLM with the same sampling settings (:func:`sampling_settings`) and the same prompt token ids
    (:func:`encode_prompts`) as the transformers backend: per prompt (text, stopped at the token budget, new
    tokens), and the seconds generation took (the engine's start-up left out)."""
    import time

    from vllm import SamplingParams

    from utils.loading import load_tokenizer

    llm = vllm_engine(model_path, config)
    settings = sampling_settings(model_generation_config(model_path), config)
    params = SamplingParams(temperature=settings["temperature"], top_p=settings["top_p"],
                            top_k=settings["top_k"] if settings["top_k"] > 0 else -1,
                            repetition_penalty=settings["repetition_penalty"], max_tokens=config.max_new_tokens,
                            seed=config.seed)
    ids = encode_prompts(load_tokenizer(model_path, trust_remote_code=config.trust_remote_code), prompts)
    start = time.perf_counter()
    outputs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in ids], params)]
    return [(o.text, o.finish_reason == "length", len(o.token_ids)) for o in outputs], time.perf_counter() - start
