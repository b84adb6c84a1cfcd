"""The per-record stages, composed in the order they run in a worker.

Cheap checks come first (fields, image reference), then text and relevance, and image decoding
last, because decoding is by far the most expensive step and most junk is caught before it.
With --download, a record whose image is only a URL stops after the text stages (`prepare`
returns the URL); the shard fetches it (data_tools.download) and hands the bytes to
`attach_image`, so records with unusable text are never fetched.
"""

from __future__ import annotations

from pathlib import Path

from data_tools.config import FilterConfig
from data_tools.download import DownloadOptions
from data_tools.images import check_image_reference, process_image, read_image_bytes
from data_tools.readers import parse_item
from data_tools.records import RawItem, Reason, Record, Rejected
from data_tools.relevance import Relevance
from data_tools.text import CHECK_ORDER, TextFilter


class RecordProcessor:
    """Holds the per-process state of the stages (jieba, OpenCC tables, compiled rules)."""

    def __init__(self, config: FilterConfig, download: DownloadOptions | None = None) -> None:
        self.config = config
        self.download = download  # None: a URL-only record is rejected as no_image
        self.texts = TextFilter(config.text)
        self.relevance = Relevance(config.relevance.mode, config.relevance.stopwords)

    def process(self, item: RawItem, kind: str, base_dir: Path) -> Record:
        """Run every per-record stage on a record whose image is in the dump; returns it or raises Rejected."""
        record, url = self.prepare(item, kind, base_dir)
        if url is not None:
            raise Rejected(Reason.NO_IMAGE, "only a URL, to be fetched by the shard's downloader")
        self.finish_from_dump(record)
        return record

    def finish_from_dump(self, record: Record) -> None:
        """Read the image the record carries (inline or a file in the dump), then attach it."""
        try:
            data = read_image_bytes(record, self.config.image)
        except Rejected as rejection:
            rejection.query = record.query or None
            raise
        self.attach_image(record, data)

    def prepare(self, item: RawItem, kind: str, base_dir: Path) -> tuple[Record, str | None]:
        """Every stage before the image bytes; also returns the URL to fetch when the image must be downloaded."""
        record = parse_item(item, kind, base_dir)
        try:
            self.check_fields(record)
            url = self.download_url(record)
            if url is None:
                check_image_reference(record)
            self.choose_text(record)
        except Rejected as rejection:
            rejection.query = record.query or None
            raise
        return record, url

    def download_url(self, record: Record) -> str | None:
        """With --download: the http(s) URL of a record without image bytes (`image` itself, or `url`)."""
        if self.download is None:
            return None
        image = record.image
        if isinstance(image, str) and image.lower().startswith(("http://", "https://")):
            return image
        if (image is None or image == "" or image == b"") and record.url:
            return record.url
        return None

    def check_fields(self, record: Record) -> None:
        """Normalise the query (it groups the per-query cap) and check the URL schemes.

        `url` and `page_url` end up in the output's provenance, where a `javascript:` or `file:`
        link is a hazard to whoever follows it; a crawler only ever records http(s) pages.
        """
        record.query = self.texts.clean(record.query)
        if not record.query:
            raise Rejected(Reason.MISSING_QUERY)
        for name, url in (("url", record.url), ("page_url", record.page_url)):
            if url and not url.lower().startswith(("http://", "https://")):
                raise Rejected(Reason.BAD_URL, f"only http/https URLs are accepted, {name}: {url[:200]}")

    def choose_text(self, record: Record) -> None:
        """Take the first candidate field (in configured preference) that passes the text and relevance rules.

        If none passes, the record is rejected with the reason of the candidate that got furthest
        through the checks, which is the most useful thing to tell the user.
        """
        furthest: Rejected | None = None
        for name in self.config.text.fields:
            raw = record.candidates.get(name)
            if not raw:
                continue
            text = self.texts.clean(raw)
            try:
                self.texts.check(text)
                if not self.relevance.is_relevant(text, record.query):
                    raise Rejected(Reason.IRRELEVANT_TEXT, f"{name} {text!r} vs query {record.query!r}")
            except Rejected as rejection:
                if furthest is None or CHECK_ORDER.index(rejection.reason) > CHECK_ORDER.index(furthest.reason):
                    furthest = rejection
                continue
            record.text, record.text_field = text, name
            return
        raise furthest or Rejected(Reason.NO_TEXT, f"none of {', '.join(self.config.text.fields)} is set")

    def attach_image(self, record: Record, data: bytes) -> None:
        """Decode, check and normalise the image bytes; fills the JPEG and the hashes."""
        try:
            processed = process_image(data, self.config.image)
        except Rejected as rejection:
            rejection.query = record.query or None
            raise
        record.jpeg = processed.jpeg
        record.image_sha = processed.sha
        record.phash = processed.phash
        record.colour = processed.colour
        record.width, record.height = processed.width, processed.height
