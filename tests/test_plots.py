"""Pictures of training: RUN/plots/*.png drawn from metrics.jsonl, TensorBoard logging, the card's recall plot."""

import importlib.util
import io
import json
import logging
import subprocess
import warnings

import pytest
from PIL import Image

from cnclip.exporter import export_run
from cnclip.finetune import main as finetune_main
from cnclip.plots import SERIES_KEY, figure, read_metrics, run_series, write_run_plots

from conftest import DEMO_RECIPE, missing_dependency, require, tiny_overrides


def png_series(path):
    """The PNG's pixels are checked to decode; returns the series it says it was drawn from."""
    img = Image.open(path)
    img.verify()
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (640, 360)
    assert len(img.convert("L").getcolors(256)) > 10  # not a blank picture
    return json.loads(img.text[SERIES_KEY])


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    from conftest import make_tiny_dataset

    root = tmp_path_factory.mktemp("plots")
    data = make_tiny_dataset(root / "data")
    run_dir = root / "run"
    # TensorBoard on where it imports: the plots do not need it, test_tensorboard_holds_the_same_numbers does.
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, data, run_dir,
                                                            **{"logging.tensorboard": tensorboard})]) == 0
    return run_dir


def test_every_run_writes_plots_whose_curves_are_metrics_jsonl(run):
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [e for e in entries if "loss" in e]
    valid = [e for e in entries if "valid" in e]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["logit_scale.png", "loss.png", "lr.png", "recall.png"]
    for key in ("loss", "lr", "logit_scale"):
        series = png_series(run / "plots" / f"{key}.png")
        assert series["x"] == [e["step"] for e in steps] and len(series["x"]) >= 4
        assert list(series["lines"].values()) == [[e[key] for e in steps]]
    recall = png_series(run / "plots" / "recall.png")
    assert recall["x"] == [1, 2]
    for direction, label in (("text_to_image", "text → image"), ("image_to_text", "image → text")):
        assert recall["lines"][label] == [e["valid"][direction]["mean_recall"] for e in valid if e["epoch"] > 0]
        assert recall["baseline"][label] == valid[0]["valid"][direction]["mean_recall"] and valid[0]["epoch"] == 0
    # the picture draws exactly those numbers: solid curves, the baseline dashed in the curve's colour
    fig = figure(recall)
    lines = fig.axes[0].lines
    solid = [ln for ln in lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in lines if ln.get_linestyle() == "--"]
    assert [list(ln.get_ydata()) for ln in solid] == list(recall["lines"].values())
    assert [ln.get_ydata()[0] for ln in dashed] == list(recall["baseline"].values())
    assert [ln.get_color() for ln in dashed] == [ln.get_color() for ln in solid]


def test_zero_shot_series_and_a_torn_last_line(tmp_path):
    valid = lambda t2i, i2t, z1: {"text_to_image": {"mean_recall": t2i}, "image_to_text": {"mean_recall": i2t},  # noqa: E731
                                  "zeroshot": {"top1": z1, "top5": 100.0}}
    lines = [{"step": 0, "epoch": 0, "valid": valid(5, 6, 19.4)},
             {"step": 10, "epoch": 0, "loss": 2.0, "lr": 0.1, "logit_scale": 14.3},
             {"step": 11, "epoch": 0, "skipped": "non-finite loss or gradient", "loss": "nan"},
             {"step": 20, "epoch": 1, "valid": valid(50, 40, 80.0)}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 3', "utf-8")
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 4
    series = run_series(read_metrics(tmp_path / "metrics.jsonl"))
    assert series["loss"]["x"] == [10]  # the skipped step is not a point
    assert series["zeroshot"]["lines"] == {"top1": [80.0], "top5": [100.0]}
    assert series["zeroshot"]["baseline"] == {"top1": 19.4, "top5": 100.0}
    written = write_run_plots(tmp_path)
    assert {p.name for p in written} == {"loss.png", "lr.png", "logit_scale.png", "recall.png", "zeroshot.png"}
    assert png_series(tmp_path / "plots" / "zeroshot.png") == series["zeroshot"]


def test_plotting_never_stops_training(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n', "utf-8")
    (tmp_path / "plots").write_text("a file where the folder goes")
    assert write_run_plots(tmp_path) == []


def test_tensorboard_holds_the_same_numbers(run):
    require("tensorboard", "pip install 'cnclip[tensorboard]'; the test extra brings it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    entries = read_metrics(run / "metrics.jsonl")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in loss] == [(e["step"], e["loss"]) for e in entries
                                                                          if "loss" in e]
    t2i = events.Scalars("valid/text_to_image/mean_recall")
    assert [e.step for e in t2i] == [e["step"] for e in entries if "valid" in e]
    assert t2i[0].value == pytest.approx(entries[0]["valid"]["text_to_image"]["mean_recall"], rel=1e-6)


def test_model_card_embeds_the_recall_plot(run, tmp_path):
    export_run(run, tmp_path / "export")
    card = (tmp_path / "export" / "README.md").read_text(encoding="utf-8")
    assert "](recall.png)" in card
    assert (tmp_path / "export" / "recall.png").read_bytes() == (run / "plots" / "recall.png").read_bytes()
    Image.open(io.BytesIO((tmp_path / "export" / "recall.png").read_bytes())).verify()


# ---------------------------------------------------------------- best epoch, overlapping baselines


def recall_entries(t2i: list[float], i2t: list[float], before=(5.93, 5.93)) -> list[dict]:
    valid = lambda a, b: {"text_to_image": {"mean_recall": a}, "image_to_text": {"mean_recall": b},  # noqa: E731
                          "mean_recall": (a + b) / 2, "zeroshot": {"top1": a, "top5": b}}
    return [{"step": 0, "epoch": 0, "valid": valid(*before)},
            *({"step": 10 * e, "epoch": e, "valid": valid(a, b)} for e, (a, b) in enumerate(zip(t2i, i2t), start=1))]


def test_the_best_epoch_is_the_trainers_and_is_marked_on_recall_and_zero_shot():
    series = run_series(recall_entries([10, 40, 35, 20], [10, 30, 35, 20]))  # epochs 2 and 3 tie: the first wins
    assert series["recall"]["best"] == series["zeroshot"]["best"] == 2
    for name in ("recall", "zeroshot"):
        ax = figure(series[name]).axes[0]
        marks = [ln for ln in ax.lines if ln.get_label() == "best epoch (2)"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [2, 2]
        assert "best epoch (2)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_best_epoch_of_a_run_is_the_one_best_holds(run):
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert png_series(run / "plots" / "recall.png")["best"] == summary["best"]["epoch"]


def colour_pixels(png: bytes, row: int, rgb: tuple[int, int, int]) -> int:
    """Pixels within a few levels of `rgb` on rows row-1..row+1 (antialiasing spreads a 1 px line)."""
    import numpy as np

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)[row - 1:row + 2]
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= 40).sum())


