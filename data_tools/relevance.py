"""Is a caption about the query that found its image?

A search hit's alt or title is often site navigation or an unrelated product; requiring a shared
content word with the query (CLIP's query-list construction in spirit) removes most of them.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import jieba

_CONTENT = re.compile(r"[^\W_]")
_SPACES = re.compile(r"\s+")

# Function words and shop slogans that would make any two captions "share" a word.
BUILTIN_STOPWORDS = frozenset(
    """
    的 了 和 与 及 或 是 在 有 为 对 等 之 把 被 也 都 就 而 其 这 那 个 一 一个 我 你 他 她 它 们 吗 呢 吧 啊
    着 过 不 没 很 更 最 又 及其 以及 并 从 到 给 让 用 于 上 下 中 里 款 件 张 只 图 图片 照片
    新款 正品 包邮 热卖 特价 促销 官方 旗舰店 爆款 同款 推荐 高清 免费 大全 最新 精品 优惠 现货
    """.split()
)

_jieba_ready = False


def init_jieba() -> None:
    """Load jieba's dictionary once per process, without its banner on stderr."""
    global _jieba_ready
    if not _jieba_ready:
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _jieba_ready = True


class Relevance:
    """Caption/query relevance in one of three modes: off, overlap, keyword.

    overlap: the query's content words come from jieba's search-mode segmentation (which also
    yields the sub-words of a compound such as 连衣裙 in 红色连衣裙). A word of two or more
    characters matches where it occurs in the caption; a single character must be a whole jieba
    token of the caption, so 猫 does not match 熊猫. The caption is segmented only when a
    single-character word is the only candidate, which keeps the common case to substring tests.

    keyword: the whole query (spaces ignored) must occur in the caption. Overlap falls back to
    this for a query without content words (e.g. only "新款").
    """

    def __init__(self, mode: str, extra_stopwords: tuple[str, ...] = ()) -> None:
        self.mode = mode
        self.stopwords = BUILTIN_STOPWORDS | {w.lower() for w in extra_stopwords}
        if mode == "overlap":
            init_jieba()
        self.query_words = lru_cache(maxsize=65536)(self._query_words)

    def is_relevant(self, text: str, query: str) -> bool:
        """True when the caption passes the configured rule for this query."""
        if self.mode == "off":
            return True
        text = text.lower()
        if self.mode == "keyword":
            return _contains_whole(text, query)
        words = self.query_words(query)
        if not words:  # a query of stopwords only can still be matched whole
            return _contains_whole(text, query)
        single: list[str] = []
        for word in words:
            if word in text:
                if len(word) > 1:
                    return True
                single.append(word)
        return bool(single) and not set(single).isdisjoint(self._tokens(text))

    def _query_words(self, query: str) -> frozenset[str]:
        """Content words of a query: lower-cased tokens with a letter/digit/CJK char, minus stopwords."""
        return frozenset(
            token for token in (t.strip().lower() for t in jieba.lcut_for_search(query))
            if token and _CONTENT.search(token) and token not in self.stopwords
        )

    @staticmethod
    def _tokens(text: str) -> set[str]:
        return {t.strip() for t in jieba.lcut(text)}


def _contains_whole(text: str, query: str) -> bool:
    """Lower-cased text contains the query, spaces ignored on both sides."""
    return _SPACES.sub("", query.lower()) in _SPACES.sub("", text)
