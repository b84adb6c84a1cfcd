"""One optimisation step's forward and backward: text embeddings -> contrastive loss -> gradients.

The same function runs a single process, every rank of a torchrun job, and the throughput
benchmark. The image side is the cached embeddings; only the text tower runs, on the captions'
real tokens only (cnclip.packed_text). With `grad_cache_chunk` > 0 the batch goes through the
text tower in chunks (cnclip.gradcache), so the batch size is bounded by the embeddings' memory,
not the activations'. Under torch.distributed
each rank passes its slice of the global batch; the loss sees the global batch
(loss.distributed_clip_loss) and gradients are averaged over ranks, so every rank ends the step
with the gradient a single process would compute on the whole global batch.

With a distillation teacher (cnclip.distill) the loss adds weight x KL(teacher || student) over the
in-batch similarity distributions (loss.distillation_loss). The teacher's text embeddings cost one
forward without a graph (chunked like the student's under gradient caching) and are constants of
the loss, so the cached-gradient path carries the KL term's gradient like the contrastive one's.
"""

from __future__ import annotations

from typing import Iterable

import torch

from . import distributed
from .runtime import Runtime
from .gradcache import cached_backward
from .distill import Teacher
from .loss import distillation_loss, distributed_clip_loss
from .models import encode_texts
from .packed_text import encode_texts_packed


class TextEncoder(torch.nn.Module):
    """The student's text side (tower and projection) as one module whose forward embeds a batch:
    what DDP wraps for full text tuning (distributed.data_parallel), since DDP's gradient hooks act
    only on a forward that goes through it. The rest of the model (image tower, logit scale) is not
    part of it: the logit scale's gradient comes from the loss, outside this forward."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.text_model, self.text_projection = clip.text_model, clip.text_projection
        self._encode = {False: lambda **batch: encode_texts(clip, **batch),
                        True: lambda **batch: encode_texts_packed(clip, **batch)}  # not a submodule

    def forward(self, batch: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
        return self._encode[packed](**batch)


def contrastive_step(
    clip: torch.nn.Module,
    params: Iterable[torch.nn.Parameter],
    tokens: dict[str, torch.Tensor],
    image_emb: torch.Tensor,
    image_keys: torch.Tensor | None,
    text_keys: torch.Tensor | None,
    runtime: Runtime,
    grad_cache_chunk: int = 0,
    packed: bool = True,
    teacher: Teacher | None = None,
    teacher_image_emb: torch.Tensor | None = None,
    text_encoder: torch.nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    image_bank: torch.Tensor | None = None,
    loss_chunk: int = 0,
) -> torch.Tensor:
    """Accumulate the global-batch loss gradient into `params`' .grad; return the global loss (detached).

    Call with zeroed gradients; `params` are the trainable parameters (averaged over ranks here).
    `packed` runs the text tower on real tokens only (cnclip.packed_text); off, it runs the
    model's own forward (needed for a torch.compile'd text tower).
    `teacher` (with `teacher_image_emb`, its embeddings of this batch's images) adds its distillation
    term to the loss; the returned loss is then the sum.
    `text_encoder`: the student's TextEncoder under DDP (full text tuning on several processes): the
    text side runs through it and DDP averages its gradients in buckets during backward; the other
    `params` are averaged here.
    `scaler` (fp16, Runtime.grad_scaler): the backward runs on the scaled loss, so the gradients are
    left scaled for the caller to unscale_; the returned loss is unscaled.
    `image_bank`: the image embeddings every rank holds whole, `image_keys` being its rows (and
    `image_emb` the bank at them): under torch.distributed the global batch's image side is then read
    from the bank at the gathered keys instead of being all-gathered (the teacher's bank likewise).
    `loss_chunk`: rows per block of the loss (cnclip.loss; 0 = one block), the same value either way.
    """
    encode = encode_texts_packed if packed else encode_texts

    def embed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with runtime.autocast():
            return encode(clip, **batch) if text_encoder is None else text_encoder(batch, packed)

    n = tokens["input_ids"].shape[0]
    teacher_text_emb = (teacher.text_embeddings(encode, tokens, runtime.autocast, grad_cache_chunk)
                        if teacher is not None else None)

    def loss_of(text_emb: torch.Tensor) -> torch.Tensor:
        loss = distributed_clip_loss(image_emb, text_emb, clip.logit_scale, image_keys, text_keys, image_bank,
                                     loss_chunk)
        if teacher is None:
            return loss
        return loss + teacher.weight * distillation_loss(
            image_emb, text_emb, clip.logit_scale, teacher_image_emb, teacher_text_emb, teacher.logit_scale,
            teacher.temperature, image_keys, image_bank, None if image_bank is None else teacher.image_bank,
            loss_chunk)

    scale = scaler.scale if scaler is not None else None
    if 0 < grad_cache_chunk < n:
        loss = cached_backward(embed, tokens, loss_of, grad_cache_chunk, scale=scale,
                               no_sync=None if text_encoder is None else text_encoder.no_sync)
    else:
        loss = loss_of(embed(tokens))
        (loss if scale is None else scale(loss)).backward()
    synced = set() if text_encoder is None else {id(p) for p in text_encoder.parameters()}
    distributed.average_gradients([p for p in params if id(p) not in synced])
    return distributed.mean_over_ranks(loss.detach())


def prepare_text_tower(clip: torch.nn.Module, gradient_checkpointing: bool = False, compile: bool = False) -> None:
    """Memory / speed options of the trained tower (recipe keys train.gradient_checkpointing, train.compile).

    Non-reentrant checkpointing works with a frozen embedding layer (LoRA) and keeps dropout's
    random state, so it composes with gradient caching (and the packed path honours it).
    `Module.compile()` compiles the tower's own forward in place (parameter names, and so
    checkpoints, stay the same); the step then uses that forward instead of the packed path.
    """
    if gradient_checkpointing:
        enable_activation_checkpointing(clip.text_model, {"use_reentrant": False})
    if compile:
        clip.text_model.compile()


def enable_activation_checkpointing(model: torch.nn.Module, checkpoint_kwargs: dict) -> None:
    """transformers' activation checkpointing on `model`, under either name: `activation_checkpointing_enable`
    (so named in transformers 5.25, where `gradient_checkpointing_enable` is a deprecated alias that warns) or
    `gradient_checkpointing_enable` (transformers 5.17 has only that one). Both set each layer's
    `gradient_checkpointing` flag, which the packed path reads."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
