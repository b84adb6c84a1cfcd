"""Optimizer and learning-rate schedule of a fine-tuning run (shared by training and the benchmarks)."""

from __future__ import annotations

import math

import torch

from .recipe import Recipe
from .runtime import Runtime


def warmup_cosine(warmup: int, total: int):
    """Linear warm-up to the peak learning rate, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model, recipe: Recipe, runtime: Runtime) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # No weight decay on the temperature, biases and norms (CLIP's convention).
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.train.lr, fused=runtime.device.type == "cuda")
