"""Distillation (train.distill): the KL term, its gradient through gradient caching, the frozen teacher."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnclip.checkpoint import load_trainable
from cnclip.data import tokenize
from cnclip.distill import frozen_base_teacher
from cnclip.errors import ConfigError
from cnclip.finetune import main as finetune_main
from cnclip.loss import distillation_loss
from cnclip.models import encode_texts
from cnclip.recipe import load_recipe
from cnclip.runtime import pick_runtime
from cnclip.train_step import contrastive_step

from conftest import DEMO_RECIPE, lora_model_with_gradients, tiny_overrides

CAPTIONS = ["一个红色的圆形", "左上角有一个蓝色的正方形", "猫", "高级感托特包斜挎", "一个红色的圆形",
            "白色连衣裙", "黑色男鞋", "手机壳上画着一只狗", "黄色的花朵照片", "右下角有一个绿色三角"]
RUNTIME = pick_runtime("cpu")


def test_distillation_loss_is_both_directions_with_each_models_scale():
    gen = torch.Generator().manual_seed(1)
    img, txt, t_img, t_txt = (F.normalize(torch.randn(5, 8, generator=gen), dim=-1) for _ in range(4))
    s_scale, t_scale = torch.tensor(2.0), torch.tensor(1.0)  # log scales
    s_logits, t_logits = s_scale.exp() * img @ txt.t(), t_scale.exp() * t_img @ t_txt.t()

    def kl(t, s):
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)

    expected = (kl(t_logits, s_logits) + kl(t_logits.t(), s_logits.t())) / 2
    got = distillation_loss(img * 3, txt, s_scale, t_img * 2, t_txt, t_scale)  # unnormalised inputs are normalised
    assert abs(got.item() - expected.item()) < 1e-6
    fixed = distillation_loss(img, txt, s_scale, t_img, t_txt, t_scale, temperature=0.5)
    expected_fixed = (kl(2 * t_img @ t_txt.t(), 2 * img @ txt.t()) + kl(2 * t_txt @ t_img.t(), 2 * txt @ img.t())) / 2
    assert abs(fixed.item() - expected_fixed.item()) < 1e-6


def build(model_dir, nonzero_lora: bool):
    model, base = lora_model_with_gradients(model_dir, 0.0, ["query", "value", "dense"])
    if not nonzero_lora:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()  # LoRA's own start: the student is the base model
    model.eval()  # no dropout: exact comparisons
    tokens = tokenize(base.tokenizer, CAPTIONS, 16)
    image_emb = torch.randn(len(CAPTIONS), 16, generator=torch.Generator().manual_seed(3))
    return model, base.clip, tokens, image_emb


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def step(model, clip, tokens, image_emb, teacher=None, chunk=0, packed=True):
    params = trainable(model)
    for p in params.values():
        p.grad = None
    loss = contrastive_step(clip, list(params.values()), tokens, image_emb, None, None, RUNTIME, chunk, packed=packed,
                            teacher=teacher, teacher_image_emb=None if teacher is None else image_emb)
    return loss.item(), {n: p.grad.clone() for n, p in params.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_frozen_base_teacher_at_step_zero_adds_nothing(tiny_model_no_dropout_dir):
    model, clip, tokens, image_emb = build(tiny_model_no_dropout_dir, nonzero_lora=False)
    teacher = frozen_base_teacher(model, clip, image_emb, weight=5.0, temperature=None)
    loss_plain, plain = step(model, clip, tokens, image_emb)
    loss_distill, distill = step(model, clip, tokens, image_emb, teacher)
    assert abs(loss_distill - loss_plain) < 1e-6  # KL(teacher || student) = 0: the student is the teacher
    assert max_diff(plain, distill) < 1e-6  # and so is its gradient
    assert any(g.abs().max() > 1e-3 for g in plain.values())  # while the contrastive gradient is not zero


def test_teacher_differs_from_trained_student_and_never_changes(tiny_model_no_dropout_dir):
    model, clip, tokens, image_emb = build(tiny_model_no_dropout_dir, nonzero_lora=True)
    base_state = {k: v.clone() for k, v in clip.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    teacher = frozen_base_teacher(model, clip, image_emb, weight=1.0, temperature=None)
    scale0 = teacher.logit_scale.clone()
    t_emb = teacher.text_embeddings(encode_texts, tokens, RUNTIME.autocast)
    loss_plain, plain = step(model, clip, tokens, image_emb)
    loss_distill, distill = step(model, clip, tokens, image_emb, teacher)
    assert loss_distill > loss_plain + 1e-4  # non-zero LoRA: the student has moved off the teacher
    assert max_diff(plain, distill) > 1e-4
    opt = torch.optim.SGD(list(trainable(model).values()), lr=0.5)
    for _ in range(3):
        step(model, clip, tokens, image_emb, teacher)
        opt.step()
    with torch.no_grad():
        clip.logit_scale.add_(0.3)  # the student's temperature moves; the teacher's copy must not
    assert torch.equal(teacher.logit_scale, scale0)
    for k, v in clip.state_dict().items():
        if k in base_state:
            assert torch.equal(v, base_state[k]) or k.endswith("logit_scale"), k
    again = teacher.text_embeddings(encode_texts, tokens, RUNTIME.autocast)
    assert torch.equal(again, t_emb)  # the teacher's embeddings are those it started with
    assert not again.requires_grad


def test_weight_zero_is_no_distillation_exactly(tiny_model_no_dropout_dir):
    model, clip, tokens, image_emb = build(tiny_model_no_dropout_dir, nonzero_lora=True)
    teacher = frozen_base_teacher(model, clip, image_emb, weight=0.0, temperature=None)
    loss_plain, plain = step(model, clip, tokens, image_emb)
    loss_zero, zero = step(model, clip, tokens, image_emb, teacher)
    assert loss_zero == loss_plain
    assert max_diff(plain, zero) == 0.0


@pytest.mark.parametrize("packed", [True, False])
def test_grad_cached_equals_full_batch_with_distillation(tiny_model_no_dropout_dir, packed):
    model, clip, tokens, image_emb = build(tiny_model_no_dropout_dir, nonzero_lora=True)
    teacher = frozen_base_teacher(model, clip, image_emb, weight=2.0, temperature=None)
    loss_full, full = step(model, clip, tokens, image_emb, teacher, packed=packed)
    loss_plain, plain = step(model, clip, tokens, image_emb, packed=packed)
    assert max_diff(full, plain) > 1e-4  # the KL term's gradient is part of what is compared
    for chunk in (1, 3, 4):
        loss_chunked, chunked = step(model, clip, tokens, image_emb, teacher, chunk=chunk, packed=packed)
        assert abs(loss_chunked - loss_full) < 1e-5
        assert max_diff(full, chunked) < 1e-5, chunk


@pytest.mark.parametrize("override, message", [
    ("train.distill.weight=0", "train.distill.weight"),
    ("train.distill.weight=-1", "train.distill.weight"),
    ("train.distill.temperature=0", "train.distill.temperature"),
    ("train.distill.teacher=/no/such/model", "train.distill.teacher"),
    ("train.distill.wieght=1", "wieght"),
])
def test_recipe_refuses_bad_distill_keys(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(DEMO_RECIPE, [f"data.root={tmp_path}", "data.generate=demo", override])


def test_distill_is_off_by_default_and_on_with_one_key(tmp_path):
    assert load_recipe(DEMO_RECIPE, [f"data.root={tmp_path}", "data.generate=demo"]).train.distill is None
    on = load_recipe(DEMO_RECIPE, [f"data.root={tmp_path}", "data.generate=demo", "train.distill.weight=0.5"])
    assert on.train.distill.weight == 0.5 and on.train.distill.teacher is None


def test_finetune_runs_with_distillation_and_grad_cache(tiny_model_dir, tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    rc = finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, run_dir,
                                                          **{"train.distill.weight": 1.0, "train.grad_cache_chunk": 2,
                                                             "train.epochs": 1})])
    assert rc == 0
    losses = [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in ln]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_distillation_on_two_processes_equals_one_process(tiny_model_no_dropout_dir, tmp_path):
    """Loss and gradient of 2 gloo processes (each its half of the batch, columns gathered) equal one
    process's on the whole batch, plain and gradient-cached."""
    from test_distributed import make_step_inputs, torchrun

    make_step_inputs(tiny_model_no_dropout_dir, tmp_path)
    data = torch.load(tmp_path / "inputs.pt", weights_only=True)
    data["distill_weight"] = 2.0
    torch.save(data, tmp_path / "inputs.pt")
    model, base = lora_model_with_gradients(tiny_model_no_dropout_dir, 0.0, ["query", "value", "dense"])
    load_trainable(model, Path(data["trainable"]))
    model.train()
    teacher = frozen_base_teacher(model, base.clip, data["image_emb"], 2.0, None)
    params = trainable(model)
    loss = contrastive_step(base.clip, list(params.values()), data["tokens"], data["image_emb"], data["image_keys"],
                            data["text_keys"], RUNTIME, teacher=teacher, teacher_image_emb=data["image_emb"]).item()
    expected = {n: p.grad.clone() for n, p in params.items()}
    proc = torchrun("--step", str(tmp_path / "inputs.pt"), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=True)
        assert abs(result["distill0"]["loss"].item() - result["chunk0"]["loss"].item()) > 1e-4  # the KL term is there
        for mode in ("distill0", "distill2", "distillbank0", "distillbank2"):
            got = result[mode]
            assert abs(got["loss"].item() - loss) < 1e-5, (rank, mode)
            diff = max((got["grads"][n] - g).abs().max().item() for n, g in expected.items())
            assert diff < 1e-5, (rank, mode, diff)
        # With the banks, the teacher's text embeddings are the only floats gathered without gradient
        # (student and teacher image embeddings are read from the banks at the gathered keys).
        assert (result["distill0"]["float_gathers"], result["distillbank0"]["float_gathers"]) == (4, 1)


