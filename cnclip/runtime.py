"""Pick the device and compute precision once, so every module agrees on them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = plain fp32

    @property
    def precision(self) -> str:
        return "fp32" if self.autocast_dtype is None else "bf16"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


def resolve_device(device: str = "auto") -> str:
    """"auto" is CUDA when there is one; under torchrun "auto"/"cuda" mean this process's cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def pick_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    dev = torch.device(resolve_device(device))
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else None)
