"""`{split}_texts.jsonl` of the Chinese-CLIP layout, read without torch (training reads it through cnclip.data;
the search index reads captions from it on the torch-free onnx path).

Every bad line is counted in the caller's SkipLog with its file and line, never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .skiplog import SkipLog


@dataclass(frozen=True, slots=True)  # no per-record __dict__: a split holds one per caption
class TextRecord:
    text_id: int
    text: str
    image_ids: tuple[int, ...]


def _valid_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_texts(path: str | Path, skips: SkipLog) -> list[TextRecord]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    records: list[TextRecord] = []
    seen: set[int] = set()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skips.skip("malformed text line", where, "not UTF-8")
                continue
            except json.JSONDecodeError as exc:
                skips.skip("malformed text line", where, f"invalid JSON: {exc.msg}")
                continue
            if not isinstance(obj, dict):
                skips.skip("malformed text line", where, "not a JSON object")
                continue
            text_id, text, image_ids = obj.get("text_id"), obj.get("text"), obj.get("image_ids", [])
            if not _valid_id(text_id):
                skips.skip("malformed text line", where, "text_id must be an integer")
            elif not isinstance(text, str) or not text.strip():
                skips.skip("malformed text line", where, "text must be a non-empty string")
            elif not isinstance(image_ids, list) or not all(_valid_id(i) for i in image_ids):
                skips.skip("malformed text line", where, "image_ids must be a list of integers")
            elif text_id in seen:
                skips.skip("duplicate text id", where, f"text_id {text_id} seen before; first kept")
            else:
                seen.add(text_id)
                records.append(TextRecord(text_id, text.strip(), tuple(dict.fromkeys(image_ids))))
    return records
