"""Pick the device and compute precision once, so every module agrees on them."""

from __future__ import annotations

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


def pick_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else None)
