"""Captions longer than 52 tokens: data.context_length up to the text tower's max_position_embeddings.

The captions share a 100-character prefix; the words that tell them apart (colour, shape) come only
after token 100. Trained with a long enough context, retrieval is far above chance; cut at 52 tokens
every caption is the same prefix, and retrieval stays at chance.
"""

import json

import pytest
from transformers import ChineseCLIPConfig, ChineseCLIPModel

from cnclip.errors import ConfigError
from cnclip.finetune import main as finetune_main
from cnclip.model_card import original_context_note

from conftest import COLORS, DEMO_RECIPE, image_bytes, make_tiny_model, tiny_overrides, write_split

PREFIX = ("图片中间有一个" * 15)[:100]  # 100 tokens, the same in every caption
SHAPES = {"圆形": "circle", "正方形": "square"}
POSITIONS = 160


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The tiny test model with room for 160 positions."""
    out = make_tiny_model(tmp_path_factory.mktemp("long_model"))
    config = ChineseCLIPConfig.from_pretrained(out)
    config.text_config.max_position_embeddings = POSITIONS
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    ChineseCLIPModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def long_data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_data")
    for split, per_class in (("train", 3), ("valid", 1)):
        images, texts, image_id, text_id = {}, [], 100 if split == "train" else 500, 1 if split == "train" else 900
        for cname, color in COLORS.items():
            for sname, shape in SHAPES.items():
                ids = []
                for k in range(per_class):
                    images[image_id] = image_bytes(color, (40 + 4 * k, 30 + 2 * k), shape)
                    ids.append(image_id)
                    image_id += 1
                texts.append({"text_id": text_id, "text": f"{PREFIX}一个{cname}的{sname}", "image_ids": ids})
                text_id += 1
        write_split(root, split, images, texts)
    return root


def train_r1(model_dir, data_dir, run_dir, context_length: int) -> float:
    """Mean of the two directions' R@1 on the validation split after training (8 pairs: chance 12.5)."""
    overrides = tiny_overrides(model_dir, data_dir, run_dir, **{
        "data.context_length": context_length, "model.text_tuning": "full", "model.lora_dropout": 0.0,
        "train.epochs": 30, "train.batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 2,
        "train.save_every": 1000, "train.log_every": 1000, "eval.before_training": False, "data.num_workers": 0})
    assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0
    after = json.loads((run_dir / "summary.json").read_text())["after"]
    return (after["text_to_image"]["r1"] + after["image_to_text"]["r1"]) / 2


def test_distinguishing_words_after_token_52_are_learned_only_with_a_long_context(long_model_dir, long_data_dir,
                                                                                   tmp_path):
    long = train_r1(long_model_dir, long_data_dir, tmp_path / "ctx128", 128)
    short = train_r1(long_model_dir, long_data_dir, tmp_path / "ctx52", 52)
    print(f"\nvalidation R@1 (mean of both directions, 8 pairs, chance 12.5): context 128: {long:.1f}, "
          f"context 52: {short:.1f}")
    assert long >= 50.0, short  # four times chance
    assert short <= 25.0  # every caption is the same prefix: at most two hits in each direction
    assert long >= short + 30.0


def test_context_length_beyond_the_position_embeddings_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    code = finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run",
                                                            **{"data.context_length": 65})])  # the tiny model has 64
    assert code == ConfigError.exit_status
    err = capsys.readouterr().err
    assert "data.context_length" in err and "max_position_embeddings (64)" in err
    assert finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run64",
                                                            **{"data.context_length": 64, "train.epochs": 1})]) == 0


def test_original_format_cards_say_how_to_tokenise_at_the_trained_context():
    assert "context_length=128" in original_context_note("cn_clip", 128)
    modelscope = original_context_note("modelscope", 128)
    assert "52" in modelscope and "context_length=128" in modelscope  # the pipeline's cut, and the way around it
    assert "context_length=" not in original_context_note("modelscope", 52)
