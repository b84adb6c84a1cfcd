"""Process-wide numeric settings changed for one computation and restored after it.

torch's float32 matmul precision (TF32 on NVIDIA GPUs, bf16 passes under "medium"), torch's
intra-op thread count and faiss' OpenMP thread count are process globals. A library call that needs a particular value (exact
fp32 so scores match between CPU and GPU; one faiss thread so an HNSW graph is built in the same
order every run) sets it inside one of these context managers, which put back exactly what the
caller had, also when the computation raises.

torch >= 2.9 has two APIs for the precision (`torch.set_float32_matmul_precision` / `allow_tf32`,
and the per-backend `fp32_precision`), and reading the legacy one raises once a program has
mixed them. `exact_float32` therefore sets and restores both, and leaves the legacy one alone
when it cannot be read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls and cuDNN convolutions/RNNs in IEEE float32 (no TF32, no bf16 passes) inside."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller mixed the legacy and the new API: its legacy value cannot be read
        legacy = None
    saved = (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    try:
        if legacy is not None:
            torch.set_float32_matmul_precision("highest")  # also the CPU (oneDNN) matmuls' setting
        matmul.fp32_precision = cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside. One thread for small products on a small, busy
    CPU: two BLAS threads then fight for the cores and spin while they wait (several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def faiss_threads(n: int, faiss: Any = None) -> Iterator[Any]:
    """faiss' OpenMP thread count set to `n` inside; yields the faiss module."""
    if faiss is None:
        import faiss
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(before)
