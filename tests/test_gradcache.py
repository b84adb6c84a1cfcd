"""Gradient caching gives the gradient of the whole batch, chunk size notwithstanding."""

import contextlib
import json

import pytest
import torch

from cnclip.data import tokenize
from cnclip.runtime import pick_runtime
from cnclip.finetune import main as finetune_main
from cnclip.gradcache import RandState, split_batch
from cnclip.loss import clip_loss
from cnclip.models import encode_texts
from cnclip.packed_text import encode_texts_packed
from cnclip.errors import ConfigError
from cnclip.recipe import load_recipe
from cnclip.train_step import contrastive_step

from conftest import DEMO_RECIPE, lora_model_with_gradients, tiny_overrides

CAPTIONS = ["一个红色的圆形", "左上角有一个蓝色的正方形", "猫", "高级感托特包斜挎", "一个红色的圆形",
            "白色连衣裙", "黑色男鞋", "手机壳上画着一只狗", "黄色的花朵照片", "右下角有一个绿色三角"]
RUNTIME = pick_runtime("cpu")


def build(model_dir, lora_dropout: float):
    model, base = lora_model_with_gradients(model_dir, lora_dropout, ["query", "key", "value", "dense"])
    tokens = tokenize(base.tokenizer, CAPTIONS, 16)
    gen = torch.Generator().manual_seed(3)
    batch = {
        "tokens": tokens,
        "image_emb": torch.randn(len(CAPTIONS), 16, generator=gen),
        "image_keys": torch.tensor([0, 1, 2, 3, 4, 5, 1, 7, 8, 9]),  # entries 1 and 6 share an image
        "text_keys": torch.tensor([0, 1, 2, 3, 0, 5, 6, 7, 8, 9]),  # entries 0 and 4: same caption
    }
    return base.clip, model, batch


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def step_grads(clip, model, batch, chunk: int, seed: int = 7, packed: bool = True):
    params = trainable(model)
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    loss = contrastive_step(clip, list(params.values()), batch["tokens"], batch["image_emb"], batch["image_keys"],
                            batch["text_keys"], RUNTIME, grad_cache_chunk=chunk, packed=packed)
    return loss.item(), {n: p.grad.clone() for n, p in params.items()}


