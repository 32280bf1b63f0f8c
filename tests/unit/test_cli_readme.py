"""The README's Command line section is the parser's: each `palette` command there has its
subcommands, flags and choices, and each flag it shows is one the command takes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from adapters.cli import parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _command_lines() -> list[str]:
    section = README.read_text().split("\n## Command line\n", 1)[1]
    block = section.split("```", 2)[1]
    return [line for line in block.splitlines() if line.startswith("palette ")]


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _words(p: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """The subcommand names and choices, and the long flags, of ``p`` and every parser under it."""
    names: set[str] = set()
    flags: set[str] = set()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                sub_names, sub_flags = _words(sub)
                names |= {name, *sub_names}
                flags |= sub_flags
            continue
        flags.update(f for f in action.option_strings if f.startswith("--"))
        names.update(str(c) for c in action.choices or ())
    return names, flags


def test_every_command_flag_and_choice_is_in_the_command_line_section_and_no_other() -> None:
    lines = _command_lines()
    commands = _subcommands(parser())
    shown = {line.split()[1] for line in lines}
    assert sorted(shown - set(commands)) == [], "the README shows commands the parser lacks"
    missing: dict[str, list[str]] = {}
    unknown: dict[str, list[str]] = {}
    for command, sub in commands.items():
        text = " ".join(line for line in lines if line.split()[1] == command)
        names, flags = _words(sub)
        written_flags = set(re.findall(r"--[a-z][a-z0-9-]*", text))
        if absent := sorted((names - set(re.findall(r"[\w-]+", text))) | (flags - written_flags)):
            missing[command] = absent
        if extra := sorted(written_flags - flags):
            unknown[command] = extra
    assert missing == {}, "subcommands, choices or flags the README's Command line omits"
    assert unknown == {}, "flags the README's Command line shows that the command lacks"
