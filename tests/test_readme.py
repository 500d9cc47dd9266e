"""The README's commands compose: every ``python -m rlskip.<entry>`` line in its shell blocks names keys, groups and
values the configuration schema accepts, so a renamed option cannot leave a documented command behind."""

import re
import shlex
from pathlib import Path

import pytest

from rlskip.config import compose
from rlskip.generate import overrides as generate_overrides

README = Path(__file__).resolve().parents[1] / "README.md"
ENTRIES = {"rlskip.train": "config", "rlskip.evaluate": "evaluate", "rlskip.generate": "generate", "rlskip.serve": "serve"}


def readme_commands() -> list[tuple[int, str, list[str]]]:
    """``(line, entry, overrides)`` of each command in the README's fenced shell blocks; ``<placeholders>`` become
    a plain word, continued lines are joined, comments dropped."""
    commands, block, start, in_shell = [], "", 0, False
    for no, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_shell = not in_shell and line.strip() in ("```bash", "```sh", "```shell")
            continue
        if not in_shell:
            continue
        if not block:
            start = no
        block += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        words = shlex.split(re.sub(r"<[^>]*>", "placeholder", block), comments=True)
        block = ""
        for i, w in enumerate(words[:-1]):
            if w == "-m" and words[i + 1] in ENTRIES:
                args = []
                for a in words[i + 2 :]:
                    if a in ("&&", "|", ";"):
                        break
                    args.append(a)
                commands.append((start, words[i + 1], args))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    entries = {e for _, e, _ in COMMANDS}
    assert entries == set(ENTRIES), f"README commands found for {sorted(entries)} only"
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("line,entry,args", COMMANDS, ids=[f"README:{n}" for n, _, _ in COMMANDS])
def test_a_readme_command_composes(line, entry, args):
    if entry == "rlskip.train":  # resume= reads the run's saved config; the rest are overrides of it
        args = [a for a in args if not a.startswith("resume=")]
    if entry == "rlskip.generate":
        args = generate_overrides(args)
    compose(args, ENTRIES[entry])