def graph_kept_chunks(clip, model, batch, chunk: int, seed: int = 7, packed: bool = True):
    """The reference: every chunk forward with its graph kept, one loss, one backward."""
    encode = encode_texts_packed if packed else encode_texts
    params = trainable(model)
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    emb = torch.cat([encode(clip, **c) for c in split_batch(batch["tokens"], chunk)])
    loss = clip_loss(batch["image_emb"], emb, clip.logit_scale, batch["image_keys"], batch["text_keys"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in params.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_chunked_gradient_equals_full_batch_gradient(tiny_model_dir):
    clip, model, batch = build(tiny_model_dir, lora_dropout=0.0)
    model.eval()  # no dropout: one full-batch pass is the exact reference
    loss_full, full = step_grads(clip, model, batch, chunk=0)
    assert any("lora_A" in n for n in full) and any("text_projection" in n for n in full)
    assert any("logit_scale" in n for n in full)
    assert all(g.abs().max() > 0 for g in full.values())  # every trainable parameter gets a gradient
    for chunk in (1, 3, 4):  # 4 leaves a short last chunk
        loss_chunked, chunked = step_grads(clip, model, batch, chunk=chunk)
        assert abs(loss_chunked - loss_full) < 1e-5
        assert max_diff(chunked, full) < 1e-5, chunk


def relative_diff(a: dict, b: dict) -> float:
    """max |a - b| over each tensor's largest |b| entry, worst tensor."""
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def test_chunked_gradient_under_bf16_autocast_is_within_the_stated_bound(tiny_model_dir, monkeypatch):
    """bf16 autocast (CPU): the loss is the full batch's exactly, and the gradient differs from the
    full-batch bf16 gradient only by rounding each chunk's parameter gradient to bf16 before the
    sum: under 2**-6 of the largest entry, and less than bf16 itself differs from fp32."""
    import test_gradcache

    clip, model, batch = build(tiny_model_dir, lora_dropout=0.0)
    model.eval()
    _, fp32 = step_grads(clip, model, batch, chunk=0)
    monkeypatch.setattr(test_gradcache, "RUNTIME", pick_runtime("cpu", "bf16"))
    loss_full, full = step_grads(clip, model, batch, chunk=0)
    bf16_vs_fp32 = relative_diff(full, fp32)
    assert bf16_vs_fp32 > 1e-3  # autocast is really on
    for chunk in (1, 3, 4):
        loss_chunked, chunked = step_grads(clip, model, batch, chunk=chunk)
        assert loss_chunked == loss_full  # the loss runs on the same float32 embeddings
        assert relative_diff(chunked, full) < min(2 ** -6, bf16_vs_fp32), chunk


@pytest.mark.parametrize("packed", [True, False])
def test_dropout_masks_are_replayed_in_the_second_pass(tiny_model_dir, monkeypatch, packed):
    clip, model, batch = build(tiny_model_dir, lora_dropout=0.1)  # and the tower's own dropout 0.1
    loss_ref, ref = graph_kept_chunks(clip, model, batch, chunk=3, packed=packed)
    state_after_ref = torch.get_rng_state()
    loss_gc, gc = step_grads(clip, model, batch, chunk=3, packed=packed)
    assert abs(loss_gc - loss_ref) < 1e-5
    assert max_diff(gc, ref) < 1e-5
    # The generator ends where the first pass left it: the run stays deterministic afterwards.
    assert torch.equal(torch.get_rng_state(), state_after_ref)

    # Dropout is really on (another seed, other masks, another gradient) ...
    assert max_diff(step_grads(clip, model, batch, chunk=3, seed=8, packed=packed)[1], ref) > 1e-3
    # ... and without replaying the random state the re-run draws other masks: a wrong gradient.
    monkeypatch.setattr(RandState, "replay", lambda self: contextlib.nullcontext())
    assert max_diff(step_grads(clip, model, batch, chunk=3, packed=packed)[1], ref) > 1e-3


def test_finetune_with_grad_cache_trains_like_without(tiny_model_no_dropout_dir, tiny_data_dir, tmp_path):
    def run(name: str, chunk: int):
        run_dir = tmp_path / name
        overrides = tiny_overrides(tiny_model_no_dropout_dir, tiny_data_dir, run_dir, **{
            "model.lora_dropout": 0.0, "train.grad_cache_chunk": chunk, "train.epochs": 1,
            "eval.before_training": False, "data.num_workers": 0})
        assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0
        return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(ln)]

    plain, cached = run("plain", 0), run("cached", 3)
    assert len(plain) == len(cached) == 17 // 4
    assert max(abs(a - b) for a, b in zip(plain, cached)) < 1e-5


def test_grad_cache_chunk_is_validated():
    with pytest.raises(ConfigError, match="train.grad_cache_chunk"):
        load_recipe(DEMO_RECIPE, ["train.grad_cache_chunk=-1"], check_data=False)


@pytest.mark.compile
def test_compiled_replay_reproduces_the_first_pass(tiny_model_dir):
    """train.compile with gradient caching: the first pass runs torch.compile's inference graph (no
    grad), the re-run its training graph, two separately compiled programs whose dropout draws from
    the same restored generator state. Measured here: the gradient equals that of the chunks run with
    their graphs kept (the exact reference), dropout on, chunks of unequal size (4, 4, 2) included.
    Opt-in (-m compile): inductor compiles both graphs in C++, minutes on a CPU."""
    from cnclip.train_step import prepare_text_tower

    clip, model, batch = build(tiny_model_dir, lora_dropout=0.1)  # and the tower's own dropout 0.1
    prepare_text_tower(clip, compile=True)
    _, ref = graph_kept_chunks(clip, model, batch, chunk=4, packed=False)
    _, gc = step_grads(clip, model, batch, chunk=4, packed=False)
    print(f"compiled replay: relative difference {relative_diff(gc, ref):.3g}")
    assert relative_diff(gc, ref) < 1e-6
    assert relative_diff(graph_kept_chunks(clip, model, batch, chunk=4, seed=8, packed=False)[1], ref) > 1e-3
