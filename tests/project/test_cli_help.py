"""Every `--help` line reads as written: rich markup must not eat any part of a help text."""

from __future__ import annotations

import inspect
import re

import pytest
import typer


def _commands():
    from kdpipe import cli

    return [c.name or c.callback.__name__ for c in cli.app.registered_commands]


@pytest.mark.parametrize("command", _commands())
def test_every_option_help_prints_in_full(run_cli, monkeypatch, command):
    from kdpipe import cli

    monkeypatch.setenv("TERMINAL_WIDTH", "400")  # one line per option, so each help text is contiguous
    code, out = run_cli(command, "--help")
    assert code == 0, out
    text = re.sub(r"\s+", " ", out.replace("│", " "))
    callback = next(c.callback for c in cli.app.registered_commands if (c.name or c.callback.__name__) == command)
    for name, param in inspect.signature(callback).parameters.items():
        info = param.default
        if not isinstance(info, (typer.models.OptionInfo, typer.models.ArgumentInfo)) or not info.help:
            continue
        help_text = re.sub(r"\s+", " ", info.help)
        assert help_text in text, f"{command} --help lost part of the help of {name!r}: {help_text!r}"
        if isinstance(info.show_default, str):
            assert f"[default: ({info.show_default})]" in text, f"{command} {name}: default not shown"
    assert "[default: ]" not in text


def test_every_command_summary_is_one_line():
    """`kdpipe --help` lists each command with its docstring's first paragraph, line breaks kept: one line each."""
    from kdpipe import cli

    for c in cli.app.registered_commands:
        summary = inspect.getdoc(c.callback).split("\n\n")[0]
        assert "\n" not in summary, f"{c.name}: the first paragraph of its docstring spans lines: {summary!r}"


def test_version_prints_kdpipes_and_the_libraries_versions_on_one_line(run_cli):
    import torch
    import transformers

    import kdpipe

    code, out = run_cli("--version")
    assert code == 0, out
    line = out.strip()
    assert "\n" not in line and line.startswith(f"kdpipe {kdpipe.__version__} (")
    assert f"torch {torch.__version__}" in line and f"transformers {transformers.__version__}" in line
