"""Caption cleaning and text rules (data_tools.text)."""

import pytest

from data_tools.config import TextConfig
from data_tools.records import Reason, Rejected
from data_tools.text import Simplifier, TextFilter, chinese_ratio, normalize


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("ＡＢＣ１２３，夏季新款连衣裙！！！", "ABC123,夏季新款连衣裙!"),  # full-width -> half-width, repeated punctuation
        ("红色\u3000连衣裙", "红色 连衣裙"),  # ideographic space
        ("&lt;b&gt;红色连衣裙&lt;/b&gt;", "红色连衣裙"),  # entities, then the tags they spell
        ("<p>可爱的<br/>小猫</p>", "可爱的 小猫"),
        ("&amp;quot;小猫&amp;quot;", '"小猫"'),  # double-escaped
        ("详情见 https://shop.example.com/item?id=3&x=%E4 夏装", "详情见 夏装"),
        ("链接www.taobao.com/abc红色", "链接 红色"),
        ("可爱小猫😀😺🐱 好看👍🏻", "可爱小猫 好看"),
        ("❤️红心⭐️星星", "红心星星"),
        ("  多个   空格\t\n换行 ", "多个 空格 换行"),
        ("零宽\u200b字符\ufeff", "零宽字符"),
        ("等等……。。。真好～～", "等等…。真好~"),
    ],
)
def test_normalize(raw, clean):
    assert normalize(raw) == clean


def test_traditional_to_simplified():
    simplify = Simplifier()
    assert simplify("夏季新款紅色連衣裙 韓版修身顯瘦") == "夏季新款红色连衣裙 韩版修身显瘦"
    assert simplify("一目瞭然的設計") == "一目了然的设计"  # a phrase rule, not just characters
    already = "夏季新款红色连衣裙"
    assert simplify(already) is already  # nothing to convert: OpenCC is skipped entirely


def test_chinese_ratio_ignores_spaces_and_punctuation():
    assert chinese_ratio("红色连衣裙") == 1.0
    assert chinese_ratio("红色, 连衣裙!!") == 1.0
    assert chinese_ratio("Nike耐克") == pytest.approx(2 / 6)
    assert chinese_ratio("...") == 0.0


@pytest.fixture(scope="module")
def text_filter():
    return TextFilter(TextConfig(min_chars=4, max_chars=20, min_chinese_ratio=0.3, boilerplate_texts=("本店推荐",)))


def reason(text_filter, raw):
    try:
        text_filter.check(text_filter.clean(raw))
    except Rejected as rejection:
        return rejection.reason
    return None


@pytest.mark.parametrize(
    "alt",
    ["IMG_2023.jpg", "DSC_0001.JPG", "微信图片_20230101120000", "图片", "商品图", "【商品图】", "点击查看大图",
     "图片1", "photo 3", "20230101", "a3f9c2d1e4b5a6978877", "本店推荐", "Screenshot 2023-01-01"],
)
def test_boilerplate_alts_are_rejected(text_filter, alt):
    assert reason(text_filter, alt) is Reason.BOILERPLATE_TEXT


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", Reason.NO_TEXT),
        ("😀😀", Reason.NO_TEXT),
        ("小猫", Reason.TEXT_TOO_SHORT),
        ("一只非常非常可爱的小猫在阳光明媚的草地上开心地玩耍", Reason.TEXT_TOO_LONG),
        ("iPhone 15 Pro 手机", Reason.LOW_CHINESE_RATIO),
        ("夏季新款紅色連衣裙", None),  # Traditional is converted, then accepted
        ("Nike耐克男鞋 Air Max运动鞋", None),  # mixed English above the ratio
        ("可爱小猫😺 http://t.cn/abc", None),
    ],
)
def test_text_rules(text_filter, raw, expected):
    assert reason(text_filter, raw) is expected


def test_rules_can_be_turned_down():
    lenient = TextFilter(TextConfig(min_chars=1, min_chinese_ratio=0.0, traditional_to_simplified=False))
    assert lenient.clean("紅色") == "紅色"
    lenient.check("iPhone 15")  # no exception
