"""Every command's --help explains every flag with its effective default, and a command-line
mistake (an unknown flag, a bad value) gets one message from argparse, never a traceback."""

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (module, the arguments before --help): every command and subcommand a user runs
COMMANDS = [("train", []), ("finetune", []), ("evaluate", []), ("bench", []), ("bench", ["prepared"]),
            ("bench", ["loader"]), ("data", ["prepare"]), ("data", ["stats"]), ("text_embed", []),
            ("builtin_data", ["render"]), ("builtin_data", ["captions"]), ("features", ["embed"]),
            ("features", ["export"]), ("features", ["tag"]), ("caption", []), ("caption", ["predict"])]


def parsers_of(module: str, argv: list[str], monkeypatch) -> list[argparse.ArgumentParser]:
    """The parsers `module.main(argv + ["--help"])` builds, caught as they parse (nothing runs)."""
    caught, parse = [], argparse.ArgumentParser.parse_known_args

    def catch(self, args=None, namespace=None):
        if not self.add_help:  # a pre-parser that only peeks at one flag (train.py's --stage)
            return parse(self, args, namespace)
        caught.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([*argv, "--help"])
    return caught


def flags(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from flags(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


@pytest.mark.parametrize("module,argv", COMMANDS, ids=[" ".join([m, *a]) for m, a in COMMANDS])
def test_every_flag_has_help_that_states_its_default(module, argv, monkeypatch):
    parsers = parsers_of(module, argv, monkeypatch)
    assert parsers
    for parser in parsers:
        for action in flags(parser):
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{module} {' '.join(argv)}: {name} has no help text"
            if not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
                assert "default" in action.help, f"{module} {' '.join(argv)}: {name}'s help does not state its " \
                                                 f"default {action.default!r}: {action.help!r}"


@pytest.mark.parametrize("argv,message", [
    (["finetune.py", "--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["evaluate.py", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["features.py", "embed", "--checkpoint"], "argument --checkpoint: expected one argument"),
])
def test_a_command_line_mistake_prints_one_message_and_no_traceback(argv, message):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
