"""Symmetric InfoNCE for CLIP, with false negatives masked out.

In MUGE one text has several images and an image can belong to several texts, and crawled data
repeats captions. When two batch entries share an image or have the same text, pushing them apart
would punish the model for being right; those off-diagonal logits are masked out of both
softmaxes, so each is neither a positive nor a negative for the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def false_negative_mask(image_keys: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """True where entry j is a false negative for entry i (same image or same text, j != i)."""
    same = (image_keys[:, None] == image_keys[None, :]) | (text_keys[:, None] == text_keys[None, :])
    same.fill_diagonal_(False)
    return same


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    image_keys: torch.Tensor | None = None,
    text_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the batch, in float32.

    `logit_scale` is the log-parametrised temperature (the model's `logit_scale`); entry i of the
    image and text batches is a positive pair. Keys identify images / texts for masking.
    """
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.float().exp() * image_emb @ text_emb.t()
    if image_keys is not None and text_keys is not None:
        logits = logits.masked_fill(false_negative_mask(image_keys, text_keys), float("-inf"))
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
