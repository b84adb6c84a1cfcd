"""Linear probe and few-shot classification on frozen image embeddings, as the CLIP paper evaluates.

A linear probe is L2-regularised multinomial logistic regression on the image tower's embeddings
(unit length, read through the image cache by `cnclip.classifier.folder_embeddings`, so probing a
folder a second time runs no image forward). The solver is scikit-learn's LogisticRegression with
L-BFGS (`MAX_ITER` iterations at most, as the CLIP paper; gradient tolerance `TOL`); its objective is
`C * sum(cross-entropy) + ||W||^2 / 2` (the intercept is not penalised).

Choosing C (`choose_c`): the CLIP paper's parametric binary search. log10 C is first tried at
-6, -4, ..., 6; then, around the best so far, at half the step each round (1, 0.5, 0.25, 0.125
decades) until the resolution is 8 steps per decade: at most 15 fits. Each fit is scored on a
held-out part of the training images, never on the test images; the best is the highest held-out
top-1, ties broken by the lower held-out cross-entropy, then by the smaller C (stronger
regularisation).

* Full probe (`probe`): per class, `held_out` of the training images (at least one, none of a
  class with a single image) are held out to choose C, then the probe is fitted on every training
  image with that C.
* k-shot probe (`few_shot`): per class, k images to fit and k other images to choose C on are
  drawn from the training images with the seed; the probe is fitted on the k images only, so it
  has seen exactly k labels per class. Every class needs 2k training images (`check_shots`).

Everything is deterministic given the features and the seed (numpy's Generator draws the images;
L-BFGS has no randomness). Scores are `cnclip.classifier.score`'s, on the probe's probabilities:
top-1, top-5, per class and the confusion matrix, the same as zero-shot's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .classifier import score
from .errors import DataError, UsageError

MAX_ITER = 1000
# L-BFGS stops when the largest gradient entry is below TOL. Measured against torch's L-BFGS run to 1e-10:
# on the 4-class set of tests/test_probe.py (C about 20-60) scikit-learn's default 1e-4 left the probabilities
# up to 0.006 off, 1e-6 up to 2e-4 (about twice the iterations); on nearly separable features (the demo's
# colours, C = 4e5) 1e-6 stops with the objective 3% above its minimum and probabilities up to 0.04 off, the
# predictions the same. The predictions are what the reported accuracies count.
TOL = 1e-6
# log10 C is searched in [LOG10_C_RANGE] at RESOLUTION steps per decade (the CLIP paper's range and resolution).
LOG10_C_RANGE = (-6, 6)
RESOLUTION = 8
FIRST_STEP = 2  # decades between the first points tried
SMALL_FIT = 2**22  # multiply-adds per step below which a fit runs on one thread (`fit`)
HELD_OUT = 0.2  # share of each class's training images held out to choose C (full probe)


@dataclass
class Trial:
    """One C tried in the search, scored on the held-out images."""

    c: float
    top1: float  # percent
    loss: float  # mean cross-entropy
    converged: bool


@dataclass
class CSearch:
    c: float
    trials: list[Trial] = field(default_factory=list)

    def tried(self) -> list[dict]:
        """Every C tried, smallest first, with its held-out top-1 and cross-entropy."""
        return [vars(t) for t in sorted(self.trials, key=lambda t: t.c)]


def fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = MAX_ITER):
    """L2-regularised multinomial logistic regression (scikit-learn, L-BFGS) with inverse strength `c`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=TOL)
    # Each L-BFGS step multiplies (n x d) by (d x classes). Below SMALL_FIT multiply-adds, thread start-up costs
    # more than the product: a few-shot fit ran 30x slower on two busy cores with BLAS/OpenMP threads than on one.
    small = x.shape[0] * x.shape[1] * len(np.unique(y)) < SMALL_FIT
    with warnings.catch_warnings(), threadpool_limits(limits=1 if small else None):
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported per fit (`converged`), not as a flood
        model.fit(x, y)
    return model


def converged(model, max_iter: int = MAX_ITER) -> bool:
    return int(np.max(model.n_iter_)) < max_iter


