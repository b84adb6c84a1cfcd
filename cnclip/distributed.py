"""Data-parallel plumbing: one process per device under torchrun, or one plain process.

A plain `python -m cnclip.finetune` never needs a launcher or environment variables: without the
variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK) everything here is a no-op for a world of
one. Under torchrun the backend follows the device (nccl for CUDA, gloo otherwise, so CPU-only and
Windows machines work), and each process drives the GPU numbered by its LOCAL_RANK.

The helpers read torch.distributed's own state, so callers never pass a context object around.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
# The timeout of the training collectives (all-gathers, gradient all-reduce): a step takes seconds,
# so a rank that fell out (a desync, a dead node) surfaces within minutes, not hours. Waits for work
# of unbounded length (rank 0 validating, ranks finishing their share of the image cache) never
# happen in these collectives: they use `host_barrier`, on a CPU (gloo) group.
DEFAULT_TIMEOUT = timedelta(minutes=30)
# host_barrier's timeout: longer than any validation or caching pass (torch needs a finite one).
HOST_WAIT_TIMEOUT = timedelta(days=7)
_host_group = None


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None: a plain single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in LAUNCH_VARS)


def init_distributed(device: str | torch.device = "cpu", timeout: timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Join the process group torchrun describes (if any) and return where this process stands.

    Safe to call when a group already exists (tests, notebooks): it is reused, not re-created.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(0, 1, 0, None)
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timeout, **process_group_kwargs(device))
    result = info()
    log.info("process group: rank %d of %d (local rank %d), backend %s, device %s", result.rank,
             result.world_size, result.local_rank, backend, device)
    return result


def process_group_kwargs(device: torch.device, init=None) -> dict:
    """`device_id` binds the NCCL communicator to this process's GPU at once; only torch >= 2.3's
    init_process_group takes it, so it is passed where the running torch accepts it."""
    import inspect

    init = init or dist.init_process_group
    if device.type == "cuda" and "device_id" in inspect.signature(init).parameters:
        return {"device_id": device}
    return {}


def shutdown() -> None:
    global _host_group
    if is_distributed():
        _host_group = None
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def info() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(0, 1, 0, None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                    dist.get_backend())


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def host_barrier() -> None:
    """Wait for every rank on the host (a gloo group, timeout HOST_WAIT_TIMEOUT), never in an NCCL
    collective: for waits of unbounded length, such as the others waiting while rank 0 validates."""
    global _host_group
    if not is_distributed():
        return
    if _host_group is None:  # created at the first call, which every rank makes at the same point
        _host_group = dist.new_group(backend="gloo", timeout=HOST_WAIT_TIMEOUT)
    dist.barrier(group=_host_group)


def same_on_every_rank(value, what: str) -> None:
    """Check that every rank holds the same `value` (e.g. the step a run resumes from); otherwise
    raise on every rank at once, so no rank is left waiting in a collective the others never join."""
    if not is_distributed():
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise ConfigError(f"the ranks disagree on {what}: {', '.join(f'rank {r}: {v}' for r, v in enumerate(values))}")


def any_rank(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True on every rank when `flag` is True on at least one: one decision that all ranks then follow."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, in rank order, keeping the autograd graph.

    Backward sums the gradients all ranks computed for this rank's slice (an all-to-all + sum on
    gloo, reduce-scatter on nccl), so the local embeddings receive every rank's loss gradient.
    All ranks must pass the same shape.
    """
    if not is_distributed():
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (no gradient): keys, cached embeddings."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    return all_gather_with_grad(tensor) if tensor.requires_grad else all_gather_no_grad(tensor)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of the trainable parameters over ranks, in one flat all-reduce.

    This is what DDP does after backward; done by hand because the step runs the text tower
    directly (and, with gradient caching, once per chunk), which DDP's forward hooks do not see.
    The LoRA parameters are few, so one bucket is enough.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(params: Iterable[torch.nn.Parameter], src: int = 0) -> None:
    """Make every rank start from rank 0's weights (LoRA init draws random numbers)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a scalar over ranks (for logging the global loss)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def local_slice(global_batch: torch.Tensor, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's contiguous share of a global batch; the global batch must split evenly."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    n = global_batch.shape[0]
    if n % world:
        raise ValueError(f"global batch of {n} does not split evenly over {world} processes")
    per = n // world
    return global_batch[rank_ * per:(rank_ + 1) * per]
