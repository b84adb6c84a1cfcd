"""Forgetting, measured: a tiny generalist model is fine-tuned into a shape/position specialist.

The scenario (all in this file, in seconds on a CPU):

1. base: the tiny config of recipes/models/tiny (random weights, locked random image tower), its text
   tower fully trained for 15 short epochs on the demo's captions, which name a colour, a shape and a
   position ("左上角有一个红色的圆形"). It learns colours well (colour zero-shot classification near 100%)
   and shapes and positions a little: a generalist, as a pretrained CLIP knows a little of a user's domain.
   Exported (`cnclip export`) as a plain model directory, the base of step 2.
2. new task: LoRA fine-tuning of that base on captions that name only shapes and positions
   ("左上角有一个圆形"), never a colour. The same drawings, a specialist's captions.

Measured on the new task's validation split (mean recall over 30 held-out captions x 180 drawings)
and the colour zero-shot folder (top-1, 144 drawings): the base model (WiSE-FT alpha 0), plain
fine-tuning (alpha 1: the best epoch's weights), the alpha WiSE-FT's balanced rule picks, and
distillation from the frozen base. Plain fine-tuning learns the new task and forgets colours; the
picked alpha and distillation keep most of the colours and a large part of the new-task gain. The
asserted margins (below) sit inside what this scenario measures; the table is printed (pytest -s).

`finetune_new_task(scenario, name, **overrides)` runs step 2 with any recipe overrides, so another guard
against forgetting (e.g. a regulariser in train.*) is one more arm measured the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

from cnclip.global_state import torch_threads

# Asserted margins, in points, against what this scenario measured on a 2-core VM: base colour top-1 100
# and new-task mean recall 39.9; plain fine-tuning drops colours by 83.3 and lifts recall by 18.1; the
# balanced pick (alpha 0.2) drops colours by 1.4 and lifts recall by 9.4, 52% of plain fine-tuning's gain
# (sweep, recall / top-1: alpha 0.1 44.5/99.3, 0.3 49.4/98.6, 0.4 51.5/88.9, 0.5 51.8/74.3, 0.75 55.4/29.9).
# Trained from other random starts (base seeds 1 and 2, 15 and 20 base epochs) the pick kept 22-83% of the
# gain for a drop of at most 3.5 points, where plain fine-tuning dropped 64-83: the margins leave room for that.
BASE_ZEROSHOT_MIN = 60.0  # the base really knows colours (6 classes: chance is 16.7)
MIN_FORGETTING = 30.0  # plain fine-tuning loses at least this much colour zero-shot top-1
WISE_KEEPS = 0.25  # the picked alpha's drop is at most this fraction of plain fine-tuning's drop
MIN_NEW_TASK_GAIN = 8.0  # plain fine-tuning's new-task mean recall beats the base's by at least this
MIN_GAIN_KEPT = 0.2  # a guard keeps at least this fraction of plain fine-tuning's new-task gain
MAX_ZEROSHOT_DROP = 5.0  # train.wise.max_zeroshot_drop of the balanced rule
ALPHAS = "[0,0.1,0.2,0.3,0.4,0.5,0.6,0.75,1]"


@dataclass
class Scenario:
    root: Path
    base: Path  # the exported colour model: the base of every new-task run
    new_task: Path  # shape/position data
    zeroshot_images: Path
    zeroshot_classes: Path


def overrides(values: dict) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def common(root: Path, name: str, data: Path, zeroshot: tuple[Path, Path]) -> dict:
    return {
        "run_dir": str(root / name), "cache.dir": str(root / "cache"), "seed": 0, "data.root": str(data),
        "data.generate": None, "data.context_length": 16, "data.num_workers": 0, "train.device": "cpu",
        "train.batch_size": 64, "train.warmup_steps": 5, "train.log_every": 50, "train.save_every": 1000,
        "train.weight_decay": 0.0, "zeroshot.images": str(zeroshot[0]), "zeroshot.classes": str(zeroshot[1]),
        "zeroshot.templates": str(REPO / "recipes" / "zeroshot" / "demo_templates.txt"),
    }


def train_run(values: dict) -> dict:
    from cnclip.recipe import load_recipe
    from cnclip.trainer import train

    return train(load_recipe(REPO / "recipes" / "demo.yaml", overrides(values)))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    from cnclip.demo_data import write_demo_zeroshot, write_family_dataset
    from cnclip.exporter import export_run

    root = tmp_path_factory.mktemp("forgetting")
    general = write_family_dataset(root / "general", "colour_shape_position", seed=1)
    # Two drawings per group and every held-out wording in validation, 24 drawings per colour for
    # zero-shot: one miss moves recall or top-1 by about a point, not by five.
    new_task = write_family_dataset(root / "shape_position", "shape_position", seed=2, valid_images_per_class=2)
    zeroshot = write_demo_zeroshot(root / "zeroshot", seed=3, images_per_class=24)
    # No validation: best/ is the last epoch (zero-shot is measured in step 2, as alpha 0 and before training).
    base_run = {**common(root, "base_run", general, zeroshot), "model.base": str(REPO / "recipes/models/tiny"),
                "model.random_init": True, "model.text_tuning": "full", "train.epochs": 15, "train.lr": 5e-3,
                "eval.before_training": False, "data.valid_split": None, "zeroshot.images": "",
                "zeroshot.classes": ""}
    with torch_threads(1):  # one thread: two fight for a small, busy CPU's cores
        train_run(base_run)
        export_run(root / "base_run", root / "base")
    return Scenario(root, root / "base", new_task, *zeroshot)


def finetune_new_task(s: Scenario, name: str, **extra) -> dict:
    """Step 2 (LoRA on the shape/position captions) from the colour base; its summary.json."""
    values = {**common(s.root, name, s.new_task, (s.zeroshot_images, s.zeroshot_classes)),
              "model.base": str(s.base), "model.random_init": False, "model.lora_r": 8, "model.lora_alpha": 16,
              "model.lora_dropout": 0.0, "model.target_modules": "[query,value]", "train.epochs": 30,
              "train.lr": 8e-3, "eval.before_training": True, **extra}
    with torch_threads(1):  # one thread: two fight for a small, busy CPU's cores
        return train_run(values)


@pytest.fixture(scope="module")
def wise_run(scenario) -> dict:
    summary = finetune_new_task(scenario, "wise", **{"train.wise.pick": "balanced", "train.wise.alphas": ALPHAS,
                                                     "train.wise.max_zeroshot_drop": MAX_ZEROSHOT_DROP})
    record = json.loads((scenario.root / "wise" / "wise.json").read_text(encoding="utf-8"))
    best = json.loads((scenario.root / "wise" / "best" / "metrics.json").read_text(encoding="utf-8"))
    return {"summary": summary, "wise": record, "best": best}


def table_row(valid: dict) -> tuple[float, float]:
    return valid["mean_recall"], valid["zeroshot"]["top1"]


def test_wise_keeps_what_plain_finetuning_forgets(wise_run):
    rows = {r["alpha"]: table_row(r["valid"]) for r in wise_run["wise"]["metrics"]}
    picked = wise_run["wise"]["picked_alpha"]
    (base_recall, base_zs), (plain_recall, plain_zs), (wise_recall, wise_zs) = rows[0.0], rows[1.0], rows[picked]
    print(f"\n{'':28}{'new-task mean recall':>22}{'colour zero-shot top-1':>24}")
    for label, (recall, zs) in (("base (alpha 0)", rows[0.0]), ("plain fine-tune (alpha 1)", rows[1.0]),
                                (f"WiSE-FT picked alpha {picked:g}", rows[picked])):
        print(f"{label:28}{recall:22.2f}{zs:24.2f}")
    print("sweep:", {a: (round(r, 2), round(z, 2)) for a, (r, z) in sorted(rows.items())})
    assert base_zs >= BASE_ZEROSHOT_MIN, "the base model must know colours for forgetting to be measurable"
    plain_drop, wise_drop = base_zs - plain_zs, base_zs - wise_zs
    assert plain_drop >= MIN_FORGETTING, f"plain fine-tuning should forget colours: drop {plain_drop:.2f}"
    assert plain_recall >= base_recall + MIN_NEW_TASK_GAIN, (plain_recall, base_recall)
    assert wise_drop <= MAX_ZEROSHOT_DROP and wise_drop <= WISE_KEEPS * plain_drop, (wise_drop, plain_drop)
    assert wise_recall - base_recall >= MIN_GAIN_KEPT * (plain_recall - base_recall), (wise_recall, base_recall,
                                                                                       plain_recall)
    # The run says what it picked, and best/ holds that model: its metrics are the picked row's.
    assert wise_run["summary"]["wise"]["alpha"] == picked
    assert wise_run["best"]["valid"] == next(r["valid"] for r in wise_run["wise"]["metrics"] if r["alpha"] == picked)


# ---- the distillation arm (train.distill, the frozen base as teacher)

# Measured on the same 2-core VM: at weight 2 the colour zero-shot drop at the best epoch is 13.2 points
# (plain fine-tuning: 83.3) and new-task mean recall 50.1 against the base's 39.9 (plain: 58.0), 56% of the
# gain. The weight trades one for the other: 0.5: 56.3 / drop 44.4; 1: 56.5 / 34.0; 3: 46.7 / 7.6. From
# another random base (seed 1) weight 2 kept less (40.2 / drop 20.1; plain 56.9 / 68.8): distillation
# towards a teacher that knows the new concepts only a little pulls against them.
DISTILL_WEIGHT = 2.0
DISTILL_KEEPS = 0.35  # distillation's drop is at most this fraction of plain fine-tuning's drop


@pytest.fixture(scope="module")
def distill_run(scenario) -> dict:
    return finetune_new_task(scenario, "distill", **{"train.distill.weight": DISTILL_WEIGHT})


def test_distillation_keeps_what_plain_finetuning_forgets(wise_run, distill_run):
    rows = {r["alpha"]: table_row(r["valid"]) for r in wise_run["wise"]["metrics"]}
    picked = wise_run["wise"]["picked_alpha"]
    (base_recall, base_zs), (plain_recall, plain_zs) = rows[0.0], rows[1.0]
    distill_recall, distill_zs = table_row(distill_run["best"]["valid"])
    assert table_row(distill_run["before"]) == rows[0.0]  # the same base, measured the same way
    print(f"\n{'':32}{'new-task mean recall':>22}{'colour zero-shot top-1':>24}")
    for label, (recall, zs) in (("base", rows[0.0]), ("plain fine-tune", rows[1.0]),
                                (f"WiSE-FT picked alpha {picked:g}", rows[picked]),
                                (f"distillation (weight {DISTILL_WEIGHT:g})", (distill_recall, distill_zs))):
        print(f"{label:32}{recall:22.2f}{zs:24.2f}")
    plain_drop, distill_drop = base_zs - plain_zs, base_zs - distill_zs
    assert plain_drop >= MIN_FORGETTING, f"plain fine-tuning should forget colours: drop {plain_drop:.2f}"
    assert distill_drop <= DISTILL_KEEPS * plain_drop, (distill_drop, plain_drop)
    assert distill_recall - base_recall >= MIN_GAIN_KEPT * (plain_recall - base_recall), (
        distill_recall, base_recall, plain_recall)
