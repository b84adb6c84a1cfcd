"""Data-parallel plumbing: one process per device under torchrun, or one plain process.

A plain `python -m cnclip.finetune` never needs a launcher or environment variables: without the
variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK) everything here is a no-op for a world of
one. Under torchrun the backend follows the device (nccl for CUDA, gloo otherwise, so CPU-only and
Windows machines work), and each process drives the GPU numbered by LOCAL_RANK modulo the GPUs it
sees (cnclip.runtime.resolve_device).

Two process groups: the default one (nccl on GPUs) for the training collectives, with a 30-minute
timeout, and a CPU (gloo) "host" group for everything that waits on unbounded work or moves Python
objects (rank 0 validating or reading the data, the others' share of the image cache). The host
group is created in `init_distributed`, while every rank is known to be alive: a rank that dies
later makes the others' next host wait fail at once (its sockets close), and one that hangs or
vanishes with its node makes them fail after HOST_WAIT_TIMEOUT. Either way they stop with
WorkerCrashed (exit 7), never wait for days.

The helpers read torch.distributed's own state, so callers never pass a context object around.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

from .errors import CnclipError, ConfigError, UsageError, WorkerCrashed

log = logging.getLogger(__name__)

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
# The timeout of the training collectives (all-gathers, gradient all-reduce): a step takes seconds,
# so a rank that fell out (a desync, a dead node) surfaces within minutes, not hours. Waits for work
# of unbounded length (rank 0 validating, ranks finishing their share of the image cache) never
# happen in these collectives: they use `host_barrier`, on a CPU (gloo) group.
DEFAULT_TIMEOUT = timedelta(minutes=30)
# How long a host wait lasts before the ranks give up on a rank that neither arrives nor dies
# (a hung process, a node gone without closing its connections): longer than rank 0's validation,
# its reading of the data, or a rank's share of the image cache normally take. A rank that dies is
# noticed at once, whatever this is. HOST_TIMEOUT_ENV (minutes) sets another value.
HOST_TIMEOUT_ENV = "CNCLIP_HOST_TIMEOUT_MINUTES"
HOST_WAIT_TIMEOUT = timedelta(hours=2)
_host_group = None
T = TypeVar("T")


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
        if _host_group is None and is_distributed():  # a group made elsewhere: add the host group now
            _create_host_group()
        return info()
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(0, 1, 0, None)
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timeout, **process_group_kwargs(device))
    _create_host_group()
    result = info()
    log.info("process group: rank %d of %d (local rank %d), backend %s, device %s", result.rank,
             result.world_size, result.local_rank, backend, device)
    return result


def host_wait_timeout() -> timedelta:
    """HOST_WAIT_TIMEOUT, or the minutes in $CNCLIP_HOST_TIMEOUT_MINUTES."""
    value = os.environ.get(HOST_TIMEOUT_ENV, "").strip()
    if not value:
        return HOST_WAIT_TIMEOUT
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise UsageError(f"${HOST_TIMEOUT_ENV} must be a positive number of minutes, not {value!r}")
    return timedelta(minutes=minutes)


def _create_host_group() -> None:
    """The CPU (gloo) group of the host waits: a collective of every rank, made while all are alive.

    (Made lazily at the first host wait, a rank that died before it left the others waiting for the
    group's rendezvous until the timeout: gloo connects the ranks when the group is made.)"""
    global _host_group
    _host_group = dist.new_group(backend="gloo", timeout=host_wait_timeout())


def _host(what: str, collective: Callable[[], T]) -> T:
    """Run a collective on the host group; a rank that died or never came stops this one with WorkerCrashed."""
    if _host_group is None:
        raise RuntimeError("distributed.init_distributed() must run on every rank before a host wait")
    try:
        return collective()
    except RuntimeError as exc:  # torch's DistBackendError / gloo's "Connection closed by peer", timeouts
        raise WorkerCrashed(
            f"rank {rank()} of {world_size()}: another rank stopped (or did not arrive within "
            f"{_minutes(host_wait_timeout())}, ${HOST_TIMEOUT_ENV}) while {what}; see the other ranks' errors. "
            f"Checkpoints and image cache parts already written are kept: rerun to resume. "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def _minutes(t: timedelta) -> str:
    return f"{t.total_seconds() / 60:g} minutes"


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


def host_barrier(what: str = "waiting for the other ranks") -> None:
    """Wait for every rank on the host group (gloo, timeout `host_wait_timeout()`), never in an NCCL
    collective: for waits of unbounded length, such as the others waiting while rank 0 validates.
    `what` says in the error what the job was doing when a rank went missing."""
    if not is_distributed():
        return
    _host(what, lambda: dist.barrier(group=_host_group))


def computed_on_main(compute: Callable[[], T], what: str) -> T:
    """`compute()` run by rank 0 alone and its result sent to every rank (pickled, on the host group),
    for work every rank would otherwise repeat, such as reading and hashing a data set.

    A CnclipError raised by rank 0 (a missing file, an empty split) is raised on every rank."""
    if not is_distributed():
        return compute()
    payload: list = [None]
    if is_main():
        try:
            payload[0] = (True, compute())
        except CnclipError as exc:
            payload[0] = (False, exc)
    _host(what, lambda: dist.broadcast_object_list(payload, src=0, group=_host_group))
    ok, value = payload[0]
    if not ok:
        raise value
    return value


def local_main_first(load: Callable[[], T], what: str) -> T:
    """`load()` on local rank 0 of every node first, then on the other ranks: the first fills the
    node's caches (the Hugging Face Hub / ModelScope download of a model), the others read them,
    instead of every process downloading at once. A CnclipError of a first loader stops every rank."""
    if not is_distributed():
        return load()
    first = info().local_rank == 0
    result, error = None, None
    if first:
        try:
            result = load()
        except CnclipError as exc:
            error = exc
    errors: list = [None] * world_size()
    _host(what, lambda: dist.all_gather_object(errors, error, group=_host_group))
    raised = next((e for e in errors if e is not None), None)
    if raised is not None:
        raise raised
    return result if first else load()


SHARED_CHECK_PREFIX = ".cnclip-shared-check-"


def check_shared_directories(directories: dict[str, str | os.PathLike]) -> None:
    """Stop every rank with one UsageError unless every rank sees, in each of `directories` (recipe
    key -> this rank's path), the file rank 0 has just written there: a multi-node job's run_dir and
    image cache must be on a filesystem every node shares. (Otherwise the nodes read each other's
    files and fail one by one: missing demo data, cache parts, checkpoints.)"""
    if not is_distributed():
        return
    token = computed_on_main(lambda: secrets.token_hex(8), "checking for a shared filesystem")
    probes = {key: Path(d) / f"{SHARED_CHECK_PREFIX}{token}" for key, d in directories.items()}
    if is_main():
        for probe in probes.values():
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text(token, encoding="utf-8")
    host_barrier("checking for a shared filesystem")
    seen = {key: probe.is_file() and probe.read_text(encoding="utf-8") == token for key, probe in probes.items()}
    views: list = [None] * world_size()
    _host("checking for a shared filesystem",
          lambda: dist.all_gather_object(views, (seen, {k: str(d) for k, d in directories.items()}), group=_host_group))
    if is_main():
        for probe in probes.values():
            probe.unlink(missing_ok=True)
    problems = []
    for key, main_path in views[0][1].items():
        blind = [r for r, (seen_r, _) in enumerate(views) if not seen_r[key]]
        if blind:
            problems.append(f"{key} {main_path} (rank 0's): not seen by " + ", ".join(
                f"rank {r} (its {key}: {views[r][1][key]})" for r in blind))
    if problems:
        raise UsageError(
            "a file rank 0 wrote is not seen by every rank: " + "; ".join(problems) + ". A job on several nodes "
            "needs these directories on a filesystem every node shares (NFS, Lustre, CephFS...), at the same path")


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


def data_parallel(module: torch.nn.Module):
    """`module` under DistributedDataParallel, or None for one process: its parameters' gradients are
    all-reduced (averaged) in buckets while backward is still running, overlapping communication with
    the rest of backward, instead of in one flat copy after it. For the full text tower, where that
    copy is the size of the tower; LoRA's few parameters keep `average_gradients`.

    The inputs are on the module's device already (no device_ids: DDP moves nothing, so a host copy
    such as the packed layout's attention mask stays on the host); buffers are not re-broadcast at
    every forward (the text tower's are constants); the gradients are views into DDP's buckets, so
    they take no second copy of the tower's size beside them. The module's forward must be what produces
    the loss's graph, every parameter with requires_grad must receive a gradient in each backward,
    and forwards and backwards that must not all-reduce yet (gradient caching's chunks but the last)
    run under its no_sync()."""
    if not is_distributed():
        return None
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch 2.13 renamed broadcast_buffers (deprecated, with a warning) to forward_sync_buffers
    buffers = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=None, gradient_as_bucket_view=True, **{buffers: False})


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of the trainable parameters over ranks, in one flat all-reduce after backward.

    For the parameters no DDP module syncs (`data_parallel`): LoRA's, which are few, so one bucket
    is enough, and those outside the text tower (the logit scale). The step runs the text tower
    directly (with gradient caching, once per chunk), so DDP applies only where it wraps the tower.
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
