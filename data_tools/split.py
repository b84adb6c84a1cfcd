"""train/valid/test assignment by image.

The split is a seeded hash of the image's dedup representative, not a shuffle: an image (and
any near duplicate of it, which dedup has folded into its representative) can only ever land
in one split, and adding more crawl data later does not move existing images between splits.
"""

from __future__ import annotations

from hashlib import blake2b

from cnclip.errors import UsageError

SPLIT_NAMES = ("train", "valid", "test")


def parse_splits(text: str) -> tuple[tuple[str, float], ...]:
    """"0.98,0.01,0.01" -> (("train", 0.98), ("valid", 0.01), ("test", 0.01))."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != len(SPLIT_NAMES):
        raise UsageError(f"expected {len(SPLIT_NAMES)} comma-separated fractions for train,valid,test, got {text!r}")
    try:
        fractions = [float(part) for part in parts]
    except ValueError:
        raise UsageError(f"fractions must be numbers, got {text!r}") from None
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise UsageError(f"fractions must be >= 0 and sum to 1, got {text!r}")
    return tuple(zip(SPLIT_NAMES, fractions))


def assign_split(image_key: bytes, splits: tuple[tuple[str, float], ...], seed: int) -> str:
    """Map an image key to a split with probability equal to the split's fraction."""
    digest = blake2b(image_key, digest_size=8, key=b"split" + seed.to_bytes(8, "little", signed=True))
    point = int.from_bytes(digest.digest(), "big") / 2**64
    cumulative = 0.0
    for name, fraction in splits:
        cumulative += fraction
        if point < cumulative:
            return name
    return next(name for name, fraction in reversed(splits) if fraction > 0)  # float rounding at the top
