"""WiSE-FT (cnclip/wise.py and the trainer's sweep): exact ends, the pick rules, the files a run writes,
and best/, evaluate and export at the picked alpha (or `--alpha`)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DEMO_RECIPE, tiny_overrides
from cnclip import wise
from cnclip.errors import ConfigError


# ---------------------------------------------------------------- the pick rules, on hand-made tables

def row(alpha: float, recall: float, top1: float | None = None) -> dict:
    valid = {"mean_recall": recall}
    if top1 is not None:
        valid["zeroshot"] = {"top1": top1}
    return {"alpha": alpha, "valid": valid}


def test_best_retrieval_takes_the_highest_mean_recall():
    table = [row(0, 30, 90), row(0.5, 55, 60), row(1, 50, 20)]
    assert wise.pick_alpha(table, "best_retrieval", 2.0) == 0.5


def test_balanced_takes_the_best_recall_within_the_allowed_zeroshot_drop():
    table = [row(0, 30, 90), row(0.25, 40, 89), row(0.5, 48, 88.5), row(0.75, 55, 80), row(1, 60, 20)]
    assert wise.pick_alpha(table, "balanced", 2.0) == 0.5  # 0.75 drops 10 points
    assert wise.pick_alpha(table, "balanced", 10.0) == 0.75  # a drop of exactly the limit is allowed
    assert wise.pick_alpha(table, "balanced", 0.0) == 0  # nothing may drop: the base


def test_balanced_falls_back_to_the_base_and_ties_go_to_the_smaller_alpha():
    assert wise.pick_alpha([row(0, 30, 90), row(0.5, 60, 50), row(1, 70, 10)], "balanced", 2.0) == 0
    assert wise.pick_alpha([row(1, 50, 90), row(0.5, 50, 90), row(0, 40, 90)], "balanced", 2.0) == 0.5
    assert wise.pick_alpha([row(1, 50), row(0.5, 50)], "best_retrieval", 2.0) == 0.5


def test_balanced_refuses_a_table_without_the_base_or_zeroshot():
    with pytest.raises(ValueError, match="alpha 0"):
        wise.pick_alpha([row(0.5, 50, 80), row(1, 60, 70)], "balanced", 2.0)
    with pytest.raises(ValueError, match="zero-shot"):
        wise.pick_alpha([row(0, 50), row(1, 60)], "balanced", 2.0)


# ---------------------------------------------------------------- interpolation

def test_interpolation_is_exact_at_both_ends_and_scales_lora_b():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 7, generator=g), "m.lora_A.default.weight": torch.randn(3, 7, generator=g),
            "m.lora_B.default.weight": torch.zeros(5, 3)}
    tuned = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    for name in base:
        assert torch.equal(wise.interpolate(base, tuned, 1.0)[name], tuned[name])
    assert torch.equal(wise.interpolate(base, tuned, 0.0)["w"], base["w"])
    assert torch.equal(wise.interpolate(base, tuned, 0.0)["m.lora_B.default.weight"], torch.zeros(5, 3))
    half = wise.interpolate(base, tuned, 0.25)
    assert torch.allclose(half["m.lora_B.default.weight"], 0.25 * tuned["m.lora_B.default.weight"], atol=1e-7)
    assert torch.equal(half["m.lora_A.default.weight"], tuned["m.lora_A.default.weight"])  # not alpha squared
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        wise.interpolate(base, tuned, 1.5)


def test_snapshot_is_a_copy_not_the_live_parameters():
    layer = torch.nn.Linear(3, 2)
    snap = wise.snapshot_trainables(layer)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not torch.equal(snap["weight"], layer.weight.detach())


# ---------------------------------------------------------------- recipe keys

@pytest.mark.parametrize("override, message", [
    ("train.wise.alphas=[0,1.5]", r"train.wise.alphas.*\[0, 1\]"),
    ("train.wise.alphas=[]", "train.wise.alphas"),
    ("train.wise.alphas=[0,0]", "twice"),
    ("train.wise.pick=greedy", "train.wise.pick.*best_retrieval, balanced"),
    ("train.wise.max_zeroshot_drop=-1", "train.wise.max_zeroshot_drop"),
    ("train.wise.alphas=[0.5,1]", "must include 0"),
    ("train.wise.alpha=1", "alpha"),
])
def test_bad_wise_keys_are_config_errors_naming_the_key(override, message):
    from cnclip.recipe import load_recipe

    with pytest.raises(ConfigError, match=message):
        load_recipe(DEMO_RECIPE, [override], check_data=False)


def test_wise_is_off_unless_asked_and_needs_validation_and_zeroshot_for_balanced():
    from cnclip.recipe import load_recipe

    assert load_recipe(DEMO_RECIPE, check_data=False).train.wise is None
    with pytest.raises(ConfigError, match="needs a validation split"):
        load_recipe(DEMO_RECIPE, ["train.wise.pick=best_retrieval", "data.valid_split=null"], check_data=False)
    with pytest.raises(ConfigError, match="zeroshot.images"):
        load_recipe(DEMO_RECIPE, ["train.wise={}", "zeroshot.images=", "zeroshot.classes="], check_data=False)


# ---------------------------------------------------------------- a run with the sweep

ALPHAS = "[0,0.5,1]"


def wise_overrides(model_dir, data_dir, run_dir, **extra):
    return tiny_overrides(model_dir, data_dir, run_dir, **{
        "train.wise.pick": "best_retrieval", "train.wise.alphas": ALPHAS, "model.lora_dropout": 0.0,
        "train.lr": 5e-2, "train.epochs": 2, **extra})


@pytest.fixture(scope="module")
def wise_run(tiny_model_dir, tmp_path_factory):
    from conftest import make_tiny_dataset
    from cnclip.recipe import load_recipe
    from cnclip.trainer import train

    root = tmp_path_factory.mktemp("wise")
    data = make_tiny_dataset(root / "data")
    run_dir = root / "run"
    summary = train(load_recipe(DEMO_RECIPE, wise_overrides(tiny_model_dir, data, run_dir)))
    return run_dir, summary, data


def text_embeddings(clip, model_dir, texts=("左上角有一个红色的圆形", "一个蓝色的正方形")):
    from cnclip.models import encode_texts, load_tokenizer

    tok = load_tokenizer(str(model_dir))(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return encode_texts(clip.eval(), tok["input_ids"], tok["attention_mask"], tok.get("token_type_ids"))


def test_run_writes_wise_json_plot_and_best_at_the_picked_alpha(wise_run):
    from safetensors.torch import load_file
    from cnclip.checkpoint import TRAINABLE

    run_dir, summary, _ = wise_run
    record = json.loads((run_dir / "wise.json").read_text(encoding="utf-8"))
    assert record["alphas"] == [0.0, 0.5, 1.0] and record["rule"] == "best_retrieval"
    recalls = {r["alpha"]: r["valid"]["mean_recall"] for r in record["metrics"]}
    assert record["picked_alpha"] == wise.pick_alpha(record["metrics"], "best_retrieval", 0)
    assert recalls[record["picked_alpha"]] == max(recalls.values())
    from PIL import Image

    series = json.loads(Image.open(run_dir / "plots" / "wise.png").text["cnclip:series"])
    assert series["x"] == [0.0, 0.5, 1.0] and series["best"] == record["picked_alpha"]
    assert series["lines"]["validation mean recall"] == [recalls[a] for a in (0.0, 0.5, 1.0)]
    best_meta = json.loads((run_dir / "best" / "metrics.json").read_text(encoding="utf-8"))
    assert best_meta["wise"]["alpha"] == record["picked_alpha"]
    assert best_meta["valid"]["mean_recall"] == recalls[record["picked_alpha"]]
    assert summary["wise"]["alpha"] == record["picked_alpha"] and summary["wise"]["rule"] == "best_retrieval"
    # best/ holds the picked alpha's weights; the fine-tuned ones (alpha 1) are kept beside them.
    picked, tuned = load_file(str(run_dir / "best" / TRAINABLE)), load_file(str(run_dir / "best" / wise.TUNED_FILE))
    assert picked.keys() == tuned.keys()
    lora_b = [k for k in tuned if ".lora_B." in k]
    assert lora_b and all(torch.allclose(picked[k], record["picked_alpha"] * tuned[k], atol=1e-6) for k in lora_b)


def test_alpha_ends_reproduce_the_base_and_the_finetuned_model_exactly(wise_run, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import ChineseCLIPModel

    from cnclip.inference import load_run
    from cnclip.models import merged_model

    run_dir = wise_run[0]
    independent = ChineseCLIPModel.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    at0, _, _ = load_run(run_dir, alpha=0.0)
    assert torch.equal(text_embeddings(at0, tiny_model_dir), text_embeddings(independent, tiny_model_dir))
    assert torch.equal(at0.base_model.model.logit_scale, independent.logit_scale)
    merged0 = merged_model(at0)
    for name, tensor in independent.text_model.state_dict().items():  # merging an alpha-0 LoRA adds exact zeros
        assert torch.equal(merged0.text_model.state_dict()[name], tensor), name
    at1, _, _ = load_run(run_dir, alpha=1.0)
    tuned = load_file(str(run_dir / "best" / wise.TUNED_FILE))
    params = dict(at1.named_parameters())
    for name, tensor in tuned.items():
        assert torch.equal(params[name].detach(), tensor), name
    # ... and alpha 1 is not the base (the test above could not pass by loading the base twice).
    assert not torch.equal(text_embeddings(at1, tiny_model_dir), text_embeddings(independent, tiny_model_dir))


def test_rerun_of_a_finished_run_does_not_sweep_again(wise_run, tiny_model_dir):
    from cnclip.recipe import load_recipe
    from cnclip.trainer import train

    run_dir, _, data = wise_run
    before = (run_dir / "wise.json").stat().st_mtime_ns, (run_dir / "best" / "metrics.json").stat().st_mtime_ns
    summary = train(load_recipe(DEMO_RECIPE, wise_overrides(tiny_model_dir, data, run_dir)))
    assert summary["steps_this_run"] == 0 and "wise" in summary
    assert ((run_dir / "wise.json").stat().st_mtime_ns, (run_dir / "best" / "metrics.json").stat().st_mtime_ns) == before


def test_evaluate_uses_the_picked_alpha_and_alpha_overrides_it(wise_run, capsys):
    from cnclip.commands.evaluate import main

    run_dir = wise_run[0]
    rows = {r["alpha"]: r["valid"]["mean_recall"]
            for r in json.loads((run_dir / "wise.json").read_text(encoding="utf-8"))["metrics"]}
    picked = json.loads((run_dir / "wise.json").read_text(encoding="utf-8"))["picked_alpha"]

    def evaluated(*extra) -> float:
        assert main([str(run_dir), "--device", "cpu", "--out", str(run_dir / "eval-test"), *extra]) == 0
        line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1]
        return json.loads(line)["mean_recall"]

    assert evaluated() == pytest.approx(rows[picked], abs=1e-9)
    assert evaluated("--alpha", "0") == pytest.approx(rows[0.0], abs=1e-9)
    assert rows[0.0] != rows[picked]  # the two calls above could tell the alphas apart
    assert main([str(run_dir), "--alpha", "2"]) == 2  # usage error, exit 2


def test_export_at_alpha_is_the_runs_weights_interpolated(wise_run, tiny_model_dir, tmp_path):
    from transformers import ChineseCLIPModel

    from cnclip.exporter import export_run
    from cnclip.inference import load_run
    from cnclip.models import merged_model

    run_dir = wise_run[0]
    report = export_run(run_dir, tmp_path / "half", alpha=0.5)
    assert report["wise_alpha"] == 0.5
    exported = ChineseCLIPModel.from_pretrained(str(tmp_path / "half"))
    expected = merged_model(load_run(run_dir, alpha=0.5)[0])
    assert torch.allclose(text_embeddings(exported, tiny_model_dir), text_embeddings(expected, tiny_model_dir),
                          atol=1e-5)
    assert torch.equal(exported.logit_scale, expected.logit_scale)
    card = (tmp_path / "half" / "README.md").read_text(encoding="utf-8")
    assert "WiSE-FT alpha 0.5 set at export (`--alpha`)" in card and "| 0.5 (exported) |" in card
    export_run(run_dir, tmp_path / "picked")
    picked = json.loads((run_dir / "wise.json").read_text(encoding="utf-8"))["picked_alpha"]
    card = (tmp_path / "picked" / "README.md").read_text(encoding="utf-8")
    assert f"WiSE-FT alpha {picked:g} picked by rule best_retrieval" in card
    assert (tmp_path / "picked" / "wise.png").is_file()
    base = ChineseCLIPModel.from_pretrained(str(export_run(run_dir, tmp_path / "zero", alpha=0.0)["out_dir"]))
    independent = ChineseCLIPModel.from_pretrained(str(tiny_model_dir))
    for name, tensor in independent.text_model.state_dict().items():
        assert torch.equal(base.text_model.state_dict()[name], tensor), name


def test_full_text_tuning_interpolates_the_text_tower_exactly_at_the_ends(tiny_model_dir, tmp_path):
    from conftest import make_tiny_dataset
    from transformers import ChineseCLIPModel

    from cnclip.inference import load_run
    from cnclip.recipe import load_recipe
    from cnclip.trainer import train

    data = make_tiny_dataset(tmp_path / "data")
    train(load_recipe(DEMO_RECIPE, wise_overrides(tiny_model_dir, data, tmp_path / "run",
                                                   **{"model.text_tuning": "full", "train.epochs": 1,
                                                      "train.lr": 1e-3})))
    independent = ChineseCLIPModel.from_pretrained(str(tiny_model_dir))
    at0 = load_run(tmp_path / "run", alpha=0.0)[0]
    for name, tensor in independent.text_model.state_dict().items():
        assert torch.equal(at0.text_model.state_dict()[name], tensor), name
    at1 = load_run(tmp_path / "run", alpha=1.0)[0]
    assert not torch.equal(at1.text_model.embeddings.word_embeddings.weight,
                           independent.text_model.embeddings.word_embeddings.weight)
