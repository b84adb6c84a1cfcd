"""The documentation: README.md and the mkdocs site in docs/ build without a broken link or anchor,
every table is well formed, and every file they name is in the repository.

`mkdocs build --strict` checks the pages' own links and anchors (mkdocs.yml turns missing pages,
missing anchors and pages left out of the nav into warnings, and --strict into errors);
`test_a_broken_page_fails_the_strict_build` proves each of those checks is on. README is not part
of the site (it lives at the repository root, where GitHub shows it), so its links are checked here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from doc_pages import (DOCS, REPO, anchors, cells, github_anchor, headings, pages, site_anchor, tables)

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A path the docs name inside backticks: a repository folder and a file with an extension, or a
# top-level markdown file. `file.py::test_name[param]` also names a test in that file.
NAMED_PATH = re.compile(r"`((?:cnclip|data_tools|tests|recipes|benchmarks|docs|\.ci)/[\w./-]*\.\w+|[\w.-]+\.md)"
                        r"(?:::(\w+)(?:\[[^\]]*\])?)?`")
# A top-level document named in the text (DESIGN.md, CONTRIBUTING.md ...), with or without backticks.
TOP_LEVEL_DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z_-]+\.md)\b")
GENERATED = ("tests/artifacts/",)  # written by the test suite, ignored by git


def build(config: Path, out: Path) -> subprocess.CompletedProcess:
    # No --quiet: it raises the log level above WARNING, so --strict would count no warnings and pass.
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "-d", str(out)], capture_output=True, text=True, timeout=300)


def test_the_site_builds_with_strict_link_and_anchor_checks(tmp_path):
    result = build(REPO / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    built = {p.parent.name or "index" for p in (tmp_path / "site").rglob("index.html")}
    assert {p.stem for p in DOCS.glob("*.md")} <= built | {"index"}


@pytest.mark.parametrize("page, text, warning", [
    ("search.md", "[gone](no-such-page.md)", "no-such-page.md"),
    ("search.md", "[gone](training.md#no-such-heading)", "no-such-heading"),
    ("search.md", "[gone](#no-such-heading)", "no-such-heading"),
    ("orphan.md", "# A page nobody listed in the nav", "orphan.md"),
])
def test_a_broken_page_fails_the_strict_build(tmp_path, page, text, warning):
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    target = tmp_path / "docs" / page
    target.write_text((target.read_text(encoding="utf-8") if target.exists() else "") + f"\n\n{text}\n",
                      encoding="utf-8")
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0 and warning in result.stderr, result.stderr[-3000:]


def test_readme_links_reach_files_and_headings():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = [t for t in LINK.findall(readme) if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") and t.endswith(".png") for t in targets)  # the picture
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = REPO / path if path else REPO / "README.md"
        if not file.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{target}: no such heading in {file.relative_to(REPO)}")
    assert broken == []


def test_readme_links_every_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {t.partition("#")[0] for t in LINK.findall(readme)}
    assert {f"docs/{p.name}" for p in DOCS.glob("*.md")} - linked == set()


def test_headings_have_the_same_anchor_on_github_and_on_the_site():
    # A link written against one renderer's anchors must work on the other (README's links are
    # followed on GitHub, the pages' links on the site and on GitHub).
    differ = [f"{page.relative_to(REPO)}: {h.text!r}: site #{site_anchor(h.text)}, GitHub #{github_anchor(h.text)}"
              for page in pages() for h in headings(page) if site_anchor(h.text) != github_anchor(h.text)]
    assert differ == []


def test_every_table_row_has_as_many_cells_as_its_header():
    bad = []
    for page in pages():
        for table in tables(page):
            width = len(cells(table[0][1]))
            for line, row in table:
                if len(cells(row)) != width:
                    bad.append(f"{page.relative_to(REPO)}:{line}: {len(cells(row))} cells, header has {width}")
                if "\\|" in row:  # GitHub shows `\|` in a code span as |, the site as \|
                    bad.append(f"{page.relative_to(REPO)}:{line}: escaped pipe; reword without |")
    assert bad == []


def test_every_file_and_test_the_docs_name_is_in_the_repository():
    missing = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        named = NAMED_PATH.findall(text) + [(name, "") for name in TOP_LEVEL_DOC.findall(text)]
        for path, test in named:
            if path.startswith(GENERATED) or "*" in path:
                continue
            file = REPO / path
            if not file.is_file():
                missing.append(f"{page.relative_to(REPO)}: {path}")
            elif test and not re.search(rf"^\s*def {test}\(", file.read_text(encoding="utf-8"), re.M):
                missing.append(f"{page.relative_to(REPO)}: {path}::{test}")
    assert missing == []


def test_the_site_shows_readmes_two_set_up_commands():
    def commands(text: str) -> list[str]:
        return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
                if line.startswith("python3 -m venv")]
    readme = commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(readme) == 2
    assert commands((DOCS / "index.md").read_text(encoding="utf-8")) == readme
