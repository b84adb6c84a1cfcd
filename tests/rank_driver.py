"""Worker of the small multi-process tests of cnclip.distributed (see test_host_waits.py).

  rank_driver.py SCENARIO OUT_DIR      (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set)

The test starts each process itself, as two nodes would be started: torchrun would kill the
survivors as soon as one of its workers dies, but only on its own node.

dies-early   rank 1 exits right after init_distributed; rank 0 then waits on the host, the way
             the others wait while rank 0 validates. OUT_DIR/rank-0.json: how long that wait took
             to fail and with what.
helpers      every rank loads through distributed.local_main_first (rank 0's load takes 1 s), then
             checks that the ranks agree on their rank (same_on_every_rank), then gets what rank 0
             read (computed_on_main) where rank 0's read fails with a DataError. OUT_DIR/rank-R.json:
             when this rank's load started and ended, and the errors of the two others.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def dies_early(out: Path) -> None:
    from cnclip import distributed

    info = distributed.init_distributed("cpu")
    if info.rank == 1:
        os._exit(3)  # dead before the first host wait, as a rank that fails to load its data
    time.sleep(1)
    tic = time.monotonic()
    try:
        distributed.host_barrier()
        error = None
    except Exception as exc:  # noqa: BLE001 - reported to the test, which judges it
        error = f"{type(exc).__name__}: {exc}"
    (out / "rank-0.json").write_text(json.dumps({"seconds": time.monotonic() - tic, "error": error}))
    sys.stdout.flush()
    os._exit(0)  # the group cannot be torn down cleanly with a dead peer


def helpers(out: Path) -> None:
    from cnclip import distributed
    from cnclip.errors import DataError

    info = distributed.init_distributed("cpu")

    def load() -> tuple[float, float]:
        start = time.time()
        if info.rank == 0:
            time.sleep(1)
        return start, time.time()

    def read() -> None:
        raise DataError(f"split 'train' has no images: read by rank {info.rank}")

    start, end = distributed.local_main_first(load, "loading")
    errors = []
    for check in (lambda: distributed.same_on_every_rank(info.rank, "the rank"),
                  lambda: distributed.computed_on_main(read, "reading")):
        try:
            check()
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - reported to the test, which judges it
            errors.append(f"{type(exc).__name__}: {exc}")
    (out / f"rank-{info.rank}.json").write_text(json.dumps({"start": start, "end": end, "errors": errors}))
    distributed.shutdown()


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    {"dies-early": dies_early, "helpers": helpers}[scenario](out_dir)