def test_equal_before_training_baselines_both_show_and_are_labelled_apart():
    from cnclip.plots import png_bytes

    series = run_series(recall_entries([60, 70], [62, 71]))["recall"]  # both baselines 5.93: one y
    fig = figure(series)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "text → image, before training (5.93)" in labels and "image → text, before training (5.93)" in labels
    png = png_bytes(fig, series)
    row = round(fig.bbox.height - ax.transData.transform((1, 5.93))[1])  # pixel rows count from the top
    blue, orange = colour_pixels(png, row, (31, 119, 180)), colour_pixels(png, row, (255, 127, 14))
    assert blue > 50 and orange > 50, (blue, orange)  # each dashes in its turn: neither hides the other


# ---------------------------------------------------------------- Chinese text


def installed_chinese_fonts() -> str:
    try:
        return subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        return ""


@pytest.fixture
def fresh_font_choice():
    from cnclip.plots import cjk_font

    cjk_font.cache_clear()
    yield cjk_font
    cjk_font.cache_clear()


def drawing_warnings(draw) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw()
    return [str(w.message) for w in caught]


CHINESE_CLASSES = ["红色", "蓝色", "绿色连衣裙"]


def test_chinese_text_is_drawn_with_an_installed_chinese_font(fresh_font_choice):
    if not installed_chinese_fonts():
        missing_dependency("no font with Chinese characters (apt-get install fonts-wqy-microhei; .ci/run does)")
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    from cnclip.eval_report import confusion_png
    from cnclip.plots import png_bytes

    family = fresh_font_choice()
    assert family is not None
    charmap = FT2Font(font_manager.findfont(font_manager.FontProperties(family=family))).get_charmap()
    assert all(ord(char) in charmap for char in "".join(CHINESE_CLASSES))
    confusion = {"labels": CHINESE_CLASSES, "matrix": [[3, 1, 0], [0, 4, 0], [1, 0, 2]]}
    assert drawing_warnings(lambda: confusion_png(confusion)) == []  # matplotlib warns of every missing glyph
    series = {"title": "零样本准确率", "xlabel": "epoch", "x": [1, 2], "lines": {"红色": [1, 2]}, "baseline": {}}
    assert drawing_warnings(lambda: png_bytes(figure(series), series)) == []


def test_without_a_chinese_font_a_warning_says_so_once(fresh_font_choice, monkeypatch, caplog):
    import cnclip.plots

    monkeypatch.setattr(cnclip.plots, "_known_fonts", lambda: [])
    monkeypatch.setattr(cnclip.plots, "_system_font_files", lambda: [])
    series = run_series(recall_entries([60, 70], [62, 71]))["recall"]
    with caplog.at_level(logging.WARNING, logger="cnclip.plots"):
        cnclip.plots.png_bytes(figure(series), series)
        figure(series)
    assert fresh_font_choice() is None
    messages = [r.getMessage() for r in caplog.records if r.name == "cnclip.plots"]
    assert len(messages) == 1 and "no font with Chinese characters" in messages[0]
    assert "fonts-wqy-microhei" in messages[0]


def test_a_chinese_font_missing_from_matplotlibs_cache_is_found_on_the_system(fresh_font_choice, monkeypatch):
    import cnclip.plots

    fonts = [path for path in cnclip.plots._system_font_files() if cnclip.plots._font_covers(path, "中文")]
    if not fonts:
        missing_dependency("no font with Chinese characters (apt-get install fonts-wqy-microhei; .ci/run does)")
    monkeypatch.setattr(cnclip.plots, "_known_fonts", lambda: [("DejaVu Sans", "/nonexistent.ttf")])
    assert fresh_font_choice() is not None
