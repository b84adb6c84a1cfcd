"""Symmetric InfoNCE for CLIP, with false negatives masked out, on one process or many, in row blocks.

In MUGE one text has several images and an image can belong to several texts, and crawled data
repeats captions. When two batch entries share an image or have the same text, pushing them apart
would punish the model for being right; those off-diagonal logits are masked out of both
softmaxes, so each is neither a positive nor a negative for the other.

Under torch.distributed every rank holds a slice of the global batch. `gather_features` (the only
place that communicates) collects keys from all ranks, text embeddings with their autograd graph,
and image embeddings -- or, when the caller passes the image bank that every rank holds (the
trainer's cached embeddings), nothing but the int64 image keys: the global batch's image embeddings
are then the bank's rows at the gathered keys, taken locally. Each rank then takes the loss of its own
rows against every column of the global batch (open_clip's "local loss"). The global loss is the
mean of the rank losses, and averaging the parameter gradients over ranks gives exactly the
single-process gradient of the global batch.

Memory: every loss here (`clip_loss`, `distributed_clip_loss`, `distillation_loss`) is exact and is
computed `chunk` rows at a time (`_BlockSoftmaxLoss`): the forward keeps only each row's loss, the
backward recomputes each block's logits, so the largest similarity matrix ever held is chunk x N
(N columns: the global batch), a few of them at once, instead of several N x N matrices plus the
saved softmax. chunk=0 takes all rows in one block. The value and gradients equal the plain
N x N computation up to float rounding (tests/test_chunked_loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import distributed


def false_negative_mask(row_keys: tuple[torch.Tensor, torch.Tensor], column_keys: tuple[torch.Tensor, torch.Tensor],
                        positives: torch.Tensor) -> torch.Tensor:
    """True where column j is a false negative for row i: the same image or the same text as row i's
    pair, but not that pair itself (column positives[i]). Keys are (image keys, text keys)."""
    same = ((row_keys[0][:, None] == column_keys[0][None, :])
            | (row_keys[1][:, None] == column_keys[1][None, :]))
    same[torch.arange(positives.shape[0], device=same.device), positives] = False
    return same


class _RowTargets(Protocol):
    """What rows start:stop of a row-softmax loss are compared with (see _BlockSoftmaxLoss)."""

    def mask(self, logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The block's logits with the entries that leave the softmax set to -inf (in place)."""

    def loss(self, logits: torch.Tensor, lse: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The sum of the block's row losses, given its (masked) logits and their row logsumexp."""

    def subtract_target(self, softmax: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """d(sum of the block's row losses) / d(logits): the block's softmax minus the target, in place."""


@dataclass
class _Labels:
    """Cross-entropy: row i's positive is column offset+i; false negatives (keys) leave the softmax."""

    offset: int
    row_keys: tuple[torch.Tensor, torch.Tensor] | None
    column_keys: tuple[torch.Tensor, torch.Tensor] | None

    def _labels(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.offset + start, self.offset + stop, device=device)

    def mask(self, logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.row_keys is None or self.column_keys is None:
            return logits
        rows = (self.row_keys[0][start:stop], self.row_keys[1][start:stop])
        same = false_negative_mask(rows, self.column_keys, self._labels(start, stop, logits.device))
        return logits.masked_fill_(same, float("-inf"))

    def loss(self, logits: torch.Tensor, lse: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        positive = logits.gather(1, self._labels(start, stop, logits.device)[:, None]).squeeze(1)
        return (lse - positive).sum()

    def subtract_target(self, softmax: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(stop - start, device=softmax.device)
        softmax[rows, self._labels(start, stop, softmax.device)] -= 1.0
        return softmax


@dataclass
class _Teacher:
    """KL(teacher || student) per row: the teacher's logits are scale * rows @ columns.T (constants)."""

    rows: torch.Tensor
    columns: torch.Tensor
    scale: torch.Tensor

    def _log_p(self, start: int, stop: int) -> torch.Tensor:
        # The same operations as the student's side: a student equal to its teacher gets exactly 0.
        logits = _block_logits(self.rows, self.columns, self.scale, start, stop)
        return logits.sub_(torch.logsumexp(logits, dim=1, keepdim=True))

    def mask(self, logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return logits

    def loss(self, logits: torch.Tensor, lse: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        log_p_teacher = self._log_p(start, stop)
        log_p_student = logits.sub_(lse[:, None])
        return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()

    def subtract_target(self, softmax: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return softmax.sub_(self._log_p(start, stop).exp_())


class _BlockSoftmaxLoss(torch.autograd.Function):
    """mean_i loss_i(scale * rows_i @ columns.T), taken `chunk` rows at a time; backward recomputes.

    Forward keeps the inputs and each row's logsumexp (n floats); backward recomputes each block's
    logits, turns them into the block's gradient in place (softmax minus target), then adds G @ columns,
    G.T @ rows and the scale's share. Memory: a few chunk x N float32 blocks at a time, never N x N.
    Inputs are float32 (rows n x D, columns N x D, scale a 0-d tensor); rows and columns may be the
    same tensor (autograd adds both gradients). Computed in float32 even inside an autocast region.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor, targets: _RowTargets,
                chunk: int) -> torch.Tensor:
        n = rows.shape[0]
        chunk = chunk if chunk > 0 else max(n, 1)
        total, lse = rows.new_zeros(()), rows.new_empty(n)
        with torch.autocast(rows.device.type, enabled=False):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                logits = targets.mask(_block_logits(rows, columns, scale, start, stop), start, stop)
                lse[start:stop] = torch.logsumexp(logits, dim=1)
                total += targets.loss(logits, lse[start:stop], start, stop)
        ctx.save_for_backward(rows, columns, scale, lse)
        ctx.targets, ctx.chunk = targets, chunk
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _BlockSoftmaxLoss._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        rows, columns, scale, lse = ctx.saved_tensors
        targets, chunk, n = ctx.targets, ctx.chunk, rows.shape[0]
        need_rows, need_columns, need_scale = ctx.needs_input_grad[:3]
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_columns = torch.zeros_like(columns) if need_columns else None
        grad_scale = torch.zeros_like(scale) if need_scale else None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = targets.mask(_block_logits(rows, columns, scale, start, stop), start, stop)
            softmax = logits.sub_(lse[start:stop, None]).exp_()  # masked entries: exp(-inf) = 0
            g = targets.subtract_target(softmax, start, stop).mul_(grad_out / n)  # d loss / d logits
            if need_rows or need_scale:
                g_columns = g @ columns
                if need_rows:
                    grad_rows[start:stop] = scale * g_columns
                if need_scale:  # d logits / d scale = rows @ columns.T, so sum(g * that) = sum(rows * g_columns)
                    grad_scale += (rows[start:stop] * g_columns).sum()
            if need_columns:
                grad_columns.addmm_(g.t(), rows[start:stop])  # times scale once, below
        if need_columns:
            grad_columns.mul_(scale)
        return grad_rows, grad_columns, grad_scale, None, None


def _block_logits(rows: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return (rows[start:stop] @ columns.t()).mul_(scale)


def _rows_loss(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    keys_rows: tuple[torch.Tensor, torch.Tensor] | None,
    keys_all: tuple[torch.Tensor, torch.Tensor] | None,
    offset: int,
    chunk: int = 0,
) -> torch.Tensor:
    """Symmetric cross-entropy of rows offset..offset+n of the global batch against all columns.

    Inputs are L2-normalised float32; entry offset+i of the global batch is row i's positive. Both
    directions are taken `chunk` rows at a time (0: all at once); the mask is the same for both.
    """
    scale = logit_scale.float().exp()
    targets = _Labels(offset, keys_rows, keys_all)
    i2t = _BlockSoftmaxLoss.apply(image_rows, text_all, scale, targets, chunk)
    t2i = _BlockSoftmaxLoss.apply(text_rows, image_all, scale, targets, chunk)
    return (i2t + t2i) / 2


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    image_keys: torch.Tensor | None = None,
    text_keys: torch.Tensor | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the batch, in float32.

    `logit_scale` is the log-parametrised temperature (the model's `logit_scale`); entry i of the
    image and text batches is a positive pair. Keys identify images / texts for masking. `chunk`:
    rows per block (memory chunk x N instead of N x N; 0 = one block), the same value either way.
    """
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    keys = (image_keys, text_keys) if image_keys is not None and text_keys is not None else None
    return _rows_loss(image_emb, text_emb, image_emb, text_emb, logit_scale, keys, keys, 0, chunk)


@dataclass
class GlobalBatch:
    """The global batch as every rank sees it after gathering, and where this rank's rows sit."""

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    image_keys: torch.Tensor | None
    text_keys: torch.Tensor | None
    offset: int


def bank_rows(image_bank: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The bank's rows `rows`, L2-normalised in float32 (the loss's form of an image embedding)."""
    return F.normalize(image_bank[rows.to(image_bank.device)].float(), dim=-1)


def gather_features(image_emb: torch.Tensor, text_emb: torch.Tensor, image_keys: torch.Tensor | None = None,
                    text_keys: torch.Tensor | None = None, image_bank: torch.Tensor | None = None) -> GlobalBatch:
    """Collect embeddings and keys from every rank, in rank order; tensors that need gradients keep them.

    Keys are gathered too, so false negatives are masked across ranks (a caption on rank 0 and
    the same caption on rank 1 are not pushed apart). Every rank must hold the same number of rows.
    With `image_bank` (held whole by every rank; `image_keys` are its rows, `image_emb` its normalised
    rows at them) the image embeddings are not sent: they are `bank_rows` at the gathered keys.
    """
    n = image_emb.shape[0]
    image_keys_all = None if image_keys is None else distributed.all_gather_no_grad(image_keys)
    if image_bank is not None:
        if image_keys_all is None:
            raise ValueError("gather_features: image_bank needs image_keys, the rows of the bank")
        image_all = bank_rows(image_bank, image_keys_all)
    else:
        image_all = distributed.all_gather(image_emb)
    return GlobalBatch(
        image_emb=image_all,
        text_emb=distributed.all_gather(text_emb),
        image_keys=image_keys_all,
        text_keys=None if text_keys is None else distributed.all_gather_no_grad(text_keys),
        offset=distributed.rank() * n,
    )


def distributed_clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    image_keys: torch.Tensor | None = None,
    text_keys: torch.Tensor | None = None,
    image_bank: torch.Tensor | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """This rank's share of the global-batch loss (== clip_loss on a single process).

    Rows are this rank's pairs, columns the whole global batch. The mean over ranks of the
    returned values is clip_loss of the global batch; average parameter gradients over ranks
    (distributed.average_gradients) to get its gradient. `image_bank`: see gather_features.
    """
    if not distributed.is_distributed():
        return clip_loss(image_emb, text_emb, logit_scale, image_keys, text_keys, chunk)
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    world = gather_features(image_emb, text_emb, image_keys, text_keys, image_bank)
    keys = (image_keys, text_keys) if image_keys is not None and text_keys is not None else None
    keys_all = (world.image_keys, world.text_keys) if keys is not None else None
    return _rows_loss(image_emb, text_emb, world.image_emb, world.text_emb, logit_scale, keys, keys_all,
                      world.offset, chunk)


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
    image_keys: torch.Tensor | None = None,
    image_bank: torch.Tensor | None = None,
    teacher_image_bank: torch.Tensor | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """This rank's share of KL(teacher || student) over the in-batch similarity distributions.

    Both directions, like the contrastive loss: each image's distribution over the global batch's
    texts and each text's over its images, averaged. Rows are this rank's pairs, columns the global
    batch (gathered as in distributed_clip_loss, teacher embeddings without gradient), so the mean
    over ranks is the single-process value and averaged gradients are its gradient. The teacher's
    distribution uses the teacher's logit scale (or `temperature` for both). No false-negative
    mask: a soft target already gives a duplicate caption or image the same probability as its twin,
    so matching it never pushes duplicates apart. Teacher embeddings are constants here.
    With `image_bank` and `teacher_image_bank` (row-aligned banks every rank holds, `image_keys` their
    rows) the image columns are taken from the banks at the gathered keys instead of being gathered.
    `chunk`: rows per block, as in clip_loss.
    """
    s_img, s_txt = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    t_img = F.normalize(teacher_image_emb.detach().float(), dim=-1)
    t_txt = F.normalize(teacher_text_emb.detach().float(), dim=-1)
    s_txt_all, t_txt_all = distributed.all_gather(s_txt), distributed.all_gather_no_grad(t_txt)
    if image_bank is not None and distributed.is_distributed():
        if teacher_image_bank is None or image_keys is None:
            raise ValueError("distillation_loss: image_bank needs teacher_image_bank and image_keys (the banks' rows)")
        keys_all = distributed.all_gather_no_grad(image_keys)
        s_img_all, t_img_all = bank_rows(image_bank, keys_all), bank_rows(teacher_image_bank, keys_all)
    else:  # one process: the columns are the rows; several without banks: gathered
        s_img_all, t_img_all = distributed.all_gather(s_img), distributed.all_gather_no_grad(t_img)
    s_scale, t_scale = _distill_scales(logit_scale, teacher_logit_scale, temperature)
    i2t = _BlockSoftmaxLoss.apply(s_img, s_txt_all, s_scale, _Teacher(t_img, t_txt_all, t_scale), chunk)
    t2i = _BlockSoftmaxLoss.apply(s_txt, s_img_all, s_scale, _Teacher(t_txt, t_img_all, t_scale), chunk)
    return (i2t + t2i) / 2
