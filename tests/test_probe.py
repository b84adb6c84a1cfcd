"""`cnclip probe`: the C search, agreement with independent fits, a generated set, the cache, bad input."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import cnclip.classifier
import cnclip.image_cache
from cnclip import linear_probe
from cnclip.commands.probe import main
from cnclip.errors import EXIT_DATA, EXIT_USAGE, DataError, UsageError
from cnclip.global_state import torch_threads
from cnclip.plots import SERIES_KEY

from conftest import COLORS

KEYS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}


# ---------------------------------------------------------------- features with a known structure


def clusters(n_per_class: int, num_classes: int = 4, dim: int = 16, spread: float = 1.3, seed: int = 0):
    """Unit-length points around one fixed random centre per class (overlapping enough that C matters);
    `seed` draws the points, so two seeds are two samples of the same classes."""
    centres = np.random.default_rng(1234).normal(size=(num_classes, dim))
    rng = np.random.default_rng(seed)
    x = np.concatenate([centres[c] + spread * rng.normal(size=(n_per_class, dim)) * np.sqrt(dim) / 3
                        for c in range(num_classes)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.repeat(np.arange(num_classes), n_per_class)
    return torch.from_numpy(x).float(), torch.from_numpy(y)


def test_the_search_finds_the_peak_of_a_planted_held_out_score(monkeypatch):
    """With held-out top-1 a known single-peaked function of log10 C, the binary search lands on its peak
    at the full resolution (1/8 decade), tries the CLIP paper's first points, and stays within 15 fits."""
    peak = 11  # log10 C = 1.375
    monkeypatch.setattr(linear_probe, "fit", lambda x, y, c, max_iter: c)
    monkeypatch.setattr(linear_probe, "converged", lambda model, max_iter: True)
    monkeypatch.setattr(linear_probe, "_held_out_score",
                        lambda c, x, y, k: (100.0 - abs(round(8 * np.log10(c)) - peak), 1.0))
    search = linear_probe.choose_c(None, None, None, None, 4)
    assert search.c == pytest.approx(10 ** (peak / 8))
    exponents = sorted(round(8 * np.log10(t.c)) for t in search.trials)
    assert set(range(-48, 49, 16)) <= set(exponents) and len(exponents) <= 15
    assert all(-48 <= e <= 48 for e in exponents)
    # A tie on top-1 goes to the lower held-out cross-entropy, then to the smaller C.
    monkeypatch.setattr(linear_probe, "_held_out_score", lambda c, x, y, k: (50.0, abs(np.log10(c) + 2.5)))
    assert linear_probe.choose_c(None, None, None, None, 4).c == pytest.approx(10 ** -2.5)
    monkeypatch.setattr(linear_probe, "_held_out_score", lambda c, x, y, k: (50.0, 1.0))
    assert linear_probe.choose_c(None, None, None, None, 4).c == pytest.approx(1e-6)


def test_held_out_and_shot_draws_are_per_class_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), [10, 5, 1])
    fit_idx, val_idx = linear_probe.held_out_split(labels, 3, 0.2, np.random.default_rng(0))
    assert np.bincount(labels[val_idx], minlength=3).tolist() == [2, 1, 0]  # round(n * 0.2), >= 1, none of a single
    assert sorted(np.concatenate([fit_idx, val_idx]).tolist()) == list(range(16))
    a = linear_probe.draw_shots(labels[:15], 2, 2, np.random.default_rng(3))
    b = linear_probe.draw_shots(labels[:15], 2, 2, np.random.default_rng(3))
    c = linear_probe.draw_shots(labels[:15], 2, 2, np.random.default_rng(4))
    assert all(np.array_equal(p, q) for p, q in zip(a, b)) and not np.array_equal(a[0], c[0])
    assert np.bincount(labels[a[0]]).tolist() == [2, 2] == np.bincount(labels[a[1]]).tolist()
    assert not set(a[0]) & set(a[1])


# ---------------------------------------------------------------- agreement with independent fits


@pytest.fixture(scope="module")
def fitted():
    """(train x, train y, test x, test y, the probe's result) on overlapping clusters, computed once."""
    x, y = clusters(30)
    tx, ty = clusters(20, seed=1)
    return x, y, tx, ty, linear_probe.probe(x, y, tx, ty, list(KEYS), seed=0)


def test_probe_agrees_with_scikit_learn_fitted_directly_on_the_same_features(fitted):
    from sklearn.linear_model import LogisticRegression

    x, y, tx, ty, result = fitted
    direct = LogisticRegression(C=result.report["C"], max_iter=1000, tol=1e-6).fit(x.double().numpy(), y.numpy())
    proba = direct.predict_proba(tx.double().numpy())
    assert np.abs(result.probabilities - proba).max() < 1e-9
    assert result.report["top1"] == pytest.approx(100 * np.mean(proba.argmax(1) == ty.numpy()))
    top5 = np.argsort(-proba, axis=1)[:, :5]
    assert result.report["top5"] == pytest.approx(100 * np.mean((top5 == ty.numpy()[:, None]).any(1)))
    # The chosen C is the best of those tried on the held-out images, and a refit on the same split agrees.
    fit_idx, val_idx = linear_probe.held_out_split(y.numpy(), 4, 0.2, np.random.default_rng(0))
    best = max(result.report["search"], key=lambda t: (t["top1"], -t["loss"], -t["c"]))
    assert best["c"] == result.report["C"]
    held = LogisticRegression(C=best["c"], max_iter=1000, tol=1e-6).fit(x.double().numpy()[fit_idx], y.numpy()[fit_idx])
    assert best["top1"] == pytest.approx(100 * held.score(x.double().numpy()[val_idx], y.numpy()[val_idx]))


