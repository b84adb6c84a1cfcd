"""Where build-pairs' per-shard stages run: this process, a local process pool, or Ray.

Every engine runs the same function, `shards.process_shard`, on the same `ShardTask`s (one per
shard: its raw items and the path of its result in DIR/.work), and each task writes its own
shard file atomically. The driver (pipeline.py) reads the inputs, hands out the tasks, and after
the last one finishes runs the ordered global stages (dedup, cap, split, write) over the shard
files in input order. Which engine ran a shard, and in which order shards finished, therefore
cannot change a byte of the output.

* local, workers=1: in this process.
* local, workers=N: a spawn-context process pool of N processes.
* ray: one Ray task (1 CPU) per shard, on a local Ray started here (num_cpus = --workers) or on
  the cluster at --ray-address / RAY_ADDRESS. Tasks read their inputs' image files and write
  their results by path, so on a cluster INPUT and DIR must be on a file system every node
  mounts at the same path. Ray is imported only here and only when asked for (cnclip[ray]).

At most 2 tasks per worker slot (process, or Ray CPU) are in flight, so the driver's memory is
bounded whatever the input size. Each worker process builds its RecordProcessor (jieba, OpenCC
tables) once, not once per shard.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from cnclip.errors import UsageError, WorkerCrashed
from data_tools.config import FilterConfig
from data_tools.download import DownloadOptions
from data_tools.shards import ShardTask, process_shard
from data_tools.stages import RecordProcessor

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class StageSettings:
    """What a worker needs to build its RecordProcessor."""

    config: FilterConfig
    download: DownloadOptions | None = None


def run_shards(tasks: Iterator[ShardTask], settings: StageSettings, engine: str = "local", workers: int = 1,
               ray_address: str | None = None) -> Iterator[int]:
    """Run every task; yields each finished task's record count (in completion order)."""
    if engine == "ray":
        yield from _ray(tasks, settings, workers, ray_address)
    elif engine != "local":
        raise UsageError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    elif workers == 1:
        processor = RecordProcessor(settings.config, settings.download)
        for task in tasks:
            yield process_shard(task, processor)
    else:
        yield from _process_pool(tasks, settings, workers)


# ---------------------------------------------------------------- local process pool


def _process_pool(tasks: Iterator[ShardTask], settings: StageSettings, workers: int) -> Iterator[int]:
    context = multiprocessing.get_context("spawn")  # no inherited locks or threads; same on every OS
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(settings,)) as pool:
        pending: deque[Future[int]] = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(_process_in_worker, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise WorkerCrashed("a worker process died unexpectedly (killed by a signal or out of memory)") from None


_worker: tuple[StageSettings, RecordProcessor] | None = None


def _processor(settings: StageSettings) -> RecordProcessor:
    """This process's RecordProcessor for `settings`, built on first use."""
    global _worker
    if _worker is None or _worker[0] != settings:
        _worker = (settings, RecordProcessor(settings.config, settings.download))
    return _worker[1]


def _init_worker(settings: StageSettings) -> None:
    _processor(settings)


def _process_in_worker(task: ShardTask) -> int:
    assert _worker is not None, "worker not initialised"
    return process_shard(task, _worker[1])


# ---------------------------------------------------------------- Ray


def _ray_task(settings: StageSettings, task: ShardTask) -> int:
    """Body of the Ray task: the same shard work as a local worker."""
    return process_shard(task, _processor(settings))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'cnclip[ray]'") from None
    return ray


def _ray(tasks: Iterator[ShardTask], settings: StageSettings, workers: int, address: str | None) -> Iterator[int]:
    ray = _import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            else:  # a local Ray of --workers CPUs, gone when the run ends
                ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UsageError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {err}") from None
        started = True
    try:
        yield from _ray_loop(ray, tasks, settings)
    finally:
        if started:
            ray.shutdown()


def _ray_loop(ray: Any, tasks: Iterator[ShardTask], settings: StageSettings) -> Iterator[int]:
    remote = ray.remote(num_cpus=1, max_retries=2)(_ray_task)  # idempotent: a shard file is written whole or not at all
    settings_ref = ray.put(settings)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []

    def finished(count: int) -> Iterator[int]:
        nonlocal pending
        ready, pending = ray.wait(pending, num_returns=count)
        for ref in ready:
            yield _ray_result(ray, ref)

    for task in tasks:
        pending.append(remote.remote(settings_ref, _absolute(task)))
        if len(pending) >= 2 * slots:
            yield from finished(1)
    while pending:
        yield from finished(1)


def _ray_result(ray: Any, ref: Any) -> int:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else None
        if cause is not None:
            raise cause from None  # the worker's own error (disk full, ...), as the local engine raises it
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError):
        raise WorkerCrashed("a Ray worker or node died (killed by a signal or out of memory)") from None


def _absolute(task: ShardTask) -> ShardTask:
    """Paths as every node must see them (a Ray worker's working directory is not the driver's)."""
    source = dataclasses.replace(task.source, path=task.source.path.resolve())
    return dataclasses.replace(task, source=source, result_path=task.result_path.resolve())
