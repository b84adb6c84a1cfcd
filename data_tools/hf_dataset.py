"""`data_tools from-hf`: an image-text data set in Hugging Face `datasets` form -> the Chinese-CLIP layout.

Many Chinese image-text sets are published on the Hub (or kept as Parquet files) with an image
column and one or more captions per row. This writes one split of such a set as
`{split}_imgs.tsv` + `{split}_texts.jsonl`, so `python -m cnclip.finetune` trains on it directly.
Rows are streamed (memory does not grow with the set); identical images share one image id, so
several captions of one picture become positives of the same image; every row is counted as
converted or skipped with a reason.

It is a thin path over the reader training uses for `data.format: hf` (cnclip.data_formats):
same opening rules, same image cells, same captions. Convert when you want a frozen copy in
the Chinese-CLIP layout (e.g. to share it); to train, `data.format: hf` reads the set directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cnclip.atomic import atomic_file, write_json
from cnclip.data_formats import captions_of, image_bytes_of, open_hf
from cnclip.errors import DataError
from cnclip.image_sources import ImagePathRefused
from cnclip.images import decode_rgb


@dataclass
class Conversion:
    rows: int = 0
    images: int = 0
    texts: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, row: int, detail: str = "") -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(f"row {row}" + (f": {detail}" if detail else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "images": self.images, "texts": self.texts,
                "skipped": dict(self.skipped), "examples": self.examples}


def open_rows(source: str, split: str, config: str | None, image_column: str) -> Iterable[dict]:
    """Stream the rows of a Hub id, a `save_to_disk` directory or a data file, images left as bytes."""
    return open_hf(source, split, config, image_column, streaming=True)


def convert(rows: Iterable[dict], out: Path, split: str, image_column: str, text_column: str,
            base_dir: Path | None = None, limit: int | None = None) -> Conversion:
    out.mkdir(parents=True, exist_ok=True)
    result = Conversion()
    image_ids: dict[bytes, int] = {}
    with atomic_file(out / f"{split}_imgs.tsv", "w", encoding="utf-8") as imgs, \
            atomic_file(out / f"{split}_texts.jsonl", "w", encoding="utf-8") as texts:
        for row_number, row in enumerate(rows):
            if limit is not None and row_number >= limit:
                break
            result.rows += 1
            if text_column not in row:
                raise DataError(f"no column '{text_column}'; columns: {', '.join(row)}")
            captions = captions_of(row.get(text_column))
            if not captions:
                result.skip("no caption", row_number)
                continue
            try:
                data = image_bytes_of(row.get(image_column), base_dir)
                decode_rgb(data)
            except ImagePathRefused as refused:  # a path leaving the set's directory, missing, too large
                result.skip(refused.reason, row_number, refused.detail)
                continue
            except (ValueError, OSError) as exc:
                result.skip("undecodable image", row_number, str(exc))
                continue
            digest = hashlib.sha256(data).digest()
            image_id = image_ids.get(digest)
            if image_id is None:
                image_id = image_ids[digest] = len(image_ids) + 1
                imgs.write(f"{image_id}\t{base64.urlsafe_b64encode(data).decode('ascii')}\n")
            for caption in captions:
                result.texts += 1
                texts.write(json.dumps({"text_id": result.texts, "text": caption, "image_ids": [image_id]},
                                       ensure_ascii=False) + "\n")
    result.images = len(image_ids)
    write_json(out / f"{split}_from_hf_report.json", result.to_dict())
    return result
