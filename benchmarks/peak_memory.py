"""The peak memory of a block of code, as its rise over the block's start (shared by the benchmarks).

On a CUDA device: torch's max allocated bytes (peak stats reset at the start). On a CPU: the process'
RSS high-water mark (VmHWM), reset to the current RSS through /proc/self/clear_refs at the start
(Linux), so the peak is the block's own; run each measured block in a fresh process, so no earlier
block's freed heap hides its needs.
"""

from __future__ import annotations

import gc

import torch


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakMemory:
    """`with PeakMemory(device) as mem:` ...; then `mem.growth` (bytes) and `mem.rise_mb` (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # VmHWM := the current RSS
            self.start = status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = status_bytes("VmHWM")
        self.growth = self.peak - self.start
        return False

    @property
    def rise_mb(self) -> float:
        return self.growth / 2 ** 20
