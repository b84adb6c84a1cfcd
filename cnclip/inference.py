"""Load a trained model for inference: a run directory (base + LoRA) or a plain model directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import TRAINABLE, latest_checkpoint, load_trainable
from .models import (ImagePreprocess, attach_text_tuning, load_base_model, load_clip, load_image_preprocess,
                     load_tokenizer, merged_model, resolve_model_path)
from .model_reference import hub_access, parse_model_reference
from .errors import UsageError
from .original_format import is_original_format
from .open_clip_export import is_open_clip_export
from .recipe import Recipe, load_recipe

RECIPE_FILE = "recipe.yaml"


@dataclass
class InferenceModel:
    clip: object  # a ChineseCLIPModel with any LoRA merged in
    tokenizer: object
    preprocess: ImagePreprocess
    recipe: Recipe | None  # set when loaded from a run directory


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RECIPE_FILE).is_file()


def run_weights(run_dir: Path, checkpoint: str) -> Path:
    """The trainable-parameter file of a run's best (or latest) checkpoint."""
    if checkpoint == "best" and (run_dir / "best" / TRAINABLE).is_file():
        return run_dir / "best" / TRAINABLE
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (no best/ and no checkpoints/latest)")
    return latest / TRAINABLE


def load_run(run_dir: str | Path, checkpoint: str = "best", alpha: float | None = None):
    """(trained model, base model, recipe) of a run, with its trained weights loaded: a peft model (LoRA,
    unmerged) or, for model.text_tuning=full, the ChineseCLIPModel itself.

    The weights are the checkpoint's as saved: for best/ of a run with train.wise, the WiSE-FT alpha the
    run picked. `alpha` overrides that: the model at `alpha` between the base (0) and the checkpoint's
    fine-tuned weights (1; best/finetuned.safetensors when the run swept), as cnclip.wise interpolates."""
    from . import wise

    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / RECIPE_FILE, check_data=False)
    base = load_base_model(recipe.model, recipe.seed)
    peft_model = attach_text_tuning(base.clip, recipe.model)
    weights = run_weights(run_dir, checkpoint)
    if alpha is None:
        load_trainable(peft_model, weights)
        return peft_model.eval(), base, recipe
    base_values = wise.snapshot_trainables(peft_model)  # before loading: LoRA B at zero, the base text tower
    tuned = weights.parent / wise.TUNED_FILE
    load_trainable(peft_model, tuned if tuned.is_file() else weights)  # every name must match
    wise.set_trainables(peft_model, wise.interpolate(base_values, wise.snapshot_trainables(peft_model), alpha))
    return peft_model.eval(), base, recipe


def load_for_inference(path: str, checkpoint: str = "best", what: str = "model",
                       alpha: float | None = None) -> InferenceModel:
    """A run directory, a model directory, a cn_clip checkpoint, an open_clip export (cnclip.open_clip_export),
    a Hub id or `modelscope:<id>`; a local path
    that does not exist is a UsageError naming `what` (the argument) before anything is loaded
    (cnclip.model_reference). `alpha` (run directories only): the WiSE-FT alpha to load at (`load_run`)."""
    if alpha is not None and not is_run_dir(path):
        raise UsageError(f"--alpha needs a run directory (base and fine-tuned weights); {path} is not one")
    if is_run_dir(path):
        peft_model, base, recipe = load_run(path, checkpoint, alpha)
        return InferenceModel(merged_model(peft_model), base.tokenizer, base.preprocess, recipe)
    resolved = resolve_model_path(path, what)
    if is_open_clip_export(resolved):  # cnclip export of a run on an open_clip tower: image/ + text/
        from .open_clip_export import load_open_clip_export

        clip, tokenizer, preprocess = load_open_clip_export(resolved)
        return InferenceModel(clip, tokenizer, preprocess, None)
    if is_original_format(resolved):  # a cn_clip .pt or a ModelScope-layout directory, converted in memory
        from .recipe import ModelConfig

        base = load_base_model(ModelConfig(base=resolved))
        return InferenceModel(base.clip.eval(), base.tokenizer, base.preprocess, None)
    with hub_access(parse_model_reference(resolved)):
        return InferenceModel(load_clip(resolved).eval(), load_tokenizer(resolved), load_image_preprocess(resolved),
                              None)
