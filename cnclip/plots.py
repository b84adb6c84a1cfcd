"""Pictures of a training run: RUN/plots/*.png, drawn from RUN/metrics.jsonl alone.

* loss.png, lr.png, logit_scale.png: one point per logged step (skipped non-finite steps are left out);
* recall.png: validation mean recall per epoch, text->image and image->text, with the
  before-training baseline (epoch 0, `eval.before_training`) as a dashed line of the same colour,
  its value in the legend; baselines dash in turn, so two equal ones show both colours, not one;
* zeroshot.png: zero-shot top-1 / top-5 per epoch with its dashed baseline (runs that track it);
* both mark the best epoch (the highest validation mean recall: the model best/ holds) with a dotted
  vertical line labelled with its number;
* probe.png (`cnclip probe --shots`): k-shot linear-probe top-1 against k with its spread over seeds, the
  full probe and zero-shot as dashed reference lines (series from `cnclip.linear_probe.few_shot_series`);
* wise.png (runs with train.wise): validation mean recall and zero-shot top-1 against the WiSE-FT alpha,
  the picked alpha marked the same way; drawn from RUN/wise.json (`write_wise_plot`).

Text is drawn with DejaVu Sans and, for the characters it lacks (Chinese class names, captions),
an installed CJK font (`cjk_font`: Noto Sans CJK, WenQuanYi, ... or any font whose character map
covers Chinese); with none installed a warning says so once and Chinese renders as empty boxes.

Every PNG carries the exact series it was drawn from as JSON in its "cnclip:series" text chunk, so a
reader (and the tests) can check the picture against metrics.jsonl. The trainer redraws them at
each epoch end; `write_run_plots` never raises into training (a failure is logged). matplotlib runs
on the Agg backend: no display needed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic import atomic_file

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
SERIES_KEY = "cnclip:series"
RECALL_PNG = "recall.png"
WISE_PNG = "wise.png"
DIRECTIONS = (("text_to_image", "text → image", "tab:blue"), ("image_to_text", "image → text", "tab:orange"))
DASH = 4  # points: each baseline is on for DASH, then off while the others take their turn
# Tried first, in this order (simplified Chinese first); any other font covering CJK_PROBE is taken after them.
CJK_FONT_NAMES = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei",
                  "WenQuanYi Zen Hei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "SimHei", "AR PL UMing CN")
CJK_PROBE = "中文红色蓝色验证"  # a font must cover these to count as a Chinese font


def read_metrics(path: Path) -> list[dict]:
    """The JSON lines of metrics.jsonl (a torn last line, from a run killed mid-write, is ignored)."""
    entries = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def run_series(entries: list[dict]) -> dict[str, dict]:
    """Plot name -> {"x": [...], "lines": {label: [...]}, "baseline": {label: value}} from metrics entries."""
    steps = [e for e in entries if "loss" in e and "skipped" not in e]
    out: dict[str, dict] = {}
    for key, title in (("loss", "loss"), ("lr", "learning rate"), ("logit_scale", "logit scale")):
        points = [(e["step"], e[key]) for e in steps if isinstance(e.get(key), (int, float))]
        if points:
            out[key] = {"title": title, "xlabel": "step", "x": [p[0] for p in points],
                        "lines": {title: [p[1] for p in points]}, "baseline": {}}
    valid = [e for e in entries if isinstance(e.get("valid"), dict)]
    before = next((e["valid"] for e in valid if e.get("epoch") == 0), None)
    epochs = [e for e in valid if e.get("epoch", 0) > 0]
    best = best_epoch(epochs)
    if epochs or before:
        lines = {name: [e["valid"][key]["mean_recall"] for e in epochs] for key, name, _ in DIRECTIONS}
        baseline = {name: before[key]["mean_recall"] for key, name, _ in DIRECTIONS} if before else {}
        out["recall"] = {"title": "validation mean recall (R@1, R@5, R@10)", "xlabel": "epoch",
                         "x": [e["epoch"] for e in epochs], "lines": lines, "baseline": baseline, "best": best}
    zs = [e for e in epochs if "zeroshot" in e["valid"]]
    zs_before = before.get("zeroshot") if before else None
    if zs or zs_before:
        top_k = [k for k in ("top1", "top5") if all(k in e["valid"]["zeroshot"] for e in zs)]
        out["zeroshot"] = {"title": "zero-shot accuracy (%)", "xlabel": "epoch", "x": [e["epoch"] for e in zs],
                           "lines": {k: [e["valid"]["zeroshot"][k] for e in zs] for k in top_k},
                           "baseline": {k: zs_before[k] for k in top_k if k in zs_before} if zs_before else {},
                           "best": best}
    return out


def best_epoch(epochs: list[dict]) -> int | None:
    """The epoch the trainer keeps as best/: the first with the highest validation mean recall."""
    best, best_score = None, None
    for entry in epochs:
        valid = entry["valid"]
        score = valid.get("mean_recall", sum(valid[key]["mean_recall"] for key, _, _ in DIRECTIONS) / len(DIRECTIONS))
        if best_score is None or score > best_score:  # strictly greater, as the trainer compares
            best, best_score = entry["epoch"], score
    return best


def _font_covers(path: str, text: str) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        charmap = FT2Font(path).get_charmap()
    except (OSError, RuntimeError, ValueError):  # unreadable or not a font FreeType opens
        return False
    return all(ord(char) in charmap for char in text)


def find_cjk_font(fonts: Iterable[tuple[str, str]]) -> str | None:
    """The family name of the first (name, file) whose font covers CJK_PROBE: CJK_FONT_NAMES first."""
    fonts = list(fonts)
    rank = {name: i for i, name in enumerate(CJK_FONT_NAMES)}
    for name, path in sorted(fonts, key=lambda font: rank.get(font[0], len(rank))):
        if _font_covers(path, CJK_PROBE):
            return name
    return None


def _known_fonts() -> list[tuple[str, str]]:
    """(family, file) of every font matplotlib knows (its cached font list)."""
    from matplotlib import font_manager

    return [(font.name, font.fname) for font in font_manager.fontManager.ttflist]


def _system_font_files() -> list[str]:
    """Font files installed on the system; matplotlib's cached list misses fonts installed after it was built."""
    from matplotlib import font_manager

    return font_manager.findSystemFonts()


