"""The scripts' parser and flags: one-line errors, help without None defaults, booleans."""

from __future__ import annotations

import argparse
import logging

import pytest

from utils.cli import bool_arg, setup_logging, str2bool


@pytest.mark.parametrize(("text", "value"), [("false", False), ("False", False), ("0", False), ("true", True),
                                             ("YES", True)])
def test_str2bool(text, value):
    assert str2bool(text) is value


def test_bool_flag_parses_false_as_false():
    parser = argparse.ArgumentParser()
    bool_arg(parser.add_argument_group("g"), "--mask", False, "mask questions")
    assert parser.parse_args(["--mask", "false"]).mask is False
    assert parser.parse_args(["--mask", "true"]).mask is True
    assert parser.parse_args(["--mask"]).mask is True
    assert parser.parse_args([]).mask is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--mask", "maybe"])


def test_script_parser_errors_in_one_line_and_help_without_none_defaults(capsys):
    """An argument error is one line (exit 2, no usage block); --help shows no '(default: None)' for required
    or unset options and keeps a docstring command's line breaks in the epilog."""
    from utils.cli import ScriptParser, bool_arg

    doc = """Do a thing.

    python thing.py --a 1 \\
        --b 2
    """
    parser = ScriptParser(doc, prog="thing.py")
    parser.add_argument("--a", required=True, help="needed")
    parser.add_argument("--b", default=None, help="optional")
    parser.add_argument("--c", type=int, default=3, help="has one")
    bool_arg(parser, "--flag", False, "a switch")
    parser.add_argument("--d", default=["all"], help="modules (default: every linear layer)")
    parser.add_argument("--e", default="off", help="run code (off by default)")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--a", "1", "--c", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "usage" not in err and "--c" in err
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: 3)" in text and "yes/no" in text
    assert "(default: ['all'])" not in text and "(default: off)" not in text  # the help says it already
    assert "python thing.py --a 1 \\\n        --b 2" in text


INTERRUPTED_UNDER_A_BAR = r"""
import sys
sys.path.insert(0, {root!r})
from tqdm import tqdm
from utils.cli import run_cli
def main(argv):
    bar = tqdm(total=10, file=sys.stderr)
    bar.update(3)
    raise KeyboardInterrupt("the last complete checkpoint is X")
run_cli(main)
"""


def test_ctrl_c_under_a_progress_bar_is_one_line_of_its_own():
    """Ctrl-C while a training bar is drawn mid-line: the 'interrupted' line starts a line (it used to follow the
    bar on the same line, which a timing-dependent CI run caught), exit code 130."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_UNDER_A_BAR.format(root=root)], capture_output=True,
                          text=True)
    assert proc.returncode == 130
    said = [line for line in proc.stderr.splitlines() if line.startswith("interrupted")]
    assert said == ["interrupted: the last complete checkpoint is X"], proc.stderr


FINISHED_RANK = """
import atexit, logging, sys
sys.path.insert(0, {root!r})
from utils.cli import run_cli
class Finalized:
    def __del__(self):
        print("finalized")
kept = Finalized()  # a module global: its __del__ runs in the interpreter's finalization
def main(argv):
    atexit.register(lambda: print("atexit ran"))  # a tracker closing its run
    print("work done")
    logging.getLogger("x").warning("last words")
run_cli(main)
"""


@pytest.mark.parametrize(("world_size", "finalized"), [("2", False), ("1", True)])
def test_a_finished_rank_of_a_launch_exits_0_without_the_teardown(world_size, finalized):
    """Under a launcher (WORLD_SIZE > 1) a rank that has finished leaves with exit code 0, its output flushed and
    its atexit handlers run, but the interpreter's finalization skipped (where gloo's threads aborted a finished
    ZeRO-3 run in CI); a plain run ends normally."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", FINISHED_RANK.format(root=root)], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
                               "WORLD_SIZE": world_size})  # buffered, as a launcher's pipe is: flushing is tested
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["work done", "atexit ran", *(["finalized"] if finalized else [])]
    assert "last words" in proc.stderr


def test_config_file_gives_defaults_the_command_line_overrides(tmp_path, capsys):
    """--config FILE (YAML, keys = option names) for every script: its values go through the options' own types
    and choices; the command line wins; an unknown key, a wrong value and bad YAML are one error naming the file."""
    from trainer.recipe import build_parser

    parser = build_parser("me_gd", "doc")
    config = tmp_path / "run.yaml"
    config.write_text("model_path: models/x\nlr: 1.0e-4\nmask: true\nlora_target_modules: [q_proj, v_proj]\n"
                      "loss_type: NPO+GD\nbf16: null\n")
    args = parser.parse_args(["--config", str(config), "--lr", "2e-4"])
    assert (args.model_path, args.lr, args.mask, args.lora_target_modules, args.loss_type, args.bf16) == (
        "models/x", 2e-4, True, ["q_proj", "v_proj"], "NPO+GD", None)
    assert parser.parse_args(["--config", str(config)]).lr == 1e-4
    cases = {"learning_rate: 1\n": "unknown option 'learning_rate'", "lr: fast\n": "invalid float value",
             "loss_type: XYZ\n": "invalid choice", "lr: [1\n": "not valid YAML", "- 1\n": "expected a mapping",
             "lr: [1, 2]\n": "takes one value", "distributed_type: DEEPSPEED\n": "is an accelerate config"}
    for text, expected in cases.items():
        config.write_text("model_path: m\n" + text if not text.startswith("-") else text)
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--config", str(config)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and expected in err and str(config) in err, err
        assert len(err.strip().splitlines()) == 1


def test_setup_logging_drops_the_bitsandbytes_kernel_warning_and_keeps_its_others(caplog):
    """The hub-kernel warning bitsandbytes logs at import on AVX512-BF16 CPUs leads no script's output any more (it
    broke the one-line error of a second run in CI); any other bitsandbytes warning still shows."""
    noisy, level = logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger().level
    setup_logging()
    try:
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                      "already `pip install kernels`", "No module named 'kernels'")
        noisy.warning("something else went wrong")
    finally:
        noisy.filters.clear()
        logging.getLogger().setLevel(level)
    assert [r.getMessage() for r in caplog.records if r.name == noisy.name] == ["something else went wrong"]
