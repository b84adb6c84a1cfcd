"""Reading README.md and the documentation pages (docs/*.md) the way the tests that check them need.

Tests that compare a documented table or block with the code find it with `doc_section(page, heading)`,
so a section can move between pages by changing one argument, and a missing section fails loudly
(naming the page and the heading) instead of silently checking nothing.

Headings are recognised outside fenced code only; anchors are computed as both the site (mkdocs,
Python-Markdown's `toc` slugify) and GitHub compute them.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    line: int  # 0-based index into the page's lines


def pages() -> list[Path]:
    """README.md and every page of the documentation site."""
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def _lines(page: str | Path) -> list[str]:
    path = page if isinstance(page, Path) else REPO / page
    return path.read_text(encoding="utf-8").split("\n")


def outside_fences(lines: list[str]) -> list[bool]:
    """For each line: True when it is markdown text, False inside a fenced code block (fences included)."""
    flags, fenced = [], False
    for line in lines:
        if FENCE.match(line):
            flags.append(False)
            fenced = not fenced
        else:
            flags.append(not fenced)
    return flags


def headings(page: str | Path) -> list[Heading]:
    lines = _lines(page)
    found = []
    for i, (line, text) in enumerate(zip(lines, outside_fences(lines))):
        match = HEADING.match(line) if text else None
        if match:
            found.append(Heading(len(match[1]), match[2], i))
    return found


def doc_section(page: str | Path, heading: str) -> str:
    """The section of `page` (a path relative to the repository, e.g. "docs/layout.md") whose heading
    text is `heading`, from its heading line up to the next heading of the same or a higher level."""
    lines = _lines(page)
    found = headings(page)
    matches = [h for h in found if h.text == heading]
    assert len(matches) == 1, f"{page}: expected one heading {heading!r}, found {len(matches)}"
    start = matches[0]
    end = next((h.line for h in found if h.line > start.line and h.level <= start.level), len(lines))
    return "\n".join(lines[start.line:end])


def site_anchor(heading: str) -> str:
    """The anchor mkdocs gives a heading (Python-Markdown's toc.slugify, which mkdocs uses by default)."""
    from markdown.extensions.toc import slugify

    return slugify(_plain(heading), "-")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    text = unicodedata.normalize("NFC", _plain(heading)).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _plain(heading: str) -> str:
    """Heading text as rendered: code spans, emphasis and link targets reduced to their text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[`*]", "", text)


def anchors(page: str | Path) -> set[str]:
    return {site_anchor(h.text) for h in headings(page)}


def tables(page: str | Path) -> list[list[tuple[int, str]]]:
    """Every markdown table of `page` (outside fenced code): its rows as (1-based line number, text),
    header first, delimiter row second. Tables may be indented (inside a list item)."""
    lines = _lines(page)
    text = outside_fences(lines)
    delimiter = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
    found, i = [], 0
    while i < len(lines) - 1:
        if text[i] and lines[i].lstrip().startswith("|") and delimiter.match(lines[i + 1]):
            rows = [(i + 1, lines[i]), (i + 2, lines[i + 1])]
            j = i + 2
            while j < len(lines) and text[j] and lines[j].lstrip().startswith("|"):
                rows.append((j + 1, lines[j]))
                j += 1
            found.append(rows)
            i = j
        else:
            i += 1
    return found


def cells(row: str) -> list[str]:
    """A table row's cells, split the way GitHub splits them: at every pipe not escaped with a
    backslash, code spans included (the outer pipes of `| a | b |` bound the row, they add no cell)."""
    row = row.strip()
    parts = re.split(r"(?<!\\)\|", row)
    if row.startswith("|"):
        parts = parts[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        parts = parts[:-1]
    return [p.strip() for p in parts]
