"""The record that flows through the per-record stages, and the one reason it may be rejected for.

Every stage either fills in more of a `Record` or raises `Rejected` with exactly one `Reason`;
the pipeline counts the record under that reason. Keeping the reasons in one enum is what lets
the report promise `kept + sum(rejected) == records read`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

# The candidate caption fields of a crawl record, in the default order of preference.
TEXT_FIELDS = ("alt", "title", "context")


class Reason(StrEnum):
    """Why a record was dropped. The value is the key used in report.json."""

    # The input line/row itself is unusable.
    RECORD_TOO_LARGE = "record_too_large"  # a line or tar member beyond the reader's size limit, never held in memory
    INVALID_UTF8 = "invalid_utf8"  # also lone surrogates written as JSON escapes
    NUL_BYTE = "nul_byte"
    MALFORMED_JSON = "malformed_json"  # also nesting too deep and integers too long to convert
    NOT_AN_OBJECT = "not_an_object"
    BAD_FIELD_TYPE = "bad_field_type"
    FIELD_TOO_LONG = "field_too_long"  # a string field far beyond any caption, query or URL, rejected before cleaning
    # Required fields.
    MISSING_QUERY = "missing_query"
    BAD_URL = "bad_url"
    NO_IMAGE = "no_image"
    UNSAFE_IMAGE_PATH = "unsafe_image_path"
    UNSUPPORTED_TAR_MEMBER = "unsupported_tar_member"  # a link, device, FIFO or sparse file in a tar: never read
    # Text.
    NO_TEXT = "no_text"
    BOILERPLATE_TEXT = "boilerplate_text"
    TEXT_TOO_SHORT = "text_too_short"
    TEXT_TOO_LONG = "text_too_long"
    LOW_CHINESE_RATIO = "low_chinese_ratio"
    IRRELEVANT_TEXT = "irrelevant_text"
    # Image.
    IMAGE_MISSING = "image_missing"
    IMAGE_UNREADABLE = "image_unreadable"  # the file exists but cannot be read (permissions, symlink loop, name too long)
    UNDECODABLE_IMAGE = "undecodable_image"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
    # Download (--download; data_tools.download). RETRYABLE there says which --retry-failed reruns.
    BLOCKED_ADDRESS = "blocked_address"  # resolves to a loopback/private/metadata... address: nothing sent
    CONNECTION_ERROR = "connection_error"  # DNS failure, refused, reset, protocol error (after retries)
    DOWNLOAD_TIMEOUT = "download_timeout"  # connect, read or whole-download deadline (after retries)
    HTTP_403 = "http_403"
    HTTP_404 = "http_404"
    HTTP_410 = "http_410"
    HTTP_429 = "http_429"  # still rate-limited after the retries, or Retry-After beyond the wait limit
    HTTP_4XX = "http_4xx"  # any other 4xx
    HTTP_5XX = "http_5xx"  # after the retries
    TOO_MANY_REDIRECTS = "too_many_redirects"  # more redirects than the limit (5)
    REDIRECT_LOOP = "redirect_loop"  # a redirect back to a URL already visited
    BAD_REDIRECT = "bad_redirect"  # 3xx without Location, or to a non-http(s) URL
    TOO_LARGE = "too_large"  # body (declared or streamed) beyond image.max_file_bytes; reading stops there
    NOT_AN_IMAGE = "not_an_image"  # Content-Type is not an image type (an HTML page, JSON...)
    NOT_IMAGE_BYTES = "not_image_bytes"  # declared an image, but the bytes start like no image format
    BAD_ENCODING = "bad_encoding"  # Content-Encoding stacked ("gzip, gzip"), not gzip/deflate, or the body does not decode
    ROBOTS_DISALLOWED = "robots_disallowed"  # X-Robots-Tag noai/noimageai/noindex/noimageindex
    # Global stages.
    DUPLICATE_IMAGE = "duplicate_image"
    NEAR_DUPLICATE_IMAGE = "near_duplicate_image"
    SEMANTIC_DUPLICATE = "semantic_duplicate"  # image embedding within dedup.semantic_threshold of a kept image
    DUPLICATE_TEXT = "duplicate_text"
    QUERY_CAP = "query_cap"
    LOW_SIMILARITY = "low_similarity"  # image-text similarity under --min-similarity / outside --keep-top
    # Last line of defence: an exception no stage foresaw (a bug to report); the run goes on.
    UNEXPECTED_ERROR = "unexpected_error"


class Rejected(Exception):
    """Raised by a stage to drop the current record; `detail` ends up in the report's examples."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
        self.query: str | None = None  # the record's cleaned query, once known: for per-query counts


@dataclass(frozen=True, slots=True)
class RawItem:
    """One unparsed input record, as cheap to read and pickle as possible.

    Parsing happens in the worker processes so that the reading process stays fast.
    `payload` is the raw JSONL line (bytes), a Parquet row (dict) or a webdataset sample
    (dict of extension -> bytes).
    """

    location: str  # "path:line", "path:row N" or "path:key", for messages
    payload: bytes | dict[str, Any]


@dataclass(slots=True)
class Record:
    """A crawl record, filled in stage by stage."""

    location: str
    base_dir: Path  # image paths are resolved inside this directory and nowhere else
    query: str = ""
    url: str | None = None
    page_url: str | None = None
    image: str | bytes | None = None  # raw `image` field: relative path, base64 text or bytes
    candidates: dict[str, str] = field(default_factory=dict)  # alt/title/context as given
    meta: dict[str, Any] = field(default_factory=dict)  # unknown input fields, kept verbatim
    # Filled by the stages:
    text: str = ""
    text_field: str = ""
    jpeg: bytes = b""
    image_sha: bytes = b""  # exact-duplicate key: hash of the normalised pixels
    phash: int = 0  # 64-bit perceptual hash for near duplicates
    colour: bytes = b""  # colour signature (data_tools.images.colour_signature): near duplicates share it too
    width: int = 0
    height: int = 0
