"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): a contrastive batch far larger than the text tower's activations allow.

The contrastive loss couples every pair in the batch, but it only needs the *embeddings*, which are
small. So: (1) embed the whole batch chunk by chunk without building a graph; (2) compute the loss
on the embeddings and its gradient with respect to them; (3) re-run each chunk with a graph and
back-propagate that cached gradient. Peak activation memory is one chunk's; the parameter gradient
is the gradient of the full-batch loss, at the cost of a second forward pass.

For the gradient to be exact the re-run must reproduce the first pass bit for bit, dropout included:
the random-number state is captured before each chunk's first pass and restored for its re-run (the
GradCache reference implementation's RandContext), inside `fork_rng` so the global generator ends
where the first pass left it.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch

Batch = dict[str, torch.Tensor]


class RandState:
    """The CPU generator's state and that of the CUDA devices a chunk runs on."""

    def __init__(self, devices: list[int]):
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the captured state; the generators are put back afterwards."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, s in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(s, d)
            yield


def split_batch(batch: Batch, chunk_size: int) -> list[Batch]:
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + chunk_size] for k, v in batch.items()} for i in range(0, n, chunk_size)]


def _cuda_devices(batch: Batch) -> list[int]:
    return sorted({torch.cuda.current_device() if v.device.index is None else v.device.index
                   for v in batch.values() if v.device.type == "cuda"})


def cached_backward(
    embed: Callable[[Batch], torch.Tensor],
    batch: Batch,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
    no_sync: Callable[[], ContextManager] | None = None,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Accumulate into `.grad` the parameter gradient of loss_fn(embed(batch)), chunk by chunk.

    `embed` maps a batch (dict of row-aligned tensors) to embeddings with a graph to the trainable
    parameters; `loss_fn` maps the concatenated embeddings to a scalar loss (it may involve other
    parameters, e.g. the temperature, whose gradient it accumulates directly, and collectives:
    it is called exactly once). `no_sync` (DDP's, when `embed` runs a DDP module): every chunk's
    re-run but the last runs under it, so the gradients add up locally and the last chunk's
    backward all-reduces the sum once. `scale` (fp16's GradScaler.scale) multiplies the loss before
    its backward, so every gradient, the cached one included, is the scaled loss's. Returns the loss,
    detached and unscaled.
    """
    chunks = split_batch(batch, chunk_size)
    devices = _cuda_devices(batch)
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandState(devices))
            reps.append(embed(chunk))
    # The cached gradient d loss / d embeddings is float32 whatever the autocast dtype: it is cast to
    # the embeddings' dtype only where the full-batch graph casts it too (entering the text tower's
    # last op), so chunking adds no rounding of its own there. What remains under bf16 is the
    # rounding of each chunk's parameter gradient before the chunks are summed (tests/test_gradcache.py).
    reps_leaf = torch.cat(reps).detach().float().requires_grad_(True)
    loss = loss_fn(reps_leaf)
    (loss if scale is None else scale(loss)).backward()
    grads = reps_leaf.grad.split([r.shape[0] for r in reps])
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        with no_sync() if no_sync is not None and i < len(chunks) - 1 else nullcontext():
            with state.replay():
                rep = embed(chunk)
            rep.backward(gradient=grad.to(rep.dtype))
    return loss.detach()
