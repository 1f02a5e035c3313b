"""The floor every package stands on: errors, logging, seeding, the chat-tag config, atomic writes and small
argparse helpers. It imports nothing of the project."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIG_PATH = PROJECT_ROOT / "config" / "model_config.yaml"


# --------------------------------------------------------------------------- errors


class UserError(Exception):
    """A mistake in the user's input (file, argument, folder): reported as one line, never a traceback."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's ``main``: a :class:`UserError` becomes one clear line and exit code 2; Ctrl-C one line
    (the exception's message, e.g. how to resume, when it carries one) and exit code 130, never a traceback."""
    try:
        main(argv)
    except UserError as err:
        # under accelerate launch / torchrun every process meets the same mistake: one line per machine
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)  # noqa: T201 - the one line a user must see
        sys.exit(2)
    except KeyboardInterrupt as err:
        print(f"interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)  # noqa: T201
        sys.exit(130)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` only where there is a default to show (not for required or unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is argparse.SUPPRESS \
                or "%(default)" in (action.help or "") or isinstance(action, argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


class ScriptParser(argparse.ArgumentParser):
    """The scripts' parser: an error is one line naming the mistake (``--help`` shows the usage), exit code 2;
    the description is the first line of ``doc`` and the rest of it (the command examples) the epilog."""

    def __init__(self, doc: str | None = None, **kwargs: Any) -> None:
        # a docstring's "\<newline>" continuations vanish (not a raw string), leaving a run of spaces before the
        # next option of a command example: put the line break back
        doc = re.sub(r"(?<=\S) {3,}(?=--)", " \\\n        ", doc or "")
        lines = doc.strip("\n").splitlines()
        kwargs.setdefault("description", lines[0] if lines else None)
        if len(lines) > 1:
            kwargs.setdefault("epilog", "\n".join(lines[1:]).strip("\n"))
        kwargs.setdefault("formatter_class", _RawEpilogFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _RawEpilogFormatter(HelpFormatter):
    """Keep the epilog's line breaks (command examples); options are wrapped as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


# --------------------------------------------------------------------------- logging and seeding


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging once, for scripts. Non-main processes of a distributed run log warnings only."""
    rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger()
    if not root.handlers:  # keep handlers someone else installed (a host application, pytest)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root.setLevel(level if rank == 0 else logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- chat tags


@dataclass(frozen=True)
class ChatTemplate:
    """The chat tags and loading options of one model family (``config/model_config.yaml``)."""

    family: str
    question_start_tag: str
    question_end_tag: str
    answer_tag: str = ""
    system_prompt: str | None = None
    hf_key: str | None = None
    aliases: tuple[str, ...] = ()
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def prompt(self, question: str) -> str:
        """The text that precedes the answer: system prompt, tags and question."""
        system = self.system_prompt or ""
        return f"{system}{self.question_start_tag}{question}{self.question_end_tag}{self.answer_tag}"


_TEMPLATE_KEYS = {f.name for f in fields(ChatTemplate)} - {"family"}
_REQUIRED_KEYS = {"question_start_tag", "question_end_tag"}


def load_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file; a missing file or a syntax error is a :class:`UserError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: invalid YAML: {err}") from None


def load_model_families(path: str | os.PathLike = MODEL_CONFIG_PATH) -> dict[str, ChatTemplate]:
    """Load every family of the model config, validating keys and types."""
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of family name -> settings")
    families: dict[str, ChatTemplate] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}: family {name!r}: expected a mapping")
        unknown = set(entry) - _TEMPLATE_KEYS
        if unknown:
            allowed = sorted(_TEMPLATE_KEYS)
            raise UserError(f"{path}: family {name!r}: unknown keys {sorted(unknown)}; allowed: {allowed}")
        missing = _REQUIRED_KEYS - set(entry)
        if missing:
            raise UserError(f"{path}: family {name!r}: missing keys {sorted(missing)}")
        for key in ("question_start_tag", "question_end_tag", "answer_tag"):
            if key in entry and not isinstance(entry[key], str):
                raise UserError(f"{path}: family {name!r}: {key} must be a string")
        if not isinstance(entry.get("trust_remote_code", False), bool):
            raise UserError(f"{path}: family {name!r}: trust_remote_code must be a YAML boolean (true/false)")
        values = dict(entry)
        values["aliases"] = tuple(values.get("aliases") or ())
        values["answer_tag"] = values.get("answer_tag") or ""
        families[str(name)] = ChatTemplate(family=str(name), **values)
    return families


def missing_tag_tokens(template: ChatTemplate, tokenizer) -> list[str]:
    """Special tokens of the family's tags (``<|im_start|>``, ``<|eot_id|>``, Gemma's ``<start_of_turn>``, ...)
    that ``tokenizer`` does not know as single tokens: a sign that ``--model_family`` does not fit the model (its
    tags would be split into ordinary text pieces the model never saw as markers)."""
    import re

    tags = template.question_start_tag + template.question_end_tag + template.answer_tag
    vocab = tokenizer.get_vocab()
    return sorted({tok for tok in re.findall(r"<\|[^|<>]+\|>|<[a-z]+(?:_[a-z]+)+>", tags) if tok not in vocab})


