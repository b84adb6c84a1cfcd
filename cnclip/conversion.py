"""`cnclip convert`'s work: an original-format Chinese-CLIP checkpoint written once as a transformers directory.

Training, evaluation and zero-shot take original checkpoints directly (converted in memory,
`cnclip.original_format`); this writes the converted model (weights, tokenizer with vocab.txt,
preprocessor_config.json with cn_clip's image transform) for use without cnclip. The output
directory is written under a temporary name and swapped in whole.
"""

from __future__ import annotations

from pathlib import Path

from . import original_format
from .atomic import atomic_dir, write_json
from .errors import UsageError
from .exporter import readable_by_umask, save_tokenizer


def convert_to_transformers(src: str | Path, out_dir: str | Path, arch: str | None = None) -> dict:
    """Write a transformers ChineseCLIP directory (weights, tokenizer, preprocessor_config.json) for an
    original-format checkpoint; `cnclip convert` runs this. OUT_DIR must be new or empty."""
    src, out_dir = Path(src), Path(out_dir)
    if not original_format.is_original_format(src):
        o = original_format
        raise UsageError(f"{src} is neither a cn_clip checkpoint file ({', '.join(o.CHECKPOINT_SUFFIXES)}) nor a "
                         f"ModelScope-layout directory ({o.MODELSCOPE_WEIGHTS} + {o.VISION_CONFIG} + {o.TEXT_CONFIG})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"--to {out_dir} exists and is not an empty directory")
    model = original_format.load_original(src, arch)
    with atomic_dir(out_dir) as tmp:
        model.clip.save_pretrained(str(tmp))
        save_tokenizer(model.tokenizer, tmp)
        write_json(tmp / "preprocessor_config.json", model.processor_config)
        readable_by_umask(tmp)
    return {"source": str(src), "out_dir": str(out_dir), "architecture": model.info,
            "parameters": sum(p.numel() for p in model.clip.parameters()),
            "check": "every original tensor used and converted back bit for bit"}
