"""The README's code blocks, split as `tests/test_readme.py` runs them.

A block is a fenced ```sh or ```python block; other fences (text, toml, output) are prose. A
shell block is split into its commands: a command is one line, or several joined by a trailing
backslash or a here-document, as the shell reads them; comment-only lines and blank lines are
not commands. A command whose comment says `runs until stopped` is a service (`edgeseq serve
--listen ...`): the test starts it, talks to it and stops it, as a person would with Ctrl-C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")
HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")
SERVICE_MARK = "runs until stopped"
RUN_LANGUAGES = ("sh", "python")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # of the opening fence, 1-based

    @property
    def name(self) -> str:
        return f"README.md:{self.line}-{self.language}"


@dataclass(frozen=True)
class Command:
    text: str
    line: int

    @property
    def is_service(self) -> bool:
        return SERVICE_MARK in self.text

    @property
    def first_line(self) -> str:
        return self.text.splitlines()[0]


def blocks(readme: Path) -> list[Block]:
    """Every ```sh and ```python block of `readme`, in order."""
    found: list[Block] = []
    language: str | None = None
    start = 0
    body: list[str] = []
    for number, line in enumerate(readme.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if language is None and fence:
            language, start, body = fence.group(1), number, []
        elif language is not None and line.strip() == "```":
            if language in RUN_LANGUAGES:
                found.append(Block(language, "\n".join(body) + "\n", start))
            language = None
        elif language is not None:
            body.append(line)
    if language is not None:
        raise ValueError(f"README.md:{start}: the ```{language} block is never closed")
    return found


def commands(block: Block) -> list[Command]:
    """The shell commands of a ```sh block, each with its continuation and here-document lines."""
    lines = block.text.splitlines()
    found: list[Command] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        start = i
        while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
        heredoc = HEREDOC.search(lines[i])
        if heredoc:
            while i + 1 < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
        found.append(Command("\n".join(lines[start : i + 1]), block.line + 1 + start))
        i += 1
    return found
