"""Pictures of a training run: RUN/plots/*.png, drawn from RUN/metrics.jsonl alone.

* loss.png, lr.png, logit_scale.png: one point per logged step (skipped non-finite steps are left out);
* recall.png: validation mean recall per epoch, text->image and image->text, with the
  before-training baseline (epoch 0, `eval.before_training`) as a dashed line of the same colour;
* zeroshot.png: zero-shot top-1 / top-5 per epoch with its dashed baseline (runs that track it).

Every PNG carries the exact series it was drawn from as JSON in its "cnclip:series" text chunk, so a
reader (and the tests) can check the picture against metrics.jsonl. The trainer redraws them at
each epoch end; `write_run_plots` never raises into training (a failure is logged). matplotlib runs
on the Agg backend: no display needed.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from .atomic import atomic_file

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
SERIES_KEY = "cnclip:series"
RECALL_PNG = "recall.png"
DIRECTIONS = (("text_to_image", "text → image", "tab:blue"), ("image_to_text", "image → text", "tab:orange"))


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
    if epochs or before:
        lines = {name: [e["valid"][key]["mean_recall"] for e in epochs] for key, name, _ in DIRECTIONS}
        baseline = {name: before[key]["mean_recall"] for key, name, _ in DIRECTIONS} if before else {}
        out["recall"] = {"title": "validation mean recall (R@1, R@5, R@10)", "xlabel": "epoch",
                         "x": [e["epoch"] for e in epochs], "lines": lines, "baseline": baseline}
    zs = [e for e in epochs if "zeroshot" in e["valid"]]
    zs_before = before.get("zeroshot") if before else None
    if zs or zs_before:
        top_k = [k for k in ("top1", "top5") if all(k in e["valid"]["zeroshot"] for e in zs)]
        out["zeroshot"] = {"title": "zero-shot accuracy (%)", "xlabel": "epoch", "x": [e["epoch"] for e in zs],
                           "lines": {k: [e["valid"]["zeroshot"][k] for e in zs] for k in top_k},
                           "baseline": {k: zs_before[k] for k in top_k if k in zs_before} if zs_before else {}}
    return out


def figure(series: dict):
    """A matplotlib Figure of one series: solid lines, each baseline dashed in its line's colour."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    colors = dict((name, color) for _, name, color in DIRECTIONS)
    for i, (label, ys) in enumerate(series["lines"].items()):
        color = colors.get(label, f"C{i}")
        ax.plot(series["x"], ys, marker="o" if series["xlabel"] == "epoch" else None, markersize=3,
                color=color, label=label)
        if label in series["baseline"]:
            ax.axhline(series["baseline"][label], color=color, linestyle="--", linewidth=1,
                       label=f"{label}, before training")
    ax.set_title(series["title"])
    ax.set_xlabel(series["xlabel"])
    ax.grid(alpha=0.3)
    if len(series["lines"]) > 1 or series["baseline"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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


def copy_recall_plot(run_dir: str | Path, out_dir: Path) -> str | None:
    """Copy RUN/plots/recall.png into an export (the model card embeds it); its name there, or None."""
    import shutil

    source = Path(run_dir) / PLOTS_DIR / RECALL_PNG
    if not source.is_file():
        return None
    shutil.copyfile(source, out_dir / RECALL_PNG)
    return RECALL_PNG