def predict_proba(model, x: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, num_classes) probabilities, column c for class c (a class the fit never saw gets 0)."""
    out = np.zeros((len(x), num_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def _held_out_score(model, x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[float, float]:
    """(top-1 percent, mean cross-entropy) on held-out images."""
    proba = predict_proba(model, x, num_classes)
    top1 = 100.0 * float(np.mean(proba.argmax(axis=1) == y))
    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-300, None))))
    return top1, loss


def choose_c(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int,
             max_iter: int = MAX_ITER) -> CSearch:
    """The CLIP paper's parametric binary search for C (module doc), fitted on `x_fit`, scored on `x_val`."""
    low, high = (e * RESOLUTION for e in LOG10_C_RANGE)  # log10 C in units of 1/RESOLUTION decade
    tried: dict[int, Trial] = {}

    def trial(e: int) -> Trial:
        if e not in tried:
            c = 10.0 ** (e / RESOLUTION)
            model = fit(x_fit, y_fit, c, max_iter)
            top1, loss = _held_out_score(model, x_val, y_val, num_classes)
            tried[e] = Trial(c, top1, loss, converged(model, max_iter))
        return tried[e]

    def rank(e: int) -> tuple:
        t = trial(e)
        return (t.top1, -t.loss, -e)

    best = max(range(low, high + 1, FIRST_STEP * RESOLUTION), key=rank)
    step = FIRST_STEP * RESOLUTION // 2
    while step >= 1:
        best = max([e for e in (best - step, best, best + step) if low <= e <= high], key=rank)
        step //= 2
    return CSearch(tried[best].c, list(tried.values()))


def _per_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's image indices, shuffled by `rng` (classes in order, so draws depend only on the seed)."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def held_out_split(labels: np.ndarray, num_classes: int, fraction: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: per class round(n * fraction) images held out, at least 1, none when n == 1."""
    fit_idx, val_idx = [], []
    for idx in _per_class(labels, num_classes, rng):
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        val_idx.append(idx[:k])
        fit_idx.append(idx[k:])
    return np.sort(np.concatenate(fit_idx)), np.sort(np.concatenate(val_idx))


