"""What a model reference names, decided before anything is loaded: a local path, a Hub id, or a ModelScope id.

Every command that takes a model (`--model`, `evaluate MODEL`, `model.base`, `model.compose.*`, build-pairs
`--model`) goes through `parse_model_reference`, so the rule is the same everywhere:

* `modelscope:<id>` is a ModelScope id.
* A reference is a local path when it starts with `.`, `/` or `~`, contains more than one `/` (or a
  backslash), exists, or has a `/` and its parent folder exists (`runs/demoo` when `runs/` does).
  A local path that does not exist is a `UsageError` (exit 2) naming it, raised at once: the network
  is never tried for it.
* Anything else (`owner/name`, or a legacy bare name such as `bert-base-chinese`) is a Hugging Face Hub id.

While a Hub id is loaded (`hub_access`): `HF_HUB_OFFLINE=1` is honoured (huggingface_hub reads it when it
is imported), the metadata request times out after `HUB_ETAG_TIMEOUT_S` seconds unless the user set
`HF_HUB_ETAG_TIMEOUT`, huggingface_hub's per-retry warnings become one line per failing request, and a
failure is one `ModelLoadError` line (exit 5).

This module imports nothing heavy: recipes validate their model keys with it before torch is loaded.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from .errors import ModelLoadError, UsageError

log = logging.getLogger(__name__)

MODELSCOPE_PREFIX = "modelscope:"
# Seconds for a Hub metadata request (huggingface_hub's default is 10, and it retries 5 times with backoff).
HUB_ETAG_TIMEOUT_S = 5
_HF_HTTP_LOGGER = "huggingface_hub.utils._http"


@dataclass(frozen=True)
class ModelReference:
    kind: Literal["local", "hub", "modelscope"]
    name: str  # the path (with ~ expanded) or the id


def _written_as_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def looks_local(spec: str) -> bool:
    """The rule in the module docstring: is `spec` meant as a path on this machine?"""
    if _written_as_path(spec):
        return True
    path = Path(spec).expanduser()
    return path.exists() or ("/" in spec and path.parent.is_dir())


def parse_model_reference(spec: str, what: str = "model") -> ModelReference:
    """Classify `spec`; a local path must exist. `what` names the argument or key in the error."""
    if not spec.strip():
        raise UsageError(f"{what}: empty model reference (give a directory, an owner/name Hub id or modelscope:<id>)")
    if spec.startswith(MODELSCOPE_PREFIX):
        return ModelReference("modelscope", spec[len(MODELSCOPE_PREFIX):])
    if looks_local(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            why = "it is written as a path" if _written_as_path(spec) else f"its folder {path.parent}/ exists"
            raise UsageError(f"{what}: no such file or directory: {spec} (taken as a local path because {why}; "
                             "a Hugging Face id looks like owner/name)")
        return ModelReference("local", str(path))
    return ModelReference("hub", spec)


class _CollapseRetries(logging.Filter):
    """Holds back huggingface_hub's retry chatter: the first failure of each request becomes one cnclip line."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if " thrown while requesting " in message:
            request = message.split(" thrown while requesting ", 1)[1]
            if request not in self.seen:
                self.seen.add(request)
                log.warning("Hugging Face Hub request failed, retrying quietly: %s", message)
            return False
        return not (message.startswith("Retrying in ") or message.startswith("Rate limited. Waiting"))


@contextmanager
def _short_hub_timeout() -> Iterator[None]:
    """HF_HUB_ETAG_TIMEOUT's value for this load only, unless the user chose one."""
    if "HF_HUB_ETAG_TIMEOUT" in os.environ:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_ETAG_TIMEOUT
    constants.HF_HUB_ETAG_TIMEOUT = HUB_ETAG_TIMEOUT_S
    try:
        yield
    finally:
        constants.HF_HUB_ETAG_TIMEOUT = before


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def hub_access(ref: ModelReference) -> Iterator[None]:
    """Around the from_pretrained calls of one reference: for a Hub id, short timeout, quiet retries and
    one-line failures (ModelLoadError); for anything else, nothing changes."""
    if ref.kind != "hub":
        yield
        return
    http_log = logging.getLogger(_HF_HTTP_LOGGER)
    quiet = _CollapseRetries()
    http_log.addFilter(quiet)
    try:
        with _short_hub_timeout():
            yield
    except (OSError, ModelLoadError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        if not isinstance(cause, OSError):  # not a download problem (e.g. the wrong kind of model): as it is
            raise
        from huggingface_hub import constants

        where = ("HF_HUB_OFFLINE is set, so only the local cache was read" if _offline()
                 else f"Hub {constants.ENDPOINT}")
        raise ModelLoadError(f"could not load '{ref.name}' from the Hugging Face Hub ({where}): "
                             f"{_first_line(cause)}") from None
    finally:
        http_log.removeFilter(quiet)
