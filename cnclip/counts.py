"""Counts read from untrusted text (HTTP headers, URL parts, file names): ASCII digits only.

`str.isdigit` accepts '²' (which `int()` refuses) and '٣' (which `int()` reads as 3), and `int()` refuses
more than 4,300 digits: each was a way for a header or a name to reach an unexpected exception or to be
read as a number it does not spell. A latin-1 header byte 0xB2 arrives as '²', so this is not theory.
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"[0-9]+")
COUNT_CAP = 10**15  # more than any limit a caller compares with


def parse_count(text: str) -> int | None:
    """ASCII digits -> their value (COUNT_CAP for a longer number); None for anything else."""
    if not _DIGITS.fullmatch(text):
        return None
    digits = text.lstrip("0")
    return int(digits or "0") if len(digits) <= 15 else COUNT_CAP
