"""Pick the device and compute precision once, so every module agrees on them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


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
    """"auto" is CUDA when there is one; "auto"/"cuda" mean cuda:(LOCAL_RANK mod the GPUs this process
    sees): under torchrun each process drives its own GPU, whether it sees all of the node's GPUs
    (cuda:LOCAL_RANK) or, under a scheduler that sets CUDA_VISIBLE_DEVICES per process, only its own (cuda:0)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        return f"cuda:{local_rank % count if count else local_rank}"
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU `device` computes bf16 in hardware (Ampere and later, and every ROCm GPU): on a
    T4 or V100 torch emulates it, slowly, or (older torch) fails in autocast. (torch.cuda.is_bf16_supported
    asks the current device, which is not `device` before set_device.)"""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def pick_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """"auto" precision: bf16 autocast on a GPU with native bf16, fp32 elsewhere (said in the log).

    fp16 is never chosen: the contrastive loss is float32 anyway, and fp16 activations would need a
    gradient scaler for no gain over fp32 on the GPUs that lack bf16. "bf16" on a CPU is honoured
    (torch's CPU autocast supports it); on a GPU without native bf16 it is refused.
    """
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda":  # this process's GPU from now on: every later CUDA call (NCCL, RNG, kernels) uses it
        torch.cuda.set_device(dev)
    if dev.type == "cuda" and precision in ("auto", "bf16"):
        if not native_bf16(dev):
            name = torch.cuda.get_device_name(dev)
            if precision == "bf16":
                raise ConfigError(f"recipe key 'train.precision': bf16 was asked for, but {name} ({dev}) has no "
                                  "native bf16 (torch would emulate it, slowly); use fp32 or auto")
            log.info("%s has no native bf16: computing in fp32", name)
            precision = "fp32"
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    return Runtime(dev, torch.bfloat16 if precision == "bf16" else None)
