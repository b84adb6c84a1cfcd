"""WiSE-FT: weight-space interpolation between the base model and the fine-tuned one.

Training only changes the parameters the optimizer updates (`checkpoint.trainable_state`); the model at
`alpha` gives each of them the value `lerp(base, tuned, alpha)` = base + alpha * (tuned - base):

* LoRA: the base value of every `lora_B` is zero (peft starts it there), so interpolating `lora_B` scales
  the LoRA update B @ A by alpha; `lora_A` keeps its tuned value (interpolating both would scale the
  update by alpha squared). The trained copy of the text projection (peft's modules_to_save) is
  interpolated from the base projection, which peft keeps beside it.
* `model.text_tuning: full`: every text-tower weight is interpolated itself.
* The logit scale is interpolated as it is stored, in log space: the temperature at alpha is
  base**(1-alpha) * tuned**alpha (geometric), like every other weight.

Guarantees: `torch.lerp` returns `base` exactly at alpha 0 and `tuned` exactly at alpha 1, so alpha 0
embeds and scores bit for bit like the base model and alpha 1 like the fine-tuned one
(tests/test_wise.py checks both against a base loaded with transformers alone and against the run).

The pick rules (`train.wise.pick`), on the validation metrics of every alpha swept:

* best_retrieval: the alpha with the highest validation mean recall.
* balanced: among the alphas whose zero-shot top-1 is at most `train.wise.max_zeroshot_drop` points below
  alpha 0's (the base model's), the one with the highest validation mean recall. Alpha 0 always
  qualifies (its drop is 0), so there is always an answer.

Ties go to the smaller alpha (the one closer to the base model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import write_json
from .recipe import WISE_PICK_RULES as PICK_RULES

WISE_FILE = "wise.json"
TUNED_FILE = "finetuned.safetensors"  # best/: the fine-tuned (alpha 1) trainables beside the picked ones


def snapshot_trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Host copies of the trainable parameters, by name: copies, never views (on a CPU `.cpu()` returns the
    parameter itself, which training would then change under the snapshot)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """The trainable parameters at `alpha` (0 = base, 1 = tuned; exact at both ends), by name."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
    missing = sorted(set(tuned) - set(base))
    if missing:
        raise ValueError(f"no base value for {len(missing)} trained tensors, e.g. {missing[:3]}")
    return {name: t if is_lora_a(name) else torch.lerp(base[name].to(t.device, t.dtype), t, float(alpha))
            for name, t in tuned.items()}


@torch.no_grad()
def set_trainables(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy `values` into the model's parameters of the same names (every name must exist)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ValueError(f"{len(unknown)} tensors match no parameter of the model, e.g. {unknown[:3]}")
    for name, value in values.items():
        params[name].copy_(value)


def zeroshot_top1(metrics: dict) -> float | None:
    z = metrics.get("zeroshot")
    return None if z is None else z["top1"]


def pick_alpha(table: list[dict], rule: str, max_zeroshot_drop: float) -> float:
    """The alpha `rule` picks from `table` (one {"alpha", "valid": validation metrics} per alpha; see the
    module docstring). balanced needs alpha 0 in the table and zero-shot results in every row."""
    if rule not in PICK_RULES:
        raise ValueError(f"unknown pick rule {rule!r}; accepted: {', '.join(PICK_RULES)}")
    rows = sorted(table, key=lambda r: r["alpha"])
    if rule == "balanced":
        base = [r for r in rows if r["alpha"] == 0.0]
        if not base or any(zeroshot_top1(r["valid"]) is None for r in rows):
            raise ValueError("the balanced rule needs alpha 0 and a zero-shot top-1 for every alpha")
        reference = zeroshot_top1(base[0]["valid"])
        rows = [r for r in rows if reference - zeroshot_top1(r["valid"]) <= max_zeroshot_drop]
    best = rows[0]
    for row in rows[1:]:  # strictly better only: ties keep the smaller alpha
        if row["valid"]["mean_recall"] > best["valid"]["mean_recall"]:
            best = row
    return best["alpha"]


def rule_text(rule: str, max_zeroshot_drop: float) -> str:
    if rule == "balanced":
        return (f"balanced (highest validation mean recall among alphas whose zero-shot top-1 is at most "
                f"{max_zeroshot_drop:g} points below alpha 0's)")
    return "best_retrieval (highest validation mean recall)"


def write_wise_json(path: Path, table: list[dict], rule: str, max_zeroshot_drop: float, picked: float,
                    epoch: int | None) -> dict:
    """RUN/wise.json, written atomically: the sweep, the rule and the picked alpha."""
    record = {"alphas": [r["alpha"] for r in table], "metrics": table, "rule": rule,
              "rule_text": rule_text(rule, max_zeroshot_drop), "max_zeroshot_drop": max_zeroshot_drop,
              "picked_alpha": picked, "epoch": epoch}
    write_json(path, record)
    return record
