"""Caption cleaning and the text rules.

Crawled alts and titles carry HTML debris, full-width ASCII, URLs, emoji, Traditional
characters and camera file names. Cleaning first and judging the cleaned text means the rules
(length, Chinese ratio, boilerplate) see what the model will see.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import opencc

from data_tools.config import TextConfig
from data_tools.records import Reason, Rejected

# Full-width ASCII (U+FF01..U+FF5E) and the ideographic space map onto plain ASCII.
_FULL_TO_HALF = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
_TAG = re.compile(r"<[^<>]{0,500}>")
_URL = re.compile(r"(?:https?://|ftp://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+", re.IGNORECASE)
_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # emoticons, pictographs, transport, flags, symbols & pictographs ext.
    "\u2600-\u27bf"  # miscellaneous symbols, dingbats
    "\u2b00-\u2bff"  # arrows and stars such as ⭐
    "\u231a\u231b\u23e9-\u23fa"
    "\ufe00-\ufe0f\u200d\u20e3"  # variation selectors, zero-width joiner, keycap
    "\ue000-\uf8ff"  # private use (icon fonts)
    "]"
)
_INVISIBLE = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u200b-\u200f\u2028-\u202f\u2060-\u206f\ufeff]")
_REPEATED_PUNCT = re.compile(r"([^\w\s])\1+")
_SPACES = re.compile(r"\s+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
_WORD_CHARS = re.compile(r"[^\W_]")  # letters, digits and CJK characters
_NOT_WORD = re.compile(r"[\W_]+")

# Frequent alts that describe no image; compared after lower-casing and dropping punctuation.
BUILTIN_BOILERPLATE = frozenset(
    """
    图片 图像 照片 商品图 商品图片 主图 详情图 详情 缩略图 大图 查看大图 点击查看大图 点击放大 点击图片
    放大 查看原图 原图 暂无图片 无图片 加载中 正在加载 广告 二维码 扫一扫 扫码关注 关注我们 logo
    image img images photo picture pic thumbnail thumb banner icon placeholder loading default
    untitled noimage null none undefined 未命名 无标题 高清图片 高清大图 效果图 示意图 实拍图 配图
    """.split()
)
_BUILTIN_BOILERPLATE_PATTERNS = (
    r"[\w\-. ()\[\]]*\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg|heic|avif)",  # file names
    r"(?:img|dsc|dscn|dcim|pic|pxl|mmexport|wx_camera|screenshot|screen ?shot|微信图片|截图|屏幕截图)[\s_\-]*[\d_\- .]*",
    r"(?:图片?|照片|image|photo|pic)[\s_\-]*\d+",  # "图片1", "photo 3"
    r"[\d\W_]+",  # digits and punctuation only
    r"[0-9a-f]{16,}",  # hashes
)


def normalize(text: str) -> str:
    """Undo web debris: entities, tags, full-width ASCII, URLs, emoji, control chars, runs of punctuation."""
    text = html.unescape(html.unescape(text))  # double-escaped "&amp;lt;" is common in scraped alts
    text = _TAG.sub(" ", text)
    text = text.translate(_FULL_TO_HALF)
    text = _URL.sub(" ", text)
    text = _EMOJI.sub("", text)
    text = _INVISIBLE.sub("", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    return _SPACES.sub(" ", text).strip()


class Simplifier:
    """Traditional -> Simplified with OpenCC's t2s tables, skipping text that has nothing to convert.

    The pure-Python OpenCC port costs ~25-60 us per caption even when nothing changes; almost all
    crawled captions are already Simplified, so a set lookup of the characters that any t2s rule
    rewrites decides whether conversion can change the text at all.
    """

    def __init__(self) -> None:
        self._converter = opencc.OpenCC("t2s")
        self._convertible = _t2s_source_characters()

    def __call__(self, text: str) -> str:
        if self._convertible.isdisjoint(text):
            return text
        return self._converter.convert(text)


def _t2s_source_characters() -> frozenset[str]:
    """Characters that some t2s rule changes; text without any of them converts to itself."""
    folder = Path(opencc.__file__).parent / "dictionary"
    chars: set[str] = set()
    for name in ("TSPhrases.txt", "TSCharacters.txt"):
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            source, _, targets = line.partition("\t")
            target = targets.split(" ")[0]
            if source == target:
                continue
            if len(source) == len(target):
                chars.update(a for a, b in zip(source, target) if a != b)
            else:
                chars.update(source)
    return frozenset(chars)


def chinese_ratio(text: str) -> float:
    """Share of CJK characters among letters, digits and CJK characters (spaces and punctuation ignored)."""
    total = len(_WORD_CHARS.findall(text))
    return len(_CJK.findall(text)) / total if total else 0.0


def boilerplate_key(text: str) -> str:
    """Lower-cased text without spaces or punctuation, so "【图片】" matches "图片"."""
    return _NOT_WORD.sub("", text).lower()


class TextFilter:
    """Cleans one caption and applies the text rules in a fixed order."""

    def __init__(self, config: TextConfig) -> None:
        self.config = config
        self._simplify = Simplifier() if config.traditional_to_simplified else None
        self._boilerplate = BUILTIN_BOILERPLATE | {boilerplate_key(t) for t in config.boilerplate_texts}
        patterns = _BUILTIN_BOILERPLATE_PATTERNS + config.boilerplate_patterns
        self._boilerplate_re = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)

    def clean(self, raw: str) -> str:
        """Normalise, then convert to Simplified: the form every rule and the output see."""
        text = normalize(raw)
        return self._simplify(text) if self._simplify else text

    def is_boilerplate(self, text: str) -> bool:
        """A text that names a file, a placeholder or a generic word instead of the image."""
        return boilerplate_key(text) in self._boilerplate or self._boilerplate_re.fullmatch(text) is not None

    def check(self, text: str) -> None:
        """Raise Rejected for the first rule the cleaned text fails (rule order = CHECK_ORDER)."""
        if not text:
            raise Rejected(Reason.NO_TEXT)
        if self.is_boilerplate(text):
            raise Rejected(Reason.BOILERPLATE_TEXT, text)
        if len(text) < self.config.min_chars:
            raise Rejected(Reason.TEXT_TOO_SHORT, f"{len(text)} < {self.config.min_chars} chars: {text}")
        if len(text) > self.config.max_chars:
            raise Rejected(Reason.TEXT_TOO_LONG, f"{len(text)} > {self.config.max_chars} chars")
        ratio = chinese_ratio(text)
        if ratio < self.config.min_chinese_ratio:
            raise Rejected(Reason.LOW_CHINESE_RATIO, f"{ratio:.2f}: {text}")


# How far a caption got through the checks; when no candidate passes, the record is rejected with
# the reason of the candidate that got furthest (ties go to the preferred field).
CHECK_ORDER = (
    Reason.NO_TEXT,
    Reason.BOILERPLATE_TEXT,
    Reason.TEXT_TOO_SHORT,
    Reason.TEXT_TOO_LONG,
    Reason.LOW_CHINESE_RATIO,
    Reason.IRRELEVANT_TEXT,
)
