"""The scripts' process: their parser (an error is one line, exit 2), the option groups they share, logging
configured once, seeding."""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
from collections.abc import Callable
from typing import Any

from utils.chat_template import MODEL_CONFIG_PATH, load_model_families
from utils.errors import UserError


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """Run a script's ``main``: a :class:`UserError` becomes one clear line and exit code 2; Ctrl-C one line
    (the exception's message, e.g. how to resume, when it carries one) and exit code 130, never a traceback.
    A process of a multi-process launch that has finished ends without the interpreter's teardown (below)."""
    try:
        main(argv)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _exit_finished()
    except UserError as err:
        # under accelerate launch / torchrun every process meets the same mistake: one line per machine
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)  # noqa: T201 - the one line a user must see
        sys.exit(2)
    except KeyboardInterrupt as err:
        message = f"interrupted{': ' + str(err) if str(err) else ''}"
        try:  # on its own line: a progress bar interrupted mid-line would otherwise carry it at its end
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        except ImportError:
            print(message, file=sys.stderr)  # noqa: T201
        sys.exit(130)


def _exit_finished() -> None:
    """Exit 0 as a normal exit does, less the interpreter's finalization: in it the C++ threads that gloo and
    DeepSpeed leave behind can still abort a process whose outputs are all written ("terminate called without an
    active exception", SIGABRT), and the launcher then kills the other ranks and fails the run (seen in CI on
    ZeRO-3 after the final save, with the process group already destroyed). The atexit handlers still run first:
    trackers (wandb, swanlab) close their runs in them."""
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` only where there is a default to show (not for required or unset options) and the
    help does not already say it ("default: ...", "off by default")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is argparse.SUPPRESS \
                or "%(default)" in (action.help or "") or isinstance(action, argparse._HelpAction) \
                or re.search(r"\(default\b|\bdefault:|\bby default\b", action.help or "", re.IGNORECASE):
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
        self.add_argument("--config", metavar="FILE",
                          help="YAML file of option values, keys = option names without the dashes (lr: 3.0e-5, "
                               "mask: false, lora_target_modules: [q_proj, v_proj]); the command line wins")
        self._from_config: tuple[str, set[str]] | None = None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        path = _config_path(argv)
        if path is not None:
            tokens = self._config_tokens(path)
            self._from_config = (path, {t for t in tokens if t.startswith("--")})
            argv = tokens + argv  # later occurrences win: the command line over the file
        try:
            return super().parse_known_args(argv, namespace)
        finally:
            self._from_config = None

    def _config_tokens(self, path: str) -> list[str]:
        """The YAML file's values as command-line tokens, so they get the options' own types, choices and checks."""
        import yaml

        try:
            values = yaml.safe_load(open(path, encoding="utf-8").read())  # noqa: SIM115 - closed by the read
        except FileNotFoundError:
            self.error(f"--config {path}: file not found")
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            self.error(f"--config {path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})")
        if values is None:
            return []
        if not isinstance(values, dict):
            self.error(f"--config {path}: expected a mapping of option names to values, got {type(values).__name__}")
        if {"compute_environment", "distributed_type"} & set(values):
            self.error(f"--config {path} is an accelerate config, not this script's options: accelerate reads it "
                       f"before the script name (accelerate launch --config_file {path} script.py ...)")
        tokens: list[str] = []
        for key, value in values.items():
            option = f"--{str(key).lstrip('-')}"
            action = self._option_string_actions.get(option)
            if action is None or action.dest in ("help", "config"):
                self.error(f"--config {path}: unknown option {key!r} (keys are this script's option names, see "
                           "--help)")
            if value is None:
                continue
            if action.nargs == 0:  # store_true / store_const style: the flag or nothing
                if value is True:
                    tokens.append(option)
                elif value is not False:
                    self.error(f"--config {path}: {key} takes true or false, got {value!r}")
                continue
            if isinstance(value, list) and action.nargs in (None, "?"):
                self.error(f"--config {path}: {key} takes one value, got a list")
            values_ = value if isinstance(value, list) else [value]
            tokens += [option, *(_token(v) for v in values_)]
        return tokens

    def error(self, message: str) -> None:  # type: ignore[override]
        if self._from_config is not None:
            path, options = self._from_config
            named = re.findall(r"--[\w-]+", message)
            if any(o in options for o in named):
                message += f" (the value may come from --config {path})"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _config_path(argv: list[str]) -> str | None:
    """The value of ``--config FILE`` / ``--config=FILE`` in ``argv`` (the last one), else None."""
    found = None
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--config="):
            found = token.split("=", 1)[1]
    return found


def _token(value: object) -> str:
    """A YAML scalar as the command line spells it (booleans as true/false for the ``--flag true`` options)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _RawEpilogFormatter(HelpFormatter):
    """Keep the epilog's line breaks (command examples); options are wrapped as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def is_main_process() -> bool:
    """Rank 0 of a launched run, or a plain process (launchers set ``RANK``; nothing else needs to be started)."""
    return int(os.environ.get("RANK", "0")) == 0


# Warnings other libraries print on every start that ask nothing of the user. bitsandbytes, imported by peft on
# any CPU with AVX512-BF16, looks for an optional 4-bit kernel on the Hugging Face hub (a package we do not install
# and a hub we cannot reach) and falls back to its own; the sentence would lead every script's output.
_NOISE = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


def _drop_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE.get(record.name, "\0"))


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging once, for scripts. Non-main processes of a distributed run log warnings only; the known
    start-up warnings of other libraries that need no action (``_NOISE``) are dropped, their other messages kept."""
    root = logging.getLogger()
    if not root.handlers:  # keep handlers someone else installed (a host application, pytest)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root.setLevel(level if is_main_process() else logging.WARNING)
    for name in _NOISE:
        noisy = logging.getLogger(name)
        if _drop_noise not in noisy.filters:
            noisy.addFilter(_drop_noise)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


EVALUATION_SETS = {
    "forget": "items that were to be forgotten (MIA members)",
    "retain": "items to keep",
    "holdout": "items like the forget set, never trained on (MIA non-members)",
    "general": "general-knowledge questions with reference answers",
    "refusals": "refusal sentences, one a line (refusal rate)",
}


def add_evaluation_sets(parser: argparse.ArgumentParser, names: tuple[str, ...] = tuple(EVALUATION_SETS)) -> None:
    """The evaluation sets of the audit commands, one vocabulary: ``--forget`` (required), ``--retain``,
    ``--holdout``, ``--general`` (JSONL in the training format) and ``--refusals`` (text)."""
    group = parser.add_argument_group("sets (JSONL in the training format; at least --forget)")
    for name in names:
        group.add_argument(f"--{name}", required=name == "forget", help=EVALUATION_SETS[name])


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
