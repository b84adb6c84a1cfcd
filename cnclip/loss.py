"""Symmetric InfoNCE for CLIP, with false negatives masked out, on one process or many.

In MUGE one text has several images and an image can belong to several texts, and crawled data
repeats captions. When two batch entries share an image or have the same text, pushing them apart
would punish the model for being right; those off-diagonal logits are masked out of both
softmaxes, so each is neither a positive nor a negative for the other.

Under torch.distributed every rank holds a slice of the global batch. `gather_features` (the only
place that communicates) collects embeddings and keys from all ranks, text embeddings with their
autograd graph; each rank then takes the loss of its own rows against every column of the global
batch (open_clip's "local loss"). The global loss is the mean of the rank losses, and averaging the
parameter gradients over ranks gives exactly the single-process gradient of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed


def false_negative_mask(row_keys: tuple[torch.Tensor, torch.Tensor], column_keys: tuple[torch.Tensor, torch.Tensor],
                        positives: torch.Tensor) -> torch.Tensor:
    """True where column j is a false negative for row i: the same image or the same text as row i's
    pair, but not that pair itself (column positives[i]). Keys are (image keys, text keys)."""
    same = ((row_keys[0][:, None] == column_keys[0][None, :])
            | (row_keys[1][:, None] == column_keys[1][None, :]))
    same[torch.arange(positives.shape[0], device=same.device), positives] = False
    return same


def _rows_loss(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    keys_rows: tuple[torch.Tensor, torch.Tensor] | None,
    keys_all: tuple[torch.Tensor, torch.Tensor] | None,
    offset: int,
) -> torch.Tensor:
    """Symmetric cross-entropy of rows offset..offset+n of the global batch against all columns.

    Inputs are L2-normalised float32; entry offset+i of the global batch is row i's positive.
    """
    n = image_rows.shape[0]
    scale = logit_scale.float().exp()
    logits_i2t = scale * image_rows @ text_all.t()
    logits_t2i = scale * text_rows @ image_all.t()
    labels = torch.arange(offset, offset + n, device=logits_i2t.device)
    if keys_rows is not None and keys_all is not None:
        same = false_negative_mask(keys_rows, keys_all, labels)
        logits_i2t = logits_i2t.masked_fill(same, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(same, float("-inf"))
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    image_keys: torch.Tensor | None = None,
    text_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the batch, in float32.

    `logit_scale` is the log-parametrised temperature (the model's `logit_scale`); entry i of the
    image and text batches is a positive pair. Keys identify images / texts for masking.
    """
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    keys = (image_keys, text_keys) if image_keys is not None and text_keys is not None else None
    return _rows_loss(image_emb, text_emb, image_emb, text_emb, logit_scale, keys, keys, 0)


@dataclass
class GlobalBatch:
    """The global batch as every rank sees it after gathering, and where this rank's rows sit."""

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    image_keys: torch.Tensor | None
    text_keys: torch.Tensor | None
    offset: int


def gather_features(image_emb: torch.Tensor, text_emb: torch.Tensor, image_keys: torch.Tensor | None = None,
                    text_keys: torch.Tensor | None = None) -> GlobalBatch:
    """Collect embeddings and keys from every rank, in rank order; tensors that need gradients keep them.

    Keys are gathered too, so false negatives are masked across ranks (a caption on rank 0 and
    the same caption on rank 1 are not pushed apart). Every rank must hold the same number of rows.
    """
    n = image_emb.shape[0]
    return GlobalBatch(
        image_emb=distributed.all_gather(image_emb),
        text_emb=distributed.all_gather(text_emb),
        image_keys=None if image_keys is None else distributed.all_gather_no_grad(image_keys),
        text_keys=None if text_keys is None else distributed.all_gather_no_grad(text_keys),
        offset=distributed.rank() * n,
    )


def distributed_clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    image_keys: torch.Tensor | None = None,
    text_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's share of the global-batch loss (== clip_loss on a single process).

    Rows are this rank's pairs, columns the whole global batch. The mean over ranks of the
    returned values is clip_loss of the global batch; average parameter gradients over ranks
    (distributed.average_gradients) to get its gradient.
    """
    if not distributed.is_distributed():
        return clip_loss(image_emb, text_emb, logit_scale, image_keys, text_keys)
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    world = gather_features(image_emb, text_emb, image_keys, text_keys)
    keys = (image_keys, text_keys) if image_keys is not None and text_keys is not None else None
    keys_all = (world.image_keys, world.text_keys) if keys is not None else None
    return _rows_loss(image_emb, text_emb, world.image_emb, world.text_emb, logit_scale, keys, keys_all,
                      world.offset)


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) between the rows' softmax distributions, float32.

    Written out (sum_j p_t (log p_t - log p_s)) rather than through F.kl_div, which the tests use as
    the independent reference.
    """
    log_p_teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    log_p_student = F.log_softmax(student_logits.float(), dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()


def _distill_scales(logit_scale: torch.Tensor, teacher_logit_scale: torch.Tensor,
                    temperature: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) multipliers of the cosine similarities: each model's own learned temperature,
    or 1/temperature for both when one is given."""
    if temperature is not None:
        fixed = torch.tensor(1.0 / temperature, device=logit_scale.device)
        return fixed, fixed
    return logit_scale.float().exp(), teacher_logit_scale.detach().float().exp()


def distillation_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_image_emb: torch.Tensor,
    teacher_text_emb: torch.Tensor,
    teacher_logit_scale: torch.Tensor,
    temperature: float | None = None,
) -> torch.Tensor:
    """This rank's share of KL(teacher || student) over the in-batch similarity distributions.

    Both directions, like the contrastive loss: each image's distribution over the global batch's
    texts and each text's over its images, averaged. Rows are this rank's pairs, columns the global
    batch (gathered as in distributed_clip_loss, teacher embeddings without gradient), so the mean
    over ranks is the single-process value and averaged gradients are its gradient. The teacher's
    distribution uses the teacher's logit scale (or `temperature` for both). No false-negative
    mask: a soft target already gives a duplicate caption or image the same probability as its twin,
    so matching it never pushes duplicates apart. Teacher embeddings are constants here.
    """
    s_img, s_txt = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    t_img = F.normalize(teacher_image_emb.detach().float(), dim=-1)
    t_txt = F.normalize(teacher_text_emb.detach().float(), dim=-1)
    s_img_all, s_txt_all = distributed.all_gather(s_img), distributed.all_gather(s_txt)
    t_img_all, t_txt_all = distributed.all_gather_no_grad(t_img), distributed.all_gather_no_grad(t_txt)
    s_scale, t_scale = _distill_scales(logit_scale, teacher_logit_scale, temperature)
    i2t = kl_rows(t_scale * t_img @ t_txt_all.t(), s_scale * s_img @ s_txt_all.t())
    t2i = kl_rows(t_scale * t_txt @ t_img_all.t(), s_scale * s_txt @ s_img_all.t())
    return (i2t + t2i) / 2
