"""mkdocs hook (mkdocs.yml `hooks:`): the pages write a pipe inside a code span of a table row as `\\|`, which GitHub
needs to keep the row whole; Python-Markdown already keeps such pipes inside the cell and would print the
backslash, so the site drops it."""

from __future__ import annotations

import re

CODE_SPAN = re.compile(r"`[^`\n]*`")


def on_page_markdown(markdown: str, **_) -> str:
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("|"):
            lines[i] = CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)
    return "\n".join(lines)
