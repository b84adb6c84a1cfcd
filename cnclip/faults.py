"""Crash injection for the crash-and-resume tests.

`CNCLIP_CRASH_AT=<point>:<n>` makes the process kill itself with SIGKILL the n-th time it reaches
`<point>`: no cleanup handler, no flush, exactly like a power cut or the OOM killer. Unset (as
always outside those tests), a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "CNCLIP_CRASH_AT"
_reached: Counter = Counter()


def crash_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
