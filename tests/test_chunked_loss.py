"""The contrastive and distillation losses in row blocks (loss.chunk) equal the plain N x N computation,
in value and gradient, and their memory is bounded by chunk x N instead of N x N."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnclip.loss import clip_loss, distillation_loss, false_negative_mask

# Independent of the cost in the loss: open_clip-style full matrices through autograd.


def full_clip_loss(img, txt, logit_scale, image_keys=None, text_keys=None):
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = logit_scale.float().exp() * img @ txt.t()
    labels = torch.arange(img.shape[0])
    if image_keys is not None:
        same = false_negative_mask((image_keys, text_keys), (image_keys, text_keys), labels)
        logits = logits.masked_fill(same, float("-inf"))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def full_distillation_loss(img, txt, s_log_scale, t_img, t_txt, t_log_scale):
    img, txt, t_img, t_txt = (F.normalize(x.float(), dim=-1) for x in (img, txt, t_img, t_txt))
    s, t = s_log_scale.exp() * img @ txt.t(), t_log_scale.exp() * t_img @ t_txt.t()

    def kl(teacher, student):
        return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean",
                        log_target=True)

    return (kl(t, s) + kl(t.t(), s.t())) / 2


def inputs(n: int, dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n, dim, generator=gen).requires_grad_()
    txt = torch.randn(n, dim, generator=gen).requires_grad_()
    scale = torch.tensor(math.log(30.0)).requires_grad_()
    # Duplicates to mask: every 5th entry shares its image with the next, every 7th its caption.
    image_keys = torch.arange(n) - (torch.arange(n) % 5 == 1).long()
    text_keys = torch.arange(n) - (torch.arange(n) % 7 == 1).long()
    return img, txt, scale, image_keys, text_keys


def value_and_grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("n,chunk", [(37, 8), (37, 36), (37, 37), (37, 100), (64, 16), (5, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_clip_loss_equals_full_loss(n, chunk, masked):
    img, txt, scale, image_keys, text_keys = inputs(n)
    keys = (image_keys, text_keys) if masked else (None, None)
    want, want_grads = value_and_grads(lambda: full_clip_loss(img, txt, scale, *keys), img, txt, scale)
    got, got_grads = value_and_grads(lambda: clip_loss(img, txt, scale, *keys, chunk=chunk), img, txt, scale)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
    for g, w in zip(got_grads, want_grads):
        assert w.abs().max() > 0
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), (g - w).abs().max()


def test_mask_changes_the_chunked_loss():
    """The mask reaches every block: a duplicate in the last, partial block changes value and gradient."""
    img, txt, scale, _, _ = inputs(11)
    plain = clip_loss(img, txt, scale, torch.arange(11), torch.arange(11), chunk=4)
    image_keys = torch.arange(11)
    image_keys[10] = 9
    masked = clip_loss(img, txt, scale, image_keys, torch.arange(11), chunk=4)
    assert abs(plain.item() - masked.item()) > 1e-4
    assert abs(masked.item() - full_clip_loss(img, txt, scale, image_keys, torch.arange(11)).item()) < 1e-5


@pytest.mark.parametrize("chunk", [0, 3, 7, 50])
def test_chunked_distillation_equals_full_kl(chunk):
    gen = torch.Generator().manual_seed(4)
    img, txt = torch.randn(23, 8, generator=gen).requires_grad_(), torch.randn(23, 8, generator=gen).requires_grad_()
    t_img, t_txt = torch.randn(23, 8, generator=gen), torch.randn(23, 8, generator=gen)
    s_scale, t_scale = torch.tensor(2.0, requires_grad=True), torch.tensor(1.5)
    want, want_grads = value_and_grads(lambda: full_distillation_loss(img, txt, s_scale, t_img, t_txt, t_scale),
                                       img, txt, s_scale)
    got, got_grads = value_and_grads(lambda: distillation_loss(img, txt, s_scale, t_img, t_txt, t_scale, chunk=chunk),
                                     img, txt, s_scale)
    assert want > 0.1
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)
    for g, w in zip(got_grads, want_grads):
        assert w.abs().max() > 0
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), (g - w).abs().max()


def test_bf16_rows_give_a_float32_loss_and_gradients_in_their_dtype():
    img = torch.randn(9, 8).bfloat16().requires_grad_()
    txt = torch.randn(9, 8).bfloat16().requires_grad_()
    loss = clip_loss(img, txt, torch.tensor(1.0), chunk=4)
    loss.backward()
    assert loss.dtype == torch.float32 and img.grad.dtype == torch.bfloat16


PEAK_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loss_memory.py"
DIM = 32  # narrow embeddings, so that the N x N matrices, not the N x D inputs, decide the peak


def peak_growth(n: int, chunk: int | None) -> int:
    """Peak RSS growth (bytes) of one forward + backward at batch n, measured in a fresh process.

    glibc's malloc is told to hand every block over 64 KiB back to the OS when freed, so the peak is
    the memory the loss holds at once, not what the allocator chose to keep around."""
    cmd = [sys.executable, str(PEAK_SCRIPT), "--measure", str(n), "plain" if chunk is None else str(chunk),
           "--repeats", "1", "--dim", str(DIM)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, env=env)
    return json.loads(out.stdout)["peak_growth_bytes"]


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from /proc/self/status, reset via clear_refs")
def test_chunked_loss_memory_is_bounded_by_chunk_times_n():
    """At N = 4096 one N x N float32 matrix is 64 MiB, and the plain loss holds several at once; in
    blocks of 256 rows (4 MiB each) the loss stays within 10 blocks."""
    n, chunk = 4096, 256
    block = chunk * n * 4
    chunked = peak_growth(n, chunk)
    plain = peak_growth(n, None)
    assert plain > 3 * n * n * 4, plain  # the measurement sees the plain loss's N x N matrices
    assert chunked < 10 * block, (chunked, block)


def test_the_loss_stays_float32_inside_an_autocast_region():
    img, txt, scale, image_keys, text_keys = inputs(40, dim=64, seed=2)
    want = clip_loss(img, txt, scale, image_keys, text_keys, chunk=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = clip_loss(img, txt, scale, image_keys, text_keys, chunk=16)
        got.backward()
    assert abs(got.item() - want.item()) < 1e-6 and img.grad.dtype == torch.float32
