"""The packed text path (no work on padding) computes what ChineseCLIPTextModel computes."""

import functools

import pytest
import torch

from cnclip.data import tokenize
from cnclip.models import attach_lora, encode_texts, load_base_model, lock_image_tower
from cnclip import packed_text
from cnclip.packed_text import encode_texts_packed
from cnclip.recipe import ModelConfig, load_recipe
from cnclip.train_step import prepare_text_tower

from conftest import DEMO_RECIPE

# Lengths 3..16 tokens after [CLS]/[SEP]: a batch mostly padding.
CAPTIONS = ["猫", "一个红色的圆形", "左上角有一个蓝色的正方形在图片中", "高级感托特包斜挎", "白色连衣裙"]


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    cfg = ModelConfig(base=str(tiny_model_dir), lora_dropout=0.1, target_modules=["query", "key", "value", "dense"])
    base = load_base_model(cfg)
    torch.manual_seed(0)
    model = attach_lora(base.clip, cfg)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    lock_image_tower(base.clip)
    tokens = tokenize(base.tokenizer, CAPTIONS, 20)
    length = int(tokens["attention_mask"].sum(1).max())
    return base.clip, model, {k: v[:, :length] for k, v in tokens.items()}


def embed_and_grads(clip, model, tokens, encode):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    emb = encode(clip, **tokens)
    weights = torch.linspace(-1, 1, emb.numel()).view_as(emb)
    (emb * weights).sum().backward()
    return emb.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def assert_close(a: dict, b: dict, tol: float = 1e-5):
    assert a.keys() == b.keys() and a
    for k in a:
        scale = max(1.0, b[k].abs().max().item())
        assert (a[k] - b[k]).abs().max().item() / scale < tol, k


@pytest.mark.parametrize("fused", [False, True], ids=["padded-attention", "fused-varlen-attention"])
def test_packed_embeddings_and_gradients_equal_the_model_forward(lora_model, fused):
    """Both attention paths of the packed tower (the padded one, a CPU's default, and the nested
    variable-length one, CUDA's: here through torch's math kernel) against the model's forward."""
    clip, model, tokens = lora_model
    assert tokens["attention_mask"].float().mean() < 0.7  # the batch really has padding to skip
    model.eval()  # dropout off: both paths are then the same function
    encode_texts_packed = functools.partial(packed_text.encode_texts_packed, fused=fused)
    plain_emb, plain = embed_and_grads(clip, model, tokens, encode_texts)
    packed_emb, packed = embed_and_grads(clip, model, tokens, encode_texts_packed)
    assert (plain_emb - packed_emb).abs().max() < 1e-5
    assert any("lora_A" in k for k in plain) and any("text_projection" in k for k in plain)
    assert_close(packed, plain)
    # Each caption's embedding does not depend on how much padding the batch carries.
    alone = encode_texts_packed(clip, **{k: v[1:2, :9] for k, v in tokens.items()})
    assert (alone - packed_emb[1:2]).abs().max() < 1e-5
    # A batch without padding (the reshape-only layout) agrees as well.
    dense = {k: v[:, :3] for k, v in tokens.items()}
    assert bool(dense["attention_mask"].all())
    dense_emb, dense_grads = embed_and_grads(clip, model, dense, encode_texts_packed)
    plain_dense_emb, plain_dense = embed_and_grads(clip, model, dense, encode_texts)
    assert (dense_emb - plain_dense_emb).abs().max() < 1e-5
    assert_close(dense_grads, plain_dense)
    model.train()


@pytest.mark.parametrize("fused", [False, True], ids=["padded-attention", "fused-varlen-attention"])
def test_packed_path_honours_gradient_checkpointing(tiny_model_dir, fused):
    encode_texts_packed = functools.partial(packed_text.encode_texts_packed, fused=fused)
    cfg = ModelConfig(base=str(tiny_model_dir), lora_dropout=0.1)
    base = load_base_model(cfg)
    torch.manual_seed(0)
    model = attach_lora(base.clip, cfg)
    model.train()
    tokens = tokenize(base.tokenizer, CAPTIONS, 20)
    torch.manual_seed(1)
    _, plain = embed_and_grads(base.clip, model, tokens, encode_texts_packed)
    prepare_text_tower(base.clip, gradient_checkpointing=True)
    assert all(layer.gradient_checkpointing for layer in base.clip.text_model.encoder.layer)
    torch.manual_seed(1)  # dropout on: the recomputation must replay the same masks
    _, checkpointed = embed_and_grads(base.clip, model, tokens, encode_texts_packed)
    assert_close(checkpointed, plain)


def test_left_padded_input_falls_back_to_the_model_forward(lora_model):
    clip, model, tokens = lora_model
    model.eval()
    flipped = {k: v.flip(1) for k, v in tokens.items()}  # padding first: [CLS] not at position 0
    assert torch.equal(encode_texts_packed(clip, **flipped), encode_texts(clip, **flipped))
    model.train()


def test_packed_text_is_a_recipe_switch():
    assert load_recipe(DEMO_RECIPE, check_data=False).train.packed_text is True
    assert load_recipe(DEMO_RECIPE, ["train.packed_text=false"], check_data=False).train.packed_text is False


def test_text_tower_uses_sdpa_attention(tiny_model_dir):
    base = load_base_model(ModelConfig(base=str(tiny_model_dir)))
    assert base.clip.text_model.config._attn_implementation == "sdpa"


def test_fused_attention_is_cudas_default_unless_deterministic(monkeypatch):
    assert not packed_text.fused_attention_default(torch.device("cpu"))
    assert packed_text.fused_attention_default(torch.device("cuda:0"))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not packed_text.fused_attention_default(torch.device("cuda:0"))


def test_fused_path_attends_with_nested_tensors_and_no_mask(lora_model, monkeypatch):
    """The fused path hands scaled_dot_product_attention nested (jagged) tensors and no mask, the
    inputs torch's variable-length flash / memory-efficient kernels take."""
    clip, model, tokens = lora_model
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((query.is_nested, key.is_nested, attn_mask is None))
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(packed_text.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        encode_texts_packed(clip, **tokens, fused=True)
    assert seen and all(s == (True, True, True) for s in seen)
    seen.clear()
    with torch.no_grad():
        encode_texts_packed(clip, **tokens)  # a CPU's default: the padded path, under the padding mask
    assert seen and all(s == (False, False, False) for s in seen)
