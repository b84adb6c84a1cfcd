"""Prompt templates and class lists for zero-shot classification: the two plain-text inputs a user writes.

Templates file: one template per line, `{}` where the class name goes ("一张{}的照片"); blank lines and
lines starting with `#` are ignored.

Class list: one class per line, `key: 名称1, 名称2` (the key is the image sub-folder's name; after the
first `:`, `：` or tab come one or more Chinese names of the class, separated by `,`, `，` or `、`).
Every name is put into every template; CLIP's prompt ensembling averages them all per class.

Mistakes are reported as DataError naming the file and the line, before any model work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

# Shipped inside the package (package data), so an installed cnclip has them wherever it runs.
ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_TEMPLATES = ASSETS / "zeroshot_templates.txt"
# Class lists that ship with cnclip, usable by name: --classes cifar10
BUNDLED_CLASS_LISTS = {"cifar10": ASSETS / "cifar10_classes.txt"}
PLACEHOLDER = "{}"
_KEY_SEPARATOR = re.compile(r"[:：\t]")
_NAME_SEPARATOR = re.compile(r"[,，、]")


def _content_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of every non-blank, non-comment line."""
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {what} file is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return _numbered_lines(text)


def _numbered_lines(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")]


def load_templates(path: str | Path | None = None, single: bool = False) -> list[str]:
    """The templates of a file (default: the 23 shipped templates, cnclip/assets/zeroshot_templates.txt); `single` keeps only the first."""
    path = Path(path) if path else DEFAULT_TEMPLATES
    templates: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in _content_lines(path, "templates"):
        if PLACEHOLDER not in line:
            raise DataError(f"{path}:{lineno}: template {line!r} has no {{}} where the class name goes "
                            f"(e.g. 一张{{}}的照片)")
        if line in seen:
            raise DataError(f"{path}:{lineno}: template {line!r} repeats line {seen[line]} "
                            f"(a repeat would count twice in the ensemble)")
        seen[line] = lineno
        templates.append(line)
    if not templates:
        raise DataError(f"{path}: no templates (expected one per line, like 一张{{}}的照片; '#' starts a comment)")
    return templates[:1] if single else templates


@dataclass(frozen=True)
class ClassList:
    """Class keys (image sub-folder names) in file order, and the Chinese names of each."""

    path: Path
    keys: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.keys)

    def index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys)}

    def label(self, i: int) -> str:
        """'key (first name)' for printouts, or just the name when the key is the name."""
        key, name = self.keys[i], self.names[i][0]
        return name if key == name else f"{key} ({name})"


def load_classes(path: str | Path) -> ClassList:
    """A class list file, or the name of one that ships with cnclip (see BUNDLED_CLASS_LISTS)."""
    path = BUNDLED_CLASS_LISTS[str(path)] if str(path) in BUNDLED_CLASS_LISTS and not Path(path).exists() else Path(path)
    return _parse_classes(_content_lines(path, "class list"), path)


def parse_classes(text: str, source: str = "<classes>") -> ClassList:
    """A class list given as text (a web form, say), with the file format's rules; `source` names it in errors."""
    return _parse_classes(_numbered_lines(text), Path(source))


def _parse_classes(lines: list[tuple[int, str]], path: Path) -> ClassList:
    keys: list[str] = []
    names: list[tuple[str, ...]] = []
    key_line: dict[str, int] = {}
    name_owner: dict[str, tuple[str, int]] = {}
    for lineno, line in lines:
        where = f"{path}:{lineno}"
        parts = _KEY_SEPARATOR.split(line, maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{where}: expected 'key: 名称1, 名称2' (key, then ':' or a tab, then the "
                            f"Chinese names), got {line!r}")
        key = parts[0].strip()
        synonyms = tuple(dict.fromkeys(n.strip() for n in _NAME_SEPARATOR.split(parts[1]) if n.strip()))
        if not key:
            raise DataError(f"{where}: empty class key in {line!r}")
        if "/" in key or "\\" in key or key in (".", ".."):
            raise DataError(f"{where}: class key {key!r} cannot be a folder name")
        if not synonyms:
            raise DataError(f"{where}: class {key!r} has no names after the separator")
        if key in key_line:
            raise DataError(f"{where}: class key {key!r} repeats line {key_line[key]}")
        for name in synonyms:
            if name in name_owner:
                other, other_line = name_owner[name]
                raise DataError(f"{where}: name {name!r} of class {key!r} is also a name of class {other!r} "
                                f"(line {other_line}); the two classes could not be told apart")
            name_owner[name] = (key, lineno)
        key_line[key] = lineno
        keys.append(key)
        names.append(synonyms)
    if not keys:
        raise DataError(f"{path}: no classes (expected lines like 'cat: 猫, 猫咪')")
    if len(keys) < 2:
        raise DataError(f"{path}: only one class ({keys[0]!r}); classification needs at least two")
    return ClassList(path, tuple(keys), tuple(names))


def build_prompts(templates: list[str], classes: ClassList) -> tuple[list[str], list[int]]:
    """Every template filled with every name of every class, and the class each prompt belongs to."""
    texts: list[str] = []
    owners: list[int] = []
    for c, synonyms in enumerate(classes.names):
        for name in synonyms:
            for template in templates:
                texts.append(template.replace(PLACEHOLDER, name))
                owners.append(c)
    return texts, owners
