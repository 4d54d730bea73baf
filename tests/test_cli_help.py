"""The command's help: every option explained with its default, a plain top line, parsed before torch is imported."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import attnlens_cli
from attnlens import cli


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_has_help_and_its_default(name: str) -> None:
    command = _commands()[name]
    page = command.format_help()
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{name} {flag} has no help"
        stated = "default" in action.help or "required" in action.help
        shown = f"(default: {action.default})" in " ".join(page.split())
        flag_off = isinstance(action, argparse._StoreTrueAction)
        assert stated or shown or flag_off, f"{name} {flag}: its default is neither shown nor stated"


def test_top_line_is_plain_text() -> None:
    page = cli._parser().format_help()
    assert "``" not in page and ":mod:" not in page and "attnlens: quick looks" in page
    for command in _commands().values():
        assert "``" not in command.format_help()


def test_help_and_usage_errors_never_import_torch() -> None:
    code = (
        "import sys, attnlens_cli\n"
        "for argv in (['--help'], ['scan', '--help'], ['verify', '--dtype', 'nope']):\n"
        "    try:\n"
        "        attnlens_cli.main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, 2), exit.code\n"
        "print('imported:', sorted(m for m in ('torch', 'transformers', 'attnlens') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "imported: []", out.stdout[-300:]
    assert "usage: attnlens" in out.stdout  # the help was printed
    assert "invalid choice: 'nope'" in out.stderr


def test_a_parsed_command_runs_through_attnlens_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert attnlens_cli.main(["weights", "--layer", "1"]) == 0
    assert "W_E (token embedding)" in capsys.readouterr().out