def test_probe_solves_the_stated_objective_as_torch_lbfgs_does(fitted):
    """An independent solver: C * sum(cross-entropy) + ||W||^2 / 2 (intercept free) minimised by torch's L-BFGS
    gives the probe's probabilities (to the solvers' tolerance) and the same predictions."""
    x, y, tx, ty, result = fitted
    c = result.report["C"]
    x64, tx64 = x.double(), tx.double()
    w = torch.zeros(x.shape[1], 4, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = c * torch.nn.functional.cross_entropy(x64 @ w + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch_threads(1):  # 120 x 16 products: threads only add start-up cost (10x slower on two busy cores)
        opt.step(objective)
    proba = torch.softmax(tx64 @ w + b, dim=1).detach().numpy()
    assert np.abs(result.probabilities - proba).max() < 1e-3  # 0.006 with scikit-learn's default tolerance
    assert (result.probabilities.argmax(1) == proba.argmax(1)).all()


# ---------------------------------------------------------------- a generated set on a tiny random model


def _drawing(rng: random.Random, color: tuple) -> bytes:
    """A jittered shape in a jittered colour on a light background: a class is a colour, seen noisily."""
    img = Image.new("RGB", (48, 40), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    cx, cy, r = rng.uniform(12, 36), rng.uniform(12, 28), rng.uniform(6, 12)
    fill = tuple(max(0, min(255, v + rng.randint(-60, 60))) for v in color)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_probe_set(root: Path, train: int = 16, test: int = 8, seed: int = 0) -> tuple[Path, Path, Path]:
    """root/train/<key>/*.png, root/test/<key>/*.png in the four test colours, and the class list."""
    rng = random.Random(seed)
    for split, n in (("train", train), ("test", test)):
        for key, name in KEYS.items():
            (root / split / key).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / key / f"{i:02d}.png").write_bytes(_drawing(rng, COLORS[name]))
    classes = root / "classes.txt"
    classes.write_text("".join(f"{k}: {v}\n" for k, v in KEYS.items()), encoding="utf-8")
    return root / "train", root / "test", classes


def test_generated_set_beats_chance_rises_with_shots_and_a_second_probe_runs_no_image_forward(
        tiny_model_dir, tmp_path, capsys, monkeypatch):
    train, test, classes = make_probe_set(tmp_path)
    forwards = []
    encode = cnclip.image_cache.encode_images
    monkeypatch.setattr(cnclip.image_cache, "encode_images", lambda clip, pixels: (forwards.append(len(pixels)),
                                                                                   encode(clip, pixels))[1])
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--model", tiny_model_dir, "--train", train, "--test", test, "--classes", classes, "--shots", "1,8",
            "--seeds", 4, "--out", out, "--cache-dir", cache, "--workers", 0]
    assert main([str(a) for a in args]) == 0
    assert sum(forwards) == 16 * 4 + 8 * 4  # every image once
    printed = capsys.readouterr().out
    report = json.loads((out / "probe.json").read_text(encoding="utf-8"))
    chance = 100 / 4
    # The tiny random tower's features separate colours; the probe must beat chance by 35 points.
    assert report["probe"]["top1"] >= chance + 35, report["probe"]["top1"]
    one, eight = report["few_shot"]["summary"]
    assert (one["shots"], eight["shots"], one["seeds"]) == (1, 8, 4)
    assert eight["top1_mean"] > one["top1_mean"] + 5, (one, eight)
    assert one["top1_mean"] > chance
    # Zero-shot scored on the same test images with the same class list.
    assert report["class_keys"] == list(KEYS) and report["zeroshot"]["confusion"]["labels"] == list(KEYS)
    assert report["zeroshot"]["num_images"] == report["probe"]["num_images"] == 32
    assert set(report["zeroshot"]["per_class"]) == set(report["probe"]["per_class"]) == set(KEYS)
    assert report["solver"]["library"] == "scikit-learn" and report["probe"]["converged"]
    for line in ("zero-shot", "1-shot probe (4 seeds)", "8-shot probe (4 seeds)", "linear probe (64 images)",
                 "red (红色)"):
        assert line in printed
    rows = [json.loads(r) for r in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 32 and all(sum(t["probability"] for t in r["top"]) == pytest.approx(1) for r in rows)
    assert 100 * np.mean([r["top"][0]["key"] == r["label"] for r in rows]) == pytest.approx(report["probe"]["top1"])
    series = json.loads(Image.open(out / "probe.png").text[SERIES_KEY])
    assert series == json.loads(json.dumps(linear_probe.few_shot_series(report), ensure_ascii=False))
    assert series["x"] == [1, 8] and series["references"]["zero-shot"] == report["zeroshot"]["top1"]

    # A second probe (other shots and seeds) reads every embedding from the caches: no image or text forward.
    forwards.clear()
    monkeypatch.setattr(cnclip.classifier, "embed_texts", lambda *a, **k: pytest.fail("class embeddings recomputed"))
    assert main([str(a) for a in args[:8]] + ["--shots", "2", "--seeds", "2", "--out", str(out), "--cache-dir",
                                                 str(cache), "--workers", "0"]) == 0
    assert forwards == []
    again = json.loads((out / "probe.json").read_text(encoding="utf-8"))
    assert again["probe"]["top1"] == report["probe"]["top1"] and again["few_shot"]["shots"] == [2]


# ---------------------------------------------------------------- bad input


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("case", ["empty_class_folder", "one_class_folder", "one_class_list", "class_not_trained",
                                  "test_class_not_trained",
                                  "shots_too_many", "bad_shots", "zero_shots", "held_out"])
def test_bad_input_exits_with_its_status_and_names_the_input(tiny_model_dir, tmp_path, capsys, monkeypatch, case):
    train, test, classes = make_probe_set(tmp_path, train=5, test=2)
    extra: list = ["--classes", classes]
    # None of these may get as far as loading the model.
    monkeypatch.setattr("cnclip.inference.load_for_inference", lambda *a, **k: pytest.fail("model loaded"))
    if case == "empty_class_folder":
        for f in (train / "blue").iterdir():
            f.unlink()
        status, expect = EXIT_DATA, f"class folder {train / 'blue'} has no images"
    elif case == "one_class_folder":
        for key in ("green", "blue", "yellow"):
            for f in (train / key).iterdir():
                f.unlink()
            (train / key).rmdir()
        extra = []
        status, expect = EXIT_DATA, f"{train}: a probe needs two classes at least, found 1 class folder(s) (red)"
    elif case == "one_class_list":
        classes.write_text("red: 红色\n", encoding="utf-8")
        status, expect = EXIT_DATA, f"{classes}: only one class ('red')"
    elif case == "class_not_trained":
        classes.write_text(classes.read_text(encoding="utf-8") + "purple: 紫色\n", encoding="utf-8")
        status, expect = EXIT_DATA, f"{train}: no decodable training image of class purple"
    elif case == "test_class_not_trained":  # the class list is the training sub-folders
        (test / "purple").mkdir()
        (test / "purple" / "0.png").write_bytes((test / "red" / "00.png").read_bytes())
        extra = []
        status, expect = EXIT_DATA, f"class folder {test / 'purple'} has no training folder {train / 'purple'}"
    elif case == "shots_too_many":
        (train / "green" / "04.png").unlink()  # green: 4 images, so 2 shots at most
        extra += ["--shots", "1,3"]
        status, expect = EXIT_USAGE, (f"--shots 3: class 'green' has 4 decodable training images in {train}; a 3-shot "
                                      f"probe draws 6 per class (3 to fit, 3 other ones to choose C on), so the largest "
                                      f"--shots here is 2")
    elif case == "bad_shots":
        extra += ["--shots", "1,two"]
        status, expect = EXIT_USAGE, "--shots: expected positive whole numbers separated by commas"
    elif case == "zero_shots":
        extra += ["--shots", "0,1"]
        status, expect = EXIT_USAGE, "--shots: every k must be >= 1, got '0,1'"
    else:
        extra += ["--held-out", "1"]
        status, expect = EXIT_USAGE, "--held-out must be between 0 and 1"
    code = run_cli("--model", tiny_model_dir, "--train", train, "--test", test, "--out", tmp_path / "o", *extra)
    err = capsys.readouterr().err
    assert code == status and expect in err and "Traceback" not in err, err


def test_a_class_whose_training_images_are_all_undecodable_is_named(tiny_model_dir, tmp_path, capsys):
    train, test, classes = make_probe_set(tmp_path, train=3, test=2)
    for f in (train / "yellow").iterdir():
        f.write_bytes(b"not an image")
    code = run_cli("--model", tiny_model_dir, "--train", train, "--test", test, "--classes", classes,
                   "--out", tmp_path / "o", "--cache-dir", tmp_path / "cache", "--workers", 0)
    err = capsys.readouterr().err
    assert code == EXIT_DATA and f"{train}: no decodable training image of class yellow" in err


def test_library_checks_raise_the_project_errors():
    x, y = clusters(4)
    x[3, 5] = float("nan")
    with pytest.raises(DataError, match="1 image embeddings are not finite"):
        linear_probe.probe(x, y, x, y, list(KEYS))
    with pytest.raises(DataError, match="two classes at least"):
        linear_probe.check_classes([0, 0], ["a"], "x")
    with pytest.raises(UsageError, match="class 'b' has 3"):
        linear_probe.check_shots([0] * 8 + [1] * 3, ["a", "b"], [1, 2], "x")
    linear_probe.check_shots([0] * 8 + [1] * 4, ["a", "b"], [1, 2], "x")  # 2 x 2 = 4: enough