def draw_shots(labels: np.ndarray, num_classes: int, shots: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: per class `shots` images to fit and `shots` other ones to choose C on."""
    drawn = _per_class(labels, num_classes, rng)
    return (np.sort(np.concatenate([idx[:shots] for idx in drawn])),
            np.sort(np.concatenate([idx[shots:2 * shots] for idx in drawn])))


def check_classes(labels: Sequence[int], keys: Sequence[str], where: str) -> None:
    """Every class of the list needs training images, and a probe needs two classes at least."""
    if len(keys) < 2:
        raise DataError(f"{where}: a probe needs two classes at least, the class list has {len(keys)} "
                        f"({', '.join(keys)})")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(keys))
    missing = [keys[c] for c in range(len(keys)) if counts[c] == 0]
    if missing:
        raise DataError(f"{where}: no decodable training image of class {', '.join(missing)}; every class of the "
                        f"class list needs training images (the probe cannot predict a class it never saw)")


def check_shots(labels: Sequence[int], keys: Sequence[str], shots: Sequence[int], where: str) -> None:
    """A k-shot probe draws 2k images per class (k to fit, k to choose C on): UsageError naming the short class."""
    if not shots:
        return
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(keys))
    smallest = int(np.argmin(counts))
    k = max(shots)
    if 2 * k > counts[smallest]:
        raise UsageError(f"--shots {k}: class {keys[smallest]!r} has {counts[smallest]} decodable training images in "
                         f"{where}; a {k}-shot probe draws {2 * k} per class ({k} to fit, {k} other ones to choose "
                         f"C on), so the largest --shots here is {counts[smallest] // 2}")


def _as_arrays(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = embeddings.double().numpy()
    if not np.isfinite(x).all():  # a broken checkpoint; scikit-learn would stop with a bare ValueError
        raise DataError(f"{int((~np.isfinite(x).all(axis=1)).sum())} image embeddings are not finite (NaN or inf): "
                        f"the model's image tower gives no usable features")
    return x, labels.long().numpy()


@dataclass
class ProbeResult:
    report: dict  # score()'s metrics on the test images, plus "C", "search", "held_out", "converged"
    probabilities: np.ndarray  # (test images, classes)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          keys: Sequence[str], seed: int = 0, held_out: float = HELD_OUT, max_iter: int = MAX_ITER) -> ProbeResult:
    """The full linear probe: C chosen on a held-out part of the training images, then fitted on all of them.

    The report holds `cnclip.classifier.score`'s metrics on the test images plus "C", "search" (every
    C tried with its held-out top-1 and cross-entropy), "held_out" (images held out) and "converged".
    """
    x, y = _as_arrays(train_x, train_y)
    tx, ty = _as_arrays(test_x, test_y)
    fit_idx, val_idx = held_out_split(y, len(keys), held_out, np.random.default_rng(seed))
    if len(val_idx) == 0:
        raise DataError("no class has two training images: nothing can be held out to choose C")
    search = choose_c(x[fit_idx], y[fit_idx], x[val_idx], y[val_idx], len(keys), max_iter)
    model = fit(x, y, search.c, max_iter)
    proba = predict_proba(model, tx, len(keys))
    metrics = score(torch.from_numpy(proba), torch.from_numpy(ty), keys)
    return ProbeResult({**metrics, "C": search.c, "search": search.tried(), "held_out": int(len(val_idx)),
                        "converged": converged(model, max_iter)}, proba)


def few_shot(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             keys: Sequence[str], shots: Sequence[int], seeds: Sequence[int], max_iter: int = MAX_ITER) -> dict:
    """k-shot probes for every k in `shots` and every seed: {"runs": [...], "summary": [...]} (top-1/top-5 mean, std)."""
    x, y = _as_arrays(train_x, train_y)
    tx, ty = _as_arrays(test_x, test_y)
    runs = []
    for k in shots:
        for seed in seeds:
            fit_idx, val_idx = draw_shots(y, len(keys), k, np.random.default_rng([seed, k]))
            search = choose_c(x[fit_idx], y[fit_idx], x[val_idx], y[val_idx], len(keys), max_iter)
            model = fit(x[fit_idx], y[fit_idx], search.c, max_iter)
            m = score(torch.from_numpy(predict_proba(model, tx, len(keys))), torch.from_numpy(ty), keys)
            runs.append({"shots": k, "seed": seed, "C": search.c, "top1": m["top1"], "top5": m["top5"],
                         "converged": converged(model, max_iter)})
    summary = []
    for k in shots:
        mine = [r for r in runs if r["shots"] == k]
        row: dict = {"shots": k, "seeds": len(mine)}
        for metric in ("top1", "top5"):
            values = np.array([r[metric] for r in mine])
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(row)
    return {"shots": list(shots), "seeds": list(seeds), "runs": runs, "summary": summary}


def few_shot_series(record: dict) -> dict:
    """The plotted series of a probe.json record (`cnclip.plots.figure`): k-shot top-1 against k (log2 axis),
    its spread over seeds as a band, and the full probe and zero-shot top-1 as horizontal reference lines."""
    summary = record["few_shot"]["summary"]
    seeds = len(record["few_shot"]["seeds"])
    label = f"k-shot linear probe top-1 (mean ± std of {seeds} seeds)" if seeds > 1 else "k-shot linear probe top-1"
    references = {f"linear probe, all training images (C={record['probe']['C']:.3g})": record["probe"]["top1"]}
    if record.get("zeroshot"):
        references["zero-shot"] = record["zeroshot"]["top1"]
    return {"title": "few-shot linear probe vs zero-shot, test top-1 (%)", "xlabel": "labelled images per class",
            "x": [row["shots"] for row in summary], "lines": {label: [row["top1_mean"] for row in summary]},
            "spread": {label: [row["top1_std"] for row in summary]}, "baseline": {},
            "references": references, "xscale": "log2"}

