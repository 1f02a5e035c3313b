"""What identifies a model folder's weights without reading them all, and the record of it an adapter keeps.

A fine-tuned copy of a model has the same folder name and often the same config as its base; its weights
differ. The fingerprint is the config (less ``_name_or_path``) and, per weight file, its name, size and a hash
of chunks spread over it. Training writes the base's fingerprint beside the adapter (:data:`FINGERPRINT_FILE`,
next to ``adapter_config.json``) so that merge.py can tell the adapter's own base from another model wherever
it runs, even where the base path the adapter recorded does not resolve any more.

Chunks are sampled, not the whole file: a change confined to a few small tensors can fall between the
samples; a fine-tune (which moves most weights) does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "base_fingerprint.json"
FORMAT = 1
SAMPLES = 16
CHUNK = 1 << 16
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def model_fingerprint(folder: str | os.PathLike, samples: int = SAMPLES, chunk: int = CHUNK) -> dict[str, Any]:
    """The fingerprint of the model folder ``folder`` (with config.json): a JSON-ready dict."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.pop("_name_or_path", None)  # where it was loaded from, not what it is
    weights = []
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern)})
    for file in files:
        size, digest = file.stat().st_size, hashlib.sha256()
        with file.open("rb") as fh:
            for i in range(samples):
                fh.seek(size * i // samples)
                digest.update(fh.read(chunk))
        weights.append({"file": file.name, "size": size, "sha256": digest.hexdigest()})
    return {"format": FORMAT, "samples": samples, "chunk": chunk,
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weights": weights}


def fingerprint_difference(recorded: dict[str, Any], folder: str | os.PathLike) -> str | None:
    """How the model folder ``folder`` differs from the fingerprint ``recorded`` (``None``: it does not),
    sampled as the record was."""
    actual = model_fingerprint(folder, int(recorded["samples"]), int(recorded["chunk"]))
    if actual["config_sha256"] != recorded["config_sha256"]:
        return "its config.json differs"
    if actual["weights"] != recorded["weights"]:
        return "same config.json, other weights"
    return None


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model folders are the same folder or identical copies (same fingerprint)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    return model_fingerprint(a) == model_fingerprint(b)


def record_base_fingerprint(adapter_dir: str | os.PathLike) -> Path | None:
    """Write the fingerprint of the base that ``adapter_dir``'s adapter_config.json names into
    ``adapter_dir/base_fingerprint.json`` (atomically); ``None`` when that base is not a local model folder
    (a hub id: nothing here to fingerprint) or cannot be read."""
    from utils.files import write_json

    adapter_dir = Path(adapter_dir)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get(
        "base_model_name_or_path")
    base = Path(recorded) if recorded else None
    if base is None or not (base / "config.json").is_file():
        logger.info("the adapter's base %r is not a local model folder: no fingerprint recorded", recorded)
        return None
    try:
        record = model_fingerprint(base)
    except (OSError, ValueError) as err:  # the adapter is still good; merge falls back to the recorded path
        logger.warning("could not fingerprint the base model %s (%s): merge.py will identify it by its path only",
                       base, err)
        return None
    record = {"base_model": recorded, "resolved": str(base.resolve()), **record}
    write_json(adapter_dir / FINGERPRINT_FILE, record)
    return adapter_dir / FINGERPRINT_FILE


def read_base_fingerprint(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The base fingerprint recorded in ``adapter_dir`` at training, or ``None`` (none recorded; an unreadable
    or unknown record is logged and counts as none)."""
    path = Path(adapter_dir) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT or not {"samples", "chunk", "config_sha256", "weights"} <= set(record):
            raise ValueError(f"not a format-{FORMAT} fingerprint record")
    except (OSError, ValueError, AttributeError) as err:
        logger.warning("%s: ignored (%s)", path, err)
        return None
    return record
