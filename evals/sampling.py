"""How to generate: :class:`GenerationConfig`, and the sampling settings both backends use, the model's own
``generation_config.json`` under the caller's options (as the competition's inference engine filled them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["SAMPLING_DEFAULTS", "GenerationConfig", "model_generation_config", "sampling_settings"]


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
