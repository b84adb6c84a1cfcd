"""Pick the device and compute precision once, so every module agrees on them.

Precision "auto": bf16 autocast on a GPU that computes bf16 in hardware (Ampere and later), fp16
autocast with a loss scaler on one that does not (T4, V100: their tensor cores run fp16), fp32 on a
CPU. On CUDA the build is checked against the GPU first (`cuda_build_runs_on`): a torch without
kernels for the card stops with a message instead of failing at the first kernel launch.

TF32: training on CUDA computes float32 matrix products in TF32 (`float32_matmuls`) unless
`train.deterministic` is set; under bf16/fp16 autocast these are the contrastive loss's products,
which run in float32 outside autocast, and under fp32 the whole text tower's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .errors import ConfigError, UsageError

log = logging.getLogger(__name__)

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = plain fp32

    @property
    def precision(self) -> str:
        return next(name for name, dtype in AUTOCAST_DTYPES.items() if dtype == self.autocast_dtype)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaler (small gradients would flush to zero in fp16's range without it); at the
        other precisions a disabled scaler, whose scale/unscale_/update are pass-throughs."""
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)


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


def choose_precision(dev: torch.device, precision: str,
                     has_native_bf16: Callable[[torch.device], bool] | None = None) -> str:
    """The precision a run computes in: "auto" is bf16 on a GPU with native bf16, fp16 (with a loss
    scaler) on a GPU without, fp32 on a CPU (said in the log). An explicit choice is honoured, on a
    CPU too (torch's CPU autocast has bf16 and fp16), except bf16 on a GPU without native bf16."""
    if dev.type != "cuda":
        return "fp32" if precision == "auto" else precision
    if precision in ("auto", "bf16") and not (has_native_bf16 or native_bf16)(dev):
        name = torch.cuda.get_device_name(dev)
        if precision == "bf16":
            raise ConfigError(f"recipe key 'train.precision': bf16 was asked for, but {name} ({dev}) has no "
                              "native bf16 (torch would emulate it, slowly); use fp16, fp32 or auto")
        log.info("%s has no native bf16: fp16 autocast with a loss scaler", name)
        return "fp16"
    return "bf16" if precision == "auto" else precision


_ARCH = re.compile(r"(sm|compute)_(\d+)([af]?)")


def cuda_build_runs_on(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """Whether a torch build compiled for `arch_list` (torch.cuda.get_arch_list()) has kernels a GPU of
    compute `capability` can run: machine code sm_XY runs on the same major version from minor Y up
    (sm_XYa only on X.Y itself); PTX compute_XY is compiled by the driver for X.Y and every later GPU."""
    device = capability[0] * 10 + capability[1]
    for arch in arch_list:
        match = _ARCH.fullmatch(arch)
        if match is None:
            continue
        code, specific = int(match[2]), match[3] == "a"
        if match[1] == "compute":
            runs = device == code if specific else device >= code
        else:
            runs = device == code if specific else (device // 10 == code // 10 and device >= code)
        if runs:
            return True
    return False


def check_cuda_build(dev: torch.device) -> None:
    """Stop, naming the GPU and the build's architectures, when this torch has no kernels for `dev`."""
    arch_list = torch.cuda.get_arch_list()
    if torch.version.cuda is None or not arch_list:  # a ROCm or CPU build: nothing to compare
        return
    capability = torch.cuda.get_device_capability(dev)
    if not cuda_build_runs_on(arch_list, capability):
        raise UsageError(
            f"{torch.cuda.get_device_name(dev)} ({dev}) has compute capability {capability[0]}.{capability[1]}, "
            f"but this torch build ({torch.__version__}, CUDA {torch.version.cuda}) has kernels only for "
            f"{' '.join(arch_list)}; install a torch build made for this GPU, or use device cpu")


def pick_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """The device and precision of a run (`choose_precision`); on CUDA after `check_cuda_build`."""
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda":  # this process's GPU from now on: every later CUDA call (NCCL, RNG, kernels) uses it
        torch.cuda.set_device(dev)
        check_cuda_build(dev)
    return Runtime(dev, AUTOCAST_DTYPES[choose_precision(dev, precision)])


def tf32_allowed(device: torch.device, deterministic: bool) -> bool:
    """TF32 float32 matmuls: on CUDA (10 bits of mantissa in the products, float32 accumulation),
    unless the run asked for deterministic algorithms. Whatever the precision: under autocast the
    float32 products left are the loss's, under fp32 they are all of them."""
    return device.type == "cuda" and not deterministic


@contextlib.contextmanager
def float32_matmuls(device: torch.device, deterministic: bool) -> Iterator[bool]:
    """cuBLAS float32 matmuls in TF32 inside when `tf32_allowed`; the caller's setting is put back
    after. Yields whether TF32 is on. (cuDNN convolutions use TF32 by torch's default already.)"""
    if not tf32_allowed(device, deterministic):
        yield False
        return
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")  # torch >= 2.9; reading the legacy flag after it raises
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    log.info("TF32 float32 matmuls on %s (train.deterministic turns them off)", device)
    try:
        yield True
    finally:
        if new_api:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before
