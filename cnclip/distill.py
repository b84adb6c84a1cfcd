"""The distillation teacher (recipe section train.distill): what it embeds, and how, for each step.

Guarantees:
* The teacher never changes: its text embeddings are computed under torch.no_grad with its text
  tower in eval mode (no dropout), and its logit scale is a copy taken before training (and before
  any checkpoint is resumed), so a resumed run distils towards the same teacher.
* The default teacher is the frozen base model. With LoRA it is the trained model itself with the
  adapter disabled (peft's `disable_adapter()`, which also switches the trained copy of the text
  projection back to the original) -- no second copy of the model. Its image embeddings are the
  student's: the image tower is locked, so they are the same cache rows (the same bank).
* A teacher loaded from another model (`train.distill.teacher`, any reference cnclip loads) keeps
  its own weights; its image embeddings come from the image cache under its own tower fingerprint
  (a separate cache entry). Its tokenizer must be the student's, since both read the same tokens.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import ConfigError
from .gradcache import Batch, split_batch


@contextmanager
def _frozen_eval(module: nn.Module) -> Iterator[None]:
    """Eval mode for the block (no dropout in the teacher), the module's own mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@dataclass
class Teacher:
    """The teacher of a run: its model, logit scale and image-embedding bank (rows as the student's cache)."""

    clip: nn.Module
    logit_scale: torch.Tensor  # detached copy, never trained
    image_bank: torch.Tensor  # row r = the teacher's embedding of the student's cache row r
    weight: float
    temperature: float | None = None
    # The peft model whose adapter is switched off while the teacher runs (frozen-base teacher with LoRA).
    adapter_model: nn.Module | None = None

    def text_embeddings(self, encode: Callable[..., torch.Tensor], tokens: Batch, autocast, chunk: int = 0
                        ) -> torch.Tensor:
        """The teacher's text embeddings of `tokens` (no graph), in chunks of `chunk` captions when > 0."""
        off = self.adapter_model.disable_adapter() if self.adapter_model is not None else nullcontext()
        n = tokens["input_ids"].shape[0]
        chunks = split_batch(tokens, chunk) if 0 < chunk < n else [tokens]
        with torch.no_grad(), off, _frozen_eval(self.clip.text_model), autocast():
            return torch.cat([encode(self.clip, **c) for c in chunks])


def frozen_base_teacher(model: nn.Module, clip: nn.Module, image_bank: torch.Tensor, weight: float,
                        temperature: float | None) -> Teacher:
    """The base model as it is before training: the LoRA model with its adapter off, or (full text
    tuning, which changes the weights themselves) a frozen copy of the text side taken now."""
    from .models import is_lora

    scale = clip.logit_scale.detach().clone()
    if is_lora(model):
        return Teacher(clip, scale, image_bank, weight, temperature, adapter_model=model)
    # A copy that shares the (locked) image tower and owns its text side.
    shared = {id(clip.vision_model): clip.vision_model, id(clip.visual_projection): clip.visual_projection}
    frozen = copy.deepcopy(clip, shared)
    frozen.text_model.requires_grad_(False)
    frozen.text_projection.requires_grad_(False)
    return Teacher(frozen, scale, image_bank, weight, temperature)


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, reference: str) -> None:
    """The teacher reads the student's token ids: a different vocabulary would make them other words."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(f"recipe key 'train.distill.teacher': {reference!r} has another tokenizer vocabulary "
                          "than model.base; the teacher must read the same token ids as the student")


def loaded_teacher(recipe, student_tokenizer, split_images, student_features, runtime, skips) -> Teacher:
    """A teacher loaded from `train.distill.teacher`, locked, with its image embeddings of the training
    images (the image cache under its own tower fingerprint), in the student's cache row order."""
    from .data import ImageTransform
    from .image_cache import bank_layout, split_image_features
    from .models import image_tower_fingerprint, load_base_model, lock_image_tower
    from .recipe import ModelConfig

    d = recipe.train.distill
    base = load_base_model(ModelConfig(base=d.teacher), seed=recipe.seed)
    check_same_tokenizer(student_tokenizer, base.tokenizer, d.teacher)
    clip = base.clip.to(runtime.device).requires_grad_(False).eval()
    lock_image_tower(clip)
    features = split_image_features(split_images, clip, ImageTransform(base.preprocess), image_tower_fingerprint(clip),
                                    runtime, recipe.cache.dir, recipe.cache.batch_size, recipe.data.num_workers, skips,
                                    recipe.cache.part_size, sharded=True, layout=bank_layout(runtime))
    missing = [i for i in student_features.ids if i not in features.row]
    if missing:  # another preprocessing could fail on an image the student's did not
        raise ConfigError(f"recipe key 'train.distill.teacher': {d.teacher!r} could not embed {len(missing)} training "
                          f"image(s) the student uses (first: image_id {missing[0]})")
    bank = features.embeddings  # in bank_layout, like the student's bank
    if features.ids != student_features.ids:  # an image only the teacher could not embed: reorder (a copy)
        bank = bank[torch.tensor([features.row[i] for i in student_features.ids], device=bank.device)]
    return Teacher(clip, clip.logit_scale.detach().clone(), bank, d.weight, d.temperature)
