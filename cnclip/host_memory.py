"""Keep a CPU training loop's resident memory from growing with its number of steps.

On a CPU, torch runs many operators through oneDNN, which builds a "primitive" (a kernel specialised
to the operand shapes) per shape and keeps up to 1024 of them in a process-wide cache. The packed
text tower (`cnclip.packed_text`) gives its linear layers one row per real token, so nearly every
batch has a new shape: each step adds primitives, evicted ones leave holes in the C heap that the next
step's activations do not fit, and the process' resident memory climbs step after step although its
live data does not (measured with benchmarks/scale.py, tiny model, batch 256, one thread: 0.7-1.7 MB
per step, 286 MB over the 390 steps of 100k pairs; `tests/test_host_memory.py` shows the climb).

`bound_cpu_kernel_cache()` turns that cache off (`ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`) for the process:
each primitive is then built for its call and freed after it, and the loop's memory stays flat. The
variable is read when oneDNN builds its first primitive, so this must run before the process' first
CPU operator that uses oneDNN; `cnclip.trainer.train` calls it first thing. A value the user has set
is left as it is (theirs to choose).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def bound_cpu_kernel_cache() -> bool:
    """Turn oneDNN's primitive cache off for this process unless the user set its capacity; True if
    this call set it."""
    if ONEDNN_CACHE_VARIABLE in os.environ:
        return False
    os.environ[ONEDNN_CACHE_VARIABLE] = "0"
    log.debug("%s=0: oneDNN builds each CPU kernel per call (no cache growing with new shapes)",
              ONEDNN_CACHE_VARIABLE)
    return True
