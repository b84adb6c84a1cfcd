"""What an `open_clip:` image-tower reference names, decided before anything is loaded (torch-free).

`model.compose.image` accepts, besides a transformers CLIP checkpoint (cnclip.model_reference):

* `open_clip:<architecture>@<pretrained tag>`, e.g. `open_clip:ViT-B-16-SigLIP2@webli` (open_clip downloads
  the tag's weights itself);
* `open_clip:<architecture>@<checkpoint file>`: the `@` part is a file when it is written as a path (starts
  with `.`, `/` or `~`, holds a slash, ends in .pt/.pth/.bin/.safetensors) or exists; it must exist;
* `open_clip:hf-hub:<org>/<repo>` and `open_clip:local-dir:<directory>` (open_clip's own schemas; the
  directory must hold open_clip_config.json, the layout `cnclip export` writes for such a tower).

An architecture without weights is refused: a composed image tower is locked, so a random one is useless.
Errors are UsageError (exit 2) naming the key and the reference. The loading is cnclip.open_clip_tower's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

OPEN_CLIP_PREFIX = "open_clip:"
INSTALL_HINT = 'pip install "cnclip[openclip]" (open_clip_torch and timm, with a torchvision built for your torch)'
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
CONFIG_FILE = "open_clip_config.json"  # open_clip's local-dir / hf-hub layout: {"model_cfg", "preprocess_cfg"}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
FORMS = ("open_clip:<architecture>@<pretrained tag or checkpoint file>, open_clip:hf-hub:<org>/<repo> "
         "or open_clip:local-dir:<directory>")


@dataclass(frozen=True)
class OpenClipReference:
    spec: str  # as written in the recipe
    model_name: str  # open_clip's model_name: an architecture, "hf-hub:<org>/<repo>" or "local-dir:<dir>"
    pretrained: str | None  # with an architecture: a pretrained tag or a checkpoint file


def is_open_clip_reference(spec: str) -> bool:
    return spec.strip().startswith(OPEN_CLIP_PREFIX)


def _written_as_path(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or "/" in text or "\\" in text
            or text.lower().endswith(CHECKPOINT_SUFFIXES) or Path(text).expanduser().exists())


def parse_open_clip_reference(spec: str, what: str = "model.compose.image") -> OpenClipReference:
    """The reference's parts (module docstring), checked before open_clip is imported: a local file or
    directory must exist; an architecture needs weights (a composed tower is never random)."""
    body = spec.strip()[len(OPEN_CLIP_PREFIX):].strip() if is_open_clip_reference(spec) else ""
    if not body:
        raise UsageError(f"{what}: '{spec}' names no open_clip model; expected {FORMS}")
    if body.startswith(HF_HUB):
        repo = body[len(HF_HUB):]
        if repo.count("/") != 1 or not all(part.strip() for part in repo.split("/")):
            raise UsageError(f"{what}: '{spec}': a Hub repository is <org>/<repo>, got {repo!r}")
        return OpenClipReference(spec, body, None)
    if body.startswith(LOCAL_DIR):
        folder = Path(body[len(LOCAL_DIR):]).expanduser()
        if not (folder / CONFIG_FILE).is_file():
            raise UsageError(f"{what}: '{spec}': {folder} is not an open_clip model directory (no {CONFIG_FILE})")
        return OpenClipReference(spec, f"{LOCAL_DIR}{folder}", None)
    architecture, _, pretrained = body.partition("@")
    architecture, pretrained = architecture.strip(), pretrained.strip()
    if not architecture:
        raise UsageError(f"{what}: '{spec}' names no architecture; expected {FORMS}")
    if not pretrained:
        raise UsageError(f"{what}: '{spec}' names no weights: add @<pretrained tag> (e.g. "
                         f"open_clip:ViT-B-16-SigLIP2@webli) or @<checkpoint file>; a composed image tower is "
                         "never random")
    if _written_as_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UsageError(f"{what}: '{spec}': no such checkpoint file: {pretrained}")
        pretrained = str(path)
    return OpenClipReference(spec, architecture, pretrained)


