"""Random streams that do not depend on where a run resumed, and torch's deterministic mode.

Every optimizer step draws its dropout masks from a generator seeded by (recipe seed, rank, global
step) alone: the masks of step k on rank r are the same whether the run got there in one go or
resumed from any checkpoint, on any node, so resuming needs no saved random state to be exact.
(Data order is seeded per epoch in the trainer; validation and caching draw nothing.)

`train.deterministic: true` adds torch's deterministic algorithms: on CUDA the backward passes
of index_select / index_copy (the packed text tower) and the attention kernels otherwise use
atomics, whose order varies from run to run. It changes nothing on a CPU, which has none.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Iterator

import torch

log = logging.getLogger(__name__)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of (seed, rank, step): a hash, so nearby triples give unrelated streams."""
    digest = hashlib.blake2b(f"cnclip-step:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed the CPU generator and every CUDA device's for this rank's optimizer step `step`."""
    torch.manual_seed(step_seed(seed, rank, step))


@contextlib.contextmanager
def deterministic_algorithms(on: bool, device: torch.device) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the block (plus what CUDA needs for it: a fixed cuBLAS
    workspace, deterministic cuDNN); the previous setting is restored after it."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
    log.info("deterministic algorithms on (train.deterministic)")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def attention_kernels(deterministic: bool, device: torch.device):
    """Context for a training step: on CUDA in deterministic mode, SDPA's math kernel, whose backward
    uses no atomics (the flash and memory-efficient backward passes do); otherwise torch's choice."""
    if not (deterministic and device.type == "cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
