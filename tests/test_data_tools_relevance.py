"""Query relevance (data_tools.relevance) and caption choice (data_tools.stages)."""

from pathlib import Path

import pytest

from data_tools.config import FilterConfig, RelevanceConfig, TextConfig
from data_tools.records import Reason, Record, Rejected
from data_tools.relevance import Relevance
from data_tools.stages import RecordProcessor


@pytest.fixture(scope="module")
def overlap():
    return Relevance("overlap")


@pytest.mark.parametrize(
    ("text", "query", "relevant"),
    [
        ("夏季连衣裙女 韩版", "红色连衣裙", True),  # shares 连衣裙
        ("红色的裙子", "红色连衣裙", True),  # shares 红色
        ("新款男士皮鞋", "新款连衣裙", False),  # 新款 is a stopword, nothing else shared
        ("可爱的猫在睡觉", "猫", True),  # single character as a whole token
        ("熊猫在吃竹子", "猫", False),  # ... but not inside 熊猫
        ("苹果iPhone15手机壳", "iPhone 手机壳", True),  # English words, case-insensitive
        ("山水风景画", "红色连衣裙", False),
    ],
)
def test_overlap_mode(overlap, text, query, relevant):
    assert overlap.is_relevant(text, query) is relevant


def test_keyword_mode_needs_the_whole_query():
    keyword = Relevance("keyword")
    assert keyword.is_relevant("夏季红色连衣裙", "红色 连衣裙")
    assert not keyword.is_relevant("夏季连衣裙", "红色连衣裙")


def test_off_mode_accepts_everything():
    assert Relevance("off").is_relevant("山水风景画", "红色连衣裙")


def test_query_of_stopwords_only_must_appear_whole(overlap):
    assert overlap.is_relevant("2024新款上市", "新款")
    assert not overlap.is_relevant("夏季连衣裙", "新款")


def test_extra_stopwords():
    relevance = Relevance("overlap", extra_stopwords=("夏季",))
    assert not relevance.is_relevant("夏季男鞋", "夏季连衣裙")


def make_record(query="红色连衣裙", **candidates):
    return Record(location="dump.jsonl:1", base_dir=Path("."), query=query, candidates=candidates)


@pytest.fixture(scope="module")
def processor():
    return RecordProcessor(FilterConfig(text=TextConfig(min_chars=4)))


def test_first_passing_candidate_in_preference_order(processor):
    record = make_record(alt="IMG_2023.jpg", title="夏季紅色連衣裙 新款", context="红色连衣裙的详细介绍")
    processor.choose_text(record)
    assert (record.text_field, record.text) == ("title", "夏季红色连衣裙 新款")


def test_reason_comes_from_the_candidate_that_got_furthest(processor):
    record = make_record(alt="图片", title="山水风景画作品", context="")
    with pytest.raises(Rejected) as caught:
        processor.choose_text(record)
    assert caught.value.reason is Reason.IRRELEVANT_TEXT  # title passed the text rules, alt did not


def test_no_candidates(processor):
    with pytest.raises(Rejected) as caught:
        processor.choose_text(make_record())
    assert caught.value.reason is Reason.NO_TEXT


def test_field_preference_is_configurable():
    processor = RecordProcessor(FilterConfig(text=TextConfig(fields=("context", "alt")), relevance=RelevanceConfig(mode="off")))
    record = make_record(alt="红色连衣裙一件", title="红色连衣裙两件", context="红色连衣裙三件")
    processor.choose_text(record)
    assert record.text_field == "context"