def load_chat_template(family: str, path: str | os.PathLike = MODEL_CONFIG_PATH) -> ChatTemplate:
    """Return the chat template of ``family`` (a family name or one of its aliases)."""
    families = load_model_families(path)
    if family in families:
        return families[family]
    for template in families.values():
        if family in template.aliases:
            return template
    known = ", ".join(sorted(families))
    raise UserError(f"unknown model family {family!r} (in {path}); known families: {known}")


def check_model_folder(path: str | os.PathLike, flag: str = "--model_path") -> Path:
    """A local transformers model folder (with config.json), or a clear error."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{flag} {path}: not a model folder (no config.json there)")
    return path


def check_adapter_folder(path: str | os.PathLike, flag: str = "--adapter") -> Path:
    """A PEFT adapter folder (with adapter_config.json), or a clear error."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{flag} {path}: not a PEFT adapter folder (no adapter_config.json there)")
    return path


def check_output_free(path: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse to write into an existing non-empty folder (or over a file) unless ``overwrite``."""
    path = Path(path)
    occupied = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if occupied and not overwrite:
        raise UserError(f"{flag} {path} already exists and is not empty; pass --overwrite to replace it")
    return path


# --------------------------------------------------------------------------- atomic writes


RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two paths in one step
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or file system cannot (then :func:`replace_folder` falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _old_copy(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def recover_folder(dest: str | os.PathLike) -> None:
    """Undo a kill inside :func:`replace_folder`'s two-rename fallback: when ``dest`` is missing and its previous
    version still lies aside (``.<name>.old``), put it back. Every writer calls it before it writes ``dest``."""
    dest = Path(dest)
    old = _old_copy(dest)
    if not dest.exists() and old.is_dir():
        old.rename(dest)
        logger.warning("%s: restored the previous version (a replacement was interrupted)", dest)


def replace_folder(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put the complete folder ``new`` at ``dest`` (on the same file system), replacing what is there.

    A kill at any moment leaves ``dest`` whole, old or new: the two are swapped in one step where the system
    can (``renameat2``), else the old one is renamed aside before the new one is renamed in, and
    :func:`recover_folder` puts it back when the second rename never happened. Only then is the old one removed.
    """
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.replace(new, dest)
        return
    if _exchange(new, dest):
        _remove(new)  # now the old version
        return
    old = _old_copy(dest)
    _remove(old)
    dest.rename(old)
    new.rename(dest)
    _remove(old)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (file or folder).

    Nothing appears at ``path`` unless the block finishes, so an interrupted write never leaves a
    half-written file. An existing folder at ``path`` is replaced only after the new one is complete, and in
    one step (:func:`replace_folder`): a kill never leaves only the temporary copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / "out"
    try:
        yield target
        if path.is_dir() and target.is_dir():
            replace_folder(target, path)
        else:
            os.replace(target, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Write rows as JSON lines (UTF-8, no ASCII escaping), atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write one JSON document, atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")


# --------------------------------------------------------------------------- argparse helpers


def str2bool(value: str | bool) -> bool:
    """Parse ``true/false/yes/no/1/0`` (any case) for flags such as ``--mask false``."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "t", "yes", "y", "1", "on"}:
        return True
    if lowered in {"false", "f", "no", "n", "0", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def add_model_args(parser: argparse.ArgumentParser, model_path: str | None = None, family: str = "qwen2.5-8b") -> None:
    """Arguments that choose and load the model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model_path", default=model_path, required=model_path is None,
                       help="local folder of a causal LM (transformers format)")
    group.add_argument("--model_family", "--model_type", dest="model_family", default=family,
                       help=f"chat-tag family from config/model_config.yaml, a name or alias: {family_names()}")
    group.add_argument("--model_config", default=str(MODEL_CONFIG_PATH), help="the model-family YAML file")
    group.add_argument("--trust_remote_code", type=str2bool, nargs="?", const=True, default=False,
                       help="allow a model folder's own Python code to run (off by default)")


def add_evaluated_model_args(parser: argparse.ArgumentParser, family: str | None = None, required: bool = True,
                             adapter_help: str = "a PEFT adapter on top of --model_path") -> None:
    """The model an evaluation command scores, in the one vocabulary of every evaluation command: ``--model_path``,
    ``--adapter``, ``--model_family`` (alias ``--model_type``), ``--dtype``, ``--trust_remote_code``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model_path", required=required, help="model folder (base, target or merged)")
    group.add_argument("--adapter", help=adapter_help)
    group.add_argument("--model_family", "--model_type", dest="model_family", default=family, required=family is None,
                       help=f"chat-tag family from config/model_config.yaml, a name or alias: {family_names()}")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model dtype")
    bool_arg(group, "--trust_remote_code", False, "allow the model folder's own Python code to run")


def bool_arg(group: argparse._ArgumentGroup, name: str, default: bool, help: str) -> None:  # noqa: A002
    """Add ``--name [true|false]``: a bare ``--name`` means true, ``--name false`` means false (also yes/no, 1/0)."""
    group.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="{true,false}",
                       help=f"{help} (true/false, yes/no or 1/0; bare {name} = true)")


def family_names(path: str | os.PathLike = MODEL_CONFIG_PATH) -> str:
    """The model families of the config with their aliases, for --help (``qwen2.5-8b (qwen2_5), ...``)."""
    try:
        families = load_model_families(path)
    except UserError:
        return "see config/model_config.yaml"
    return ", ".join(f"{name} ({', '.join(t.aliases)})" if t.aliases else name for name, t in families.items())
