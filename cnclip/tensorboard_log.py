"""`logging.tensorboard: true`: every metrics.jsonl entry also goes to TensorBoard under RUN/tensorboard/.

A thin tee around the run's metrics log, so TensorBoard shows exactly what metrics.jsonl holds:
train/loss, train/lr, train/logit_scale, train/samples_per_s per step; valid/<direction>/<r1|r5|r10|
mean_recall>, valid/mean_recall and zeroshot/<top1|top5> at each validation (the before-training one at
step 0). The `tensorboard` package is needed only when this is on (pip install "cnclip[tensorboard]").
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


def _flat(prefix: str, tree: dict):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(f"{prefix}/{key}", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}/{key}", value


class TensorBoardLog:
    """Writes each entry to `inner` (the metrics.jsonl log), then its numbers to TensorBoard."""

    def __init__(self, inner, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("recipe key 'logging.tensorboard' is true but the tensorboard package is not "
                              f"installed ({exc}); pip install 'cnclip[tensorboard]' or set it to false") from None
        self.inner = inner
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, **entry) -> None:
        self.inner.write(**entry)
        step = entry.get("step", 0)
        if "skipped" in entry:
            self.writer.add_scalar("train/skipped_steps", 1, step)
        elif isinstance(entry.get("valid"), dict):
            valid = dict(entry["valid"])
            zeroshot = valid.pop("zeroshot", None)
            for tag, value in _flat("valid", {k: v for k, v in valid.items() if not k.startswith("num_")}):
                self.writer.add_scalar(tag, value, step)
            for tag, value in _flat("zeroshot", {k: v for k, v in (zeroshot or {}).items() if k.startswith("top")}):
                self.writer.add_scalar(tag, value, step)
        else:
            for key in ("loss", "lr", "logit_scale", "samples_per_s"):
                if isinstance(entry.get(key), (int, float)):
                    self.writer.add_scalar(f"train/{key}", entry[key], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