def test_full_text_tuning_teacher_is_a_frozen_copy_of_the_text_side(tiny_model_no_dropout_dir):
    from cnclip.models import attach_text_tuning, load_base_model
    from cnclip.recipe import ModelConfig

    cfg = ModelConfig(base=str(tiny_model_no_dropout_dir), text_tuning="full")
    base = load_base_model(cfg)
    model = attach_text_tuning(base.clip, cfg)
    teacher = frozen_base_teacher(model, base.clip, torch.zeros(1, 16), 1.0, None)
    assert teacher.clip.vision_model is base.clip.vision_model  # the locked image tower is shared, not copied
    assert teacher.clip.text_model is not base.clip.text_model
    assert not any(p.requires_grad for p in teacher.clip.text_model.parameters())
    tokens = tokenize(base.tokenizer, CAPTIONS, 16)
    before = teacher.text_embeddings(encode_texts, tokens, RUNTIME.autocast)
    with torch.no_grad():
        for p in base.clip.text_model.parameters():
            p.add_(0.1)  # a training step on the student's text tower
    assert torch.equal(teacher.text_embeddings(encode_texts, tokens, RUNTIME.autocast), before)
    assert not torch.allclose(encode_texts(base.clip, **tokens), before)


def cache_entries(run_dir):
    return sorted(p.name for p in (run_dir.parent / "cache").iterdir() if p.is_dir())


def test_a_teacher_with_another_image_tower_gets_its_own_cache_entry(tiny_model_dir, tiny_data_dir, tmp_path):
    from conftest import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=5)  # same vocabulary, other weights
    same_run, other_run = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for run_dir, teacher in ((same_run, tiny_model_dir), (other_run, other)):
        assert finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, run_dir, **{
            "train.distill.teacher": str(teacher), "train.epochs": 1, "eval.before_training": False})]) == 0
    assert len(cache_entries(same_run)) == 2  # train + valid: the teacher's image tower is the student's
    assert len(cache_entries(other_run)) == 3  # and the other teacher's embeddings of the training images
    assert set(cache_entries(same_run)) < set(cache_entries(other_run))


def test_a_teacher_with_another_vocabulary_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_model_dir, other)
    vocab = (other / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (other / "vocab.txt").write_text("\n".join(vocab[:5] + vocab[5:][::-1]) + "\n", encoding="utf-8")
    code = finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run", **{
        "train.distill.teacher": str(other), "train.epochs": 1})])
    assert code == ConfigError.exit_status
    assert "train.distill.teacher" in capsys.readouterr().err
