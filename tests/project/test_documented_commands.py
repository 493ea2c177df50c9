"""Every `kdpipe ...` command the README and docs/ show in a bash block parses: its command exists and every flag it
passes is one of that command's, with a value of the right type. Parsed only (click's make_context), never run,
so a renamed or removed flag fails here instead of in a user's first copy-and-paste."""

from __future__ import annotations

import re
import shlex

import pytest
import typer

from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `kdpipe`) for each kdpipe command in a ```bash block, continuation lines joined."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                line = line.split(" #", 1)[0].strip()  # a trailing comment is not part of the command
                for part in line.split("&&"):
                    words = elide(shlex.split(re.sub(r"\[(--[^\]]*)\]", r"\1", part)))  # [--flag x]: optional
                    if "kdpipe" in words:  # kdpipe ..., or torchrun ... -m kdpipe ...
                        found.append((f"{path.name}: {part.strip()[:80]}", words[words.index("kdpipe") + 1:]))
    return found


def elide(words: list[str]) -> list[str]:
    """The docs' `...`: a flag's value left out becomes a placeholder; anything else left out is dropped."""
    kept = []
    for i, word in enumerate(words):
        if word != "...":
            kept.append(word)
        elif i and words[i - 1].startswith("--"):
            kept.append("PLACEHOLDER")
    return kept


COMMANDS = documented_commands()


def test_the_docs_show_every_command():
    from kdpipe import cli

    shown = {argv[0] for _, argv in COMMANDS if argv and not argv[0].startswith("-")}
    assert shown == {c.name or c.callback.__name__ for c in cli.app.registered_commands}


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses(where, argv):
    from kdpipe import cli

    group = typer.main.get_command(cli.app)
    command = group.get_command(typer.Context(group), argv[0])
    assert command is not None, f"{where}: no command {argv[0]!r}"
    try:
        command.make_context(argv[0], argv[1:])
    except Exception as e:  # an unknown flag, a missing value, a value of the wrong type (typer's own click)
        pytest.fail(f"{where}: {e}")