@functools.cache
def cjk_font() -> str | None:
    """The family of an installed font that covers Chinese, or None (logged once: Chinese will show as boxes)."""
    family = find_cjk_font(_known_fonts())
    if family is None:
        from matplotlib import font_manager

        known = {path for _, path in _known_fonts()}
        for path in _system_font_files():
            if path not in known and _font_covers(path, CJK_PROBE):
                font_manager.fontManager.addfont(path)
                family = font_manager.FontProperties(fname=path).get_name()
                break
    if family is None:
        log.warning("no font with Chinese characters is installed: Chinese text in plots will show as empty boxes; "
                    "install one (e.g. apt-get install fonts-wqy-microhei, or fonts-noto-cjk)")
    return family


@contextmanager
def chinese_text() -> Iterator[None]:
    """Figures made and saved inside draw text in DejaVu Sans, falling back glyph by glyph to cjk_font()."""
    import matplotlib

    family = cjk_font()
    if family is None:
        yield
        return
    with matplotlib.rc_context({"font.family": ["sans-serif", family]}):
        yield


@chinese_text()
def figure(series: dict):
    """A matplotlib Figure of one series: solid lines, each baseline dashed in its line's colour and
    labelled with its value, and the best epoch as a dotted vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    colors = dict((name, color) for _, name, color in DIRECTIONS)
    baselines = [label for label in series["lines"] if label in series["baseline"]]
    for i, (label, ys) in enumerate(series["lines"].items()):
        color = colors.get(label, f"C{i}")
        ax.plot(series["x"], ys, marker="o" if series["xlabel"] != "step" else None, markersize=3,
                color=color, label=label)
        if label in series.get("spread", {}):  # one standard deviation either side (over seeds)
            spread = series["spread"][label]
            ax.fill_between(series["x"], [y - s for y, s in zip(ys, spread)], [y + s for y, s in zip(ys, spread)],
                            color=color, alpha=0.15, linewidth=0)
        if label in series["baseline"]:
            # Baselines take turns along one dash cycle: equal ones (5.93 both ways before training)
            # interleave their colours instead of the last one hiding the others.
            turn = baselines.index(label)
            ax.axhline(series["baseline"][label], color=color, linewidth=1,
                       linestyle=(turn * DASH, (DASH, DASH * (len(baselines) - 1) or DASH)),
                       label=f"{label}, before training ({series['baseline'][label]:.2f})")
    for j, (label, value) in enumerate(series.get("references", {}).items()):  # other methods' scores, for scale
        ax.axhline(value, color=f"C{len(series['lines']) + j}", linestyle="--", linewidth=1,
                   label=f"{label} ({value:.2f})")
    if series.get("xscale") == "log2":
        ax.set_xscale("log", base=2)
        ax.set_xticks(series["x"], [f"{x:g}" for x in series["x"]])
    if series.get("best") is not None:
        mark = series.get("mark", "best epoch")  # wise.png marks the picked alpha
        ax.axvline(series["best"], color="0.4", linestyle=":", linewidth=1.2, label=f"{mark} ({series['best']:g})")
    ax.set_title(series["title"])
    ax.set_xlabel(series["xlabel"])
    if series["xlabel"] == "epoch":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.2
    ax.grid(alpha=0.3)
    if len(series["lines"]) > 1 or series["baseline"] or series.get("references") or series.get("best") is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@chinese_text()
def png_bytes(fig, series: dict) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={SERIES_KEY: json.dumps(series, ensure_ascii=False)})
    return buf.getvalue()


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """Draw RUN/plots/*.png from RUN/metrics.jsonl; returns what was written. Never raises."""
    run_dir = Path(run_dir)
    try:
        written = []
        out = run_dir / PLOTS_DIR
        for name, series in run_series(read_metrics(run_dir / "metrics.jsonl")).items():
            out.mkdir(exist_ok=True)
            path = out / f"{name}.png"
            with atomic_file(path, "wb") as fh:
                fh.write(png_bytes(figure(series), series))
            written.append(path)
        return written
    except Exception as exc:  # noqa: BLE001 - a picture must never stop a training run
        log.warning("could not draw the run's plots in %s: %s: %s", run_dir / PLOTS_DIR, type(exc).__name__, exc)
        return []


def wise_series(record: dict) -> dict:
    """The plotted series of a wise.json record: mean recall and zero-shot top-1 per alpha, the pick marked."""
    rows = sorted(record["metrics"], key=lambda r: r["alpha"])
    lines = {"validation mean recall": [r["valid"]["mean_recall"] for r in rows]}
    if all("zeroshot" in r["valid"] for r in rows):
        lines["zero-shot top-1"] = [r["valid"]["zeroshot"]["top1"] for r in rows]
    return {"title": "WiSE-FT: base (alpha 0) to fine-tuned (alpha 1)", "xlabel": "WiSE-FT alpha",
            "x": [r["alpha"] for r in rows], "lines": lines, "baseline": {}, "best": record["picked_alpha"],
            "mark": f"picked alpha, {record['rule']}"}


def write_wise_plot(run_dir: str | Path, record: dict) -> Path | None:
    """RUN/plots/wise.png from a wise.json record; the path, or None when it could not be drawn (logged)."""
    path = Path(run_dir) / PLOTS_DIR / WISE_PNG
    try:
        series = wise_series(record)
        path.parent.mkdir(exist_ok=True)
        with atomic_file(path, "wb") as fh:
            fh.write(png_bytes(figure(series), series))
        return path
    except Exception as exc:  # noqa: BLE001 - a picture must never stop a training run
        log.warning("could not draw %s: %s: %s", path, type(exc).__name__, exc)
        return None


def copy_recall_plot(run_dir: str | Path, out_dir: Path, name: str = RECALL_PNG) -> str | None:
    """Copy RUN/plots/<name> (recall.png) into an export (the model card embeds it); its name there, or None."""
    import shutil

    source = Path(run_dir) / PLOTS_DIR / name
    if not source.is_file():
        return None
    shutil.copyfile(source, out_dir / name)
    return name


def copy_wise_plot(run_dir: str | Path, out_dir: Path) -> str | None:
    """Copy RUN/plots/wise.png into an export; its name there, or None."""
    return copy_recall_plot(run_dir, out_dir, WISE_PNG)
