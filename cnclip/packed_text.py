"""Text embeddings without computing padding: the training path's text tower.

Captions are short and uneven (MUGE queries: a handful to a few dozen characters), so a batch padded
to its longest caption spends a third or more of the text tower's matrix products on padding
tokens, whose outputs nobody reads. Here the token-wise work (Q/K/V/O projections, feed-forward,
LayerNorm, dropout) runs on the real tokens only, packed into one (tokens, hidden) matrix. And
because the embedding is the last layer's [CLS] state, the last layer computes keys and values for
every token but everything else for the [CLS] rows alone.

The attention itself has two implementations of the same function (`_Layout.fused` picks):
* fused, the default on CUDA: the packed matrix is viewed as a nested (jagged) tensor with one
  sequence per caption, and scaled_dot_product_attention runs torch's variable-length kernels
  (flash attention under bf16/fp16, memory-efficient attention under fp32) on the real tokens, with
  no mask and no padding copies;
* padded, the default on a CPU and under torch's deterministic algorithms (the fused kernels'
  backward passes use atomics): queries, keys and values are scattered into a (batch, heads,
  length, dim) grid and attention runs under the key-padding mask (a boolean mask rules out flash).
Both equal ChineseCLIPTextModel's forward up to float rounding (tests/test_packed_text.py, on a CPU
where torch runs the nested path with its math kernel).

The modules called are the model's own (LoRA-wrapped by peft where targeted), so weights, LoRA and
dropout rates are shared with ChineseCLIPTextModel; `encode_texts_packed` equals
`models.encode_texts` up to float rounding (dropout draws differ: masks are drawn per real token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .models import encode_texts


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def fused_attention_default(device: torch.device) -> bool:
    """The variable-length kernels on CUDA, unless torch's deterministic algorithms are on; the padded
    path elsewhere (on a CPU the nested path only adds work around the same math kernel)."""
    return device.type == "cuda" and not torch.are_deterministic_algorithms_enabled()


class _Layout:
    """Where the real tokens sit in the padded (batch, length) grid.

    Built from the host's copy of the mask when there is one (`host_mask`, the same values): the
    index arithmetic (nonzero, sums, the longest and shortest caption) then needs no device-to-host
    synchronisation on a GPU. `fused`: attention through the variable-length kernels (None: the
    device's default, `fused_attention_default`).
    """

    def __init__(self, attention_mask: torch.Tensor, host_mask: torch.Tensor | None = None,
                 fused: bool | None = None):
        self.batch, self.length = attention_mask.shape
        device = attention_mask.device
        keep = (attention_mask if host_mask is None else host_mask).bool()
        flat = keep.reshape(-1).nonzero().squeeze(1)  # packed row -> position in batch*length
        lengths = keep.sum(1)
        # No padding at all (every caption as long as the longest): packing is a reshape, and the
        # scatter/gather copies (and the memory autograd keeps for them) are skipped.
        self.dense = flat.numel() == self.batch * self.length
        self.flat = _to_device(flat, device)
        self.cls_rows = _to_device(torch.cumsum(lengths, 0) - lengths, device)  # [CLS] rows
        self.key_mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, length): True = attend
        self.fused = fused_attention_default(device) if fused is None else fused
        if self.fused:  # each caption's span of packed rows, for the nested views
            self.offsets = _to_device(torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]), device)
            self.cls_offsets = torch.arange(self.batch + 1, device=device)  # one [CLS] row per caption
            self.min_len, self.max_len = int(lengths.min()), int(lengths.max())

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """(batch*length, hidden) -> (tokens, hidden)."""
        return grid if self.dense else grid.index_select(0, self.flat)

    def pad(self, packed: torch.Tensor, heads: int) -> torch.Tensor:
        """(tokens, hidden) -> (batch, heads, length, head_dim), zeros at padding."""
        hidden = packed.shape[-1]
        grid = packed if self.dense else packed.new_zeros(self.batch * self.length, hidden).index_copy(
            0, self.flat, packed)
        return grid.view(self.batch, self.length, heads, hidden // heads).transpose(1, 2)

    def nested(self, packed: torch.Tensor, heads: int, cls_only: bool = False) -> torch.Tensor:
        """(tokens, hidden) -> nested (batch, heads, each caption's length, head_dim), a view; with
        `cls_only`, (batch, hidden) [CLS] rows -> (batch, heads, 1, head_dim)."""
        offsets, shortest, longest = ((self.cls_offsets, 1, 1) if cls_only
                                      else (self.offsets, self.min_len, self.max_len))
        return torch.nested.nested_tensor_from_jagged(
            packed.unflatten(-1, (heads, -1)), offsets, min_seqlen=shortest, max_seqlen=longest).transpose(1, 2)


def _attention(self_attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               layout: _Layout, cls_only: bool = False) -> torch.Tensor:
    """Each caption's queries attend to its own keys and values; all three are packed (tokens, hidden),
    or with `cls_only` the queries are the [CLS] rows (batch, hidden). Returns the contexts, packed
    like the queries."""
    heads = self_attn.num_attention_heads
    kwargs = {"dropout_p": self_attn.attention_dropout if self_attn.training else 0.0, "scale": self_attn.scaling}
    if layout.fused:
        context = F.scaled_dot_product_attention(layout.nested(query, heads, cls_only), layout.nested(key, heads),
                                                 layout.nested(value, heads), **kwargs)
        return context.transpose(1, 2).values().flatten(1)
    grid = query.view(layout.batch, 1, heads, -1).transpose(1, 2) if cls_only else layout.pad(query, heads)
    context = F.scaled_dot_product_attention(grid, layout.pad(key, heads), layout.pad(value, heads),
                                             attn_mask=layout.key_mask, **kwargs)
    context = context.transpose(1, 2).flatten(2).flatten(0, 1)  # (batch * query length, hidden)
    return context if cls_only else layout.pack(context)


def _layer(layer: nn.Module, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """One ChineseCLIPTextLayer on packed tokens (tokens, hidden)."""
    sa = layer.attention.self
    context = _attention(sa, sa.query(x), sa.key(x), sa.value(x), layout)
    x = layer.attention.output(context, x)  # dense, dropout, LayerNorm(. + residual)
    return layer.output(layer.intermediate(x), x)


def _last_layer_cls(layer: nn.Module, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """The last layer, for the [CLS] rows only (keys and values still come from every token)."""
    sa = layer.attention.self
    cls = x.index_select(0, layout.cls_rows)  # (batch, hidden)
    context = _attention(sa, sa.query(cls), sa.key(x), sa.value(x), layout, cls_only=True)
    h = layer.attention.output(context, cls)
    return layer.output(layer.intermediate(h), h)


def supports_packing(clip: nn.Module) -> bool:
    """The packed path mirrors ChineseCLIPTextModel's BERT layers as transformers 5 writes them
    (attention modules with `attention_dropout` and `scaling`); anything else uses the plain path."""
    text = getattr(clip, "text_model", None)
    layers = getattr(getattr(text, "encoder", None), "layer", None)
    if layers is None or len(layers) == 0 or not hasattr(layers[0], "attention"):
        return False
    self_attn = getattr(layers[0].attention, "self", None)
    return (getattr(layers[0], "chunk_size_feed_forward", 0) == 0
            and all(hasattr(self_attn, a) for a in ("attention_dropout", "scaling", "num_attention_heads")))


def encode_texts_packed(clip: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        token_type_ids: torch.Tensor | None = None,
                        host_attention_mask: torch.Tensor | None = None, fused: bool | None = None) -> torch.Tensor:
    """Projected text embeddings, as models.encode_texts computes them, without padding work.

    `host_attention_mask`: the CPU copy of `attention_mask` (the trainer has it before the copy to
    the GPU): with it, no step of the layout waits for the device. `fused`: attention through the
    variable-length kernels (None: on CUDA unless deterministic algorithms are on; see the module).
    Honours the text tower's gradient checkpointing (train_step.enable_activation_checkpointing).
    Falls back to the plain path when a caption does not start at position 0 (left padding).
    """
    host = attention_mask if host_attention_mask is None else host_attention_mask
    if not bool(host[:, 0].all()) or not supports_packing(clip):
        return encode_texts(clip, input_ids, attention_mask, token_type_ids)
    text = clip.text_model
    layout = _Layout(attention_mask, host_attention_mask, fused)
    embedded = text.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # LayerNorm + dropout
    x = layout.pack(embedded.reshape(layout.batch * layout.length, -1))
    layers = text.encoder.layer
    for i, layer in enumerate(layers):
        fn = _last_layer_cls if i == len(layers) - 1 else _layer
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            # The determinism check records every saved tensor's shape, which the nested tensors of
            # torch's math fallback for the fused path do not have.
            x = checkpoint(fn, layer, x, layout, use_reentrant=False,
                           determinism_check="none" if layout.fused else "default")
        else:
            x = fn(layer, x, layout)
    return clip.text_projection(x)
