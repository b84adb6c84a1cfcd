"""One command that proves cnclip's GPU paths on the machine at hand; prints one JSON summary.

    python benchmarks/gpu_check.py                # on a GPU: ViT-B/16 + RoBERTa-base shapes, a few minutes
    python benchmarks/gpu_check.py --cpu          # the same checks on small shapes on the CPU (auto without CUDA)
    python benchmarks/gpu_check.py --only packed_text,grad_cache --out check.json

Every check compares two computations and reports {"status": "ok" | "failed" | "skipped", numbers, "reason"}:

* environment: torch / transformers / peft versions; on a GPU, the device's compute capability against
  the kernels the torch build carries (cnclip.runtime.cuda_build_runs_on over torch.cuda.get_arch_list()),
  a matmul on the device against the CPU's, native bf16, whether training turns TF32 on.
* packed_text: cnclip.packed_text.encode_texts_packed against the model's own forward (models.encode_texts):
  embeddings and LoRA gradients, in float32 (TF32 off) within 1e-4 of the largest
  entry, and under bf16 autocast within twice what bf16 itself moves the plain forward from float32.
  Fails if the packed path is not taken (supports_packing false: the comparison would be plain vs plain).
* grad_cache: train_step.contrastive_step with train.grad_cache_chunk (4 chunks) against the full batch:
  the loss and every gradient, float32 within 1e-4; under bf16 within 2**-6 and within what bf16 moves the
  full-batch gradient from float32 (tests/test_gradcache.py states the same bounds).
* syncs_per_step (CUDA only): host-device synchronisations counted by torch.cuda.set_sync_debug_mode("warn")
  over steps of the trainer's own step (FinetuneRun._step, as benchmarks/train_throughput.py runs it):
  at most the one the trainer documents (its finiteness check). The control is the same step's
  contrastive_step without the host copy of the attention mask, which must show more: the count sees syncs.
* loss_memory: peak memory (torch.cuda.max_memory_allocated above the inputs) of the contrastive loss's
  forward and backward at global batches 8k, 16k and 32k (256 / 512 / 1024 with --cpu, where no allocator
  statistics exist and only the values are compared), in one block (chunk 0) and in row blocks
  (train.loss_chunk's default on a GPU), each against a float64 reference written out here, and the
  blocked loss and gradient against the one-block one's (float32, within 1e-5 / 1e-4). A one-block loss
  that runs out of memory is reported, not failed, when the blocked one fits.
* demo: recipes/demo.yaml in bf16 on a GPU (10 epochs; fp32 and one epoch with --cpu) with train.deterministic; the
  mean recall after training must beat the one before, and the same command run again must train nothing
  (summary steps_this_run 0) and leave the checkpoint and best/ byte-identical.
* compile: the text tower compiled as train.compile does it (prepare_text_tower; with --cpu, Module.compile
  with dynamo's "eager" backend: inductor's C++ build takes minutes on a small CPU): embeddings and
  gradients equal the eager tower's (float32, within 1e-4), at two caption lengths (one with --cpu). The compiled
  grad-cache step's relative difference from the full batch is reported (README: approximate under compile).
* sigkill_resume: the demo command killed with SIGKILL in a step after its first checkpoint
  (CNCLIP_CRASH_AT, cnclip/faults.py), then run again: it resumes and ends with trainable weights
  bit-identical to the uninterrupted demo run's (train.deterministic).
* throughput: benchmarks/train_throughput.py at ViT-B/16 + RoBERTa-base shapes (its --small 2-layer
  towers with --cpu): cnclip's step (the trainer's) must be faster than the plain transformers + peft
  loop, and each loop's FLOP rate a fraction in (0, 1.5] of the matmul ceiling in the dtype that runs.

--cpu runs on one thread (small shapes gain nothing from more, and a shared CI machine loses much
to spinning OpenMP threads). The exit status is 0 when no check failed, 1 otherwise. Checks run one
after another; each reports its seconds. A check that needs CUDA reports "skipped" with the reason
on a CPU. docs/scaling.md ("Checking a GPU") has the same list as a table.
"""

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import train_throughput as bench  # noqa: E402
from cnclip.checkpoint import latest_checkpoint  # noqa: E402
from cnclip.data import gather_tokens  # noqa: E402
from cnclip.faults import ENV as CRASH_ENV  # noqa: E402
from cnclip.global_state import torch_threads  # noqa: E402
from cnclip.loss import clip_loss  # noqa: E402
from cnclip.models import attach_text_tuning, encode_texts, lock_image_tower  # noqa: E402
from cnclip.packed_text import encode_texts_packed, supports_packing  # noqa: E402
from cnclip.recipe import ModelConfig  # noqa: E402
from cnclip.errors import CnclipError  # noqa: E402
from cnclip.runtime import Runtime, cuda_build_runs_on, float32_matmuls, native_bf16, pick_runtime  # noqa: E402
from cnclip.train_step import contrastive_step, prepare_text_tower  # noqa: E402

DEMO_RECIPE = REPO / "recipes" / "demo.yaml"
TINY_MODEL = REPO / "recipes" / "models" / "tiny"


@dataclass
class Shapes:
    """The sizes one mode runs at."""

    captions: int  # batch of the packed-text, grad-cache and compile checks
    context_length: int
    sync_batch: int  # batch of the sync-counting steps
    loss_sizes: tuple[int, ...]  # global batches of the loss-memory check
    loss_dim: int
    loss_chunk: int
    compile_lengths: tuple[int, ...]  # caption lengths the compiled tower runs at (each a compilation)
    demo: list[str] = field(default_factory=list)  # recipe overrides of the demo runs
    crash_step: int = 0  # the demo step SIGKILL lands in (after the first checkpoint)
    throughput: list[str] = field(default_factory=list)  # benchmarks/train_throughput.py arguments


# The demo (1080 pairs, batch 64) takes 16 steps an epoch and checkpoints at every epoch end: step 20 is
# in the second epoch (GPU: 10 of the recipe's 30 epochs, to stay within minutes); with --cpu one epoch,
# checkpointed every 4 steps, killed in step 6.
GPU_SHAPES = Shapes(captions=64, context_length=52, sync_batch=256, loss_sizes=(8192, 16384, 32768), loss_dim=512,
                    loss_chunk=2048, compile_lengths=(26, 52), demo=["train.precision=bf16", "train.epochs=10"], crash_step=20,
                    throughput=["--batch", "128", "--steps", "5", "--scenarios", "short,max", "--no-distill",
                                "--context-lengths", "none"])
CPU_SHAPES = Shapes(captions=8, context_length=24, sync_batch=8, loss_sizes=(256, 512, 1024), loss_dim=32,
                    loss_chunk=96, compile_lengths=(24,), demo=["train.precision=fp32", "train.epochs=1", "train.save_every=4",
                                         "eval.batch_size=128"], crash_step=6,
                    throughput=["--small", "--batch", "2", "--steps", "1", "--cache-batch", "8", "--matmul-size", "512",
                                "--no-memory",
                                "--no-distill", "--context-lengths", "none"])


@dataclass
class Context:
    """What the checks share: the mode, the runtime, a work directory and the model they start from."""

    cpu: bool
    runtime: Runtime
    shapes: Shapes
    work: Path
    _pristine: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def pristine(self) -> torch.nn.Module:
        """A random ChineseCLIPModel on the device: ViT-B/16 + RoBERTa-base shapes, or the demo's tiny one."""
        if self._pristine is None:
            from transformers import ChineseCLIPConfig, ChineseCLIPModel

            config = ChineseCLIPConfig.from_pretrained(TINY_MODEL) if self.cpu else bench.model_config(small=False)
            torch.manual_seed(0)
            self._pristine = ChineseCLIPModel(config).to(self.device)
        return self._pristine


# ---- results


def ok_if(passed: bool, why_not: str, **numbers) -> dict:
    return {"status": "ok" if passed else "failed", **numbers, **({} if passed else {"reason": why_not})}


def skipped(reason: str, **numbers) -> dict:
    return {"status": "skipped", "reason": reason, **numbers}


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the largest |b|: a difference at the scale of the values compared."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def worst_relative_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys() or not a:
        raise AssertionError(f"different or no gradients: {sorted(a)[:3]} vs {sorted(b)[:3]}")
    return max(relative_diff(a[k], b[k]) for k in a)


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 matmuls on CUDA for the block (no TF32: the equality checks compare algorithms, not
    TF32's rounding), the previous setting restored after; through the API cnclip.runtime uses
    (torch >= 2.9 refuses to mix it with the legacy allow_tf32 flag)."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the models and batches the checks run on


def lora_text_model(ctx: Context):
    """(clip, peft model, trainable parameters by name) with LoRA on every text matrix, B drawn non-zero
    so that every LoRA weight gets a gradient; the image tower locked."""
    clip = copy.deepcopy(ctx.pristine())
    cfg = ModelConfig(lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])
    torch.manual_seed(0)
    model = attach_text_tuning(clip, cfg).to(ctx.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    lock_image_tower(clip)
    return clip, model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def captions(ctx: Context, n: int, seed: int = 0, context_length: int | None = None) -> dict[str, torch.Tensor]:
    """`n` captions of uneven length (the benchmark's "short" ones), trimmed to the longest, on the device."""
    length = context_length or ctx.shapes.context_length
    vocab = ctx.pristine().config.text_config.vocab_size
    tokens = bench.make_captions(n, "short", torch.Generator().manual_seed(seed), length, vocab_size=vocab)
    return gather_tokens(tokens, torch.arange(n), ctx.device)


def embed_and_grads(encode: Callable, clip, params: dict, tokens: dict, runtime: Runtime):
    """The embeddings of `tokens` and the gradients of a fixed weighted sum of them."""
    for p in params.values():
        p.grad = None
    with runtime.autocast():
        emb = encode(clip, **tokens)
    weights = torch.linspace(-1, 1, emb.numel(), device=emb.device).view_as(emb)
    (emb.float() * weights).sum().backward()
    return emb.detach().float(), {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}


def bf16_runtime(ctx: Context) -> Runtime:
    return Runtime(ctx.device, torch.bfloat16)


def fp32_runtime(ctx: Context) -> Runtime:
    return Runtime(ctx.device, None)


# ---- the checks


def check_environment(ctx: Context) -> dict:
    out: dict = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "datasets", "onnxruntime", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if ctx.cpu:
        out["cuda_available"] = torch.cuda.is_available()
        missing = [n for n in ("transformers", "peft") if out[n] is None]
        return ok_if(not missing, f"not importable: {missing}", **out)
    device = ctx.device
    major, minor = torch.cuda.get_device_capability(device)
    arch_list = torch.cuda.get_arch_list()
    kernels = cuda_build_runs_on(arch_list, (major, minor))
    with float32_matmuls(device, deterministic=False) as tf32:  # what training turns on
        pass
    out.update(device=torch.cuda.get_device_name(device), capability=f"{major}.{minor}", arch_list=arch_list,
               cuda=torch.version.cuda, build_has_kernels=kernels, native_bf16=native_bf16(device),
               bf16_supported=torch.cuda.is_bf16_supported(), tf32_in_training=tf32,
               runtime_precision=ctx.runtime.precision)
    # A real kernel launch: an arch list can name the device and still fail on a driver too old for the build.
    a = torch.randn(64, 64, device=device)
    launched = bool(torch.allclose((a @ a).cpu(), a.cpu() @ a.cpu(), atol=1e-2, rtol=1e-2))
    out["matmul_matches_cpu"] = launched
    return ok_if(kernels and launched,
                 f"torch {torch.__version__} carries no kernels for capability {major}.{minor} ({arch_list})"
                 if not kernels else "a matmul on the device differs from the CPU's", **out)


def check_packed_text(ctx: Context) -> dict:
    clip, model, params = lora_text_model(ctx)
    model.eval()  # dropout off: both paths are then the same function
    if not supports_packing(clip):
        return ok_if(False, "supports_packing(clip) is false with this transformers: the packed path falls back "
                            "to the plain forward, so there is nothing to compare")
    tokens = captions(ctx, ctx.shapes.captions)
    padding = 1 - float(tokens["attention_mask"].float().mean())
    out: dict = {"captions": ctx.shapes.captions, "padded_length": tokens["input_ids"].shape[1],
                 "padding_fraction": round(padding, 3)}
    with ieee_float32():
        plain_emb, plain = embed_and_grads(encode_texts, clip, params, tokens, fp32_runtime(ctx))
        packed_emb, packed = embed_and_grads(encode_texts_packed, clip, params, tokens, fp32_runtime(ctx))
        bf_plain_emb, bf_plain = embed_and_grads(encode_texts, clip, params, tokens, bf16_runtime(ctx))
        bf_packed_emb, bf_packed = embed_and_grads(encode_texts_packed, clip, params, tokens, bf16_runtime(ctx))
    fp32 = {"embedding": relative_diff(packed_emb, plain_emb), "gradient": worst_relative_diff(packed, plain)}
    bf16_noise = {"embedding": relative_diff(bf_plain_emb, plain_emb), "gradient": worst_relative_diff(bf_plain, plain)}
    bf16 = {"embedding": relative_diff(bf_packed_emb, bf_plain_emb), "gradient": worst_relative_diff(bf_packed, bf_plain)}
    out.update(fp32_relative_diff=fp32, bf16_relative_diff=bf16, bf16_vs_fp32_relative_diff=bf16_noise)
    fp32_ok = max(fp32.values()) < 1e-4
    bf16_ok = all(bf16[k] <= max(2 * bf16_noise[k], 1e-3) for k in bf16)
    return ok_if(padding > 0.2 and fp32_ok and bf16_ok,
                 "packed differs from the plain forward beyond the bounds (float32: 1e-4; bf16: twice bf16's own "
                 "difference from float32)" if padding > 0.2 else "the batch has too little padding to test", **out)


def step_gradients(clip, params: dict, batch: dict, runtime: Runtime, chunk: int) -> tuple[float, dict]:
    for p in params.values():
        p.grad = None
    torch.manual_seed(7)
    loss = contrastive_step(clip, list(params.values()), batch["tokens"], batch["image_emb"], batch["image_keys"],
                            batch["text_keys"], runtime, grad_cache_chunk=chunk, packed=batch.get("packed", True))
    return float(loss), {n: p.grad.detach().clone() for n, p in params.items()}


def contrastive_batch(ctx: Context, clip, n: int) -> dict:
    gen = torch.Generator().manual_seed(3)
    keys = torch.arange(n)
    return {"tokens": captions(ctx, n, seed=1), "packed": True,
            "image_emb": torch.randn(n, clip.config.projection_dim, generator=gen).to(ctx.device),
            "image_keys": (keys // 2).to(ctx.device),  # pairs 2k and 2k+1 share an image: masked false negatives
            "text_keys": keys.to(ctx.device)}


def check_grad_cache(ctx: Context) -> dict:
    clip, model, params = lora_text_model(ctx)
    model.eval()  # no dropout: one full-batch pass is the exact reference
    n = ctx.shapes.captions
    chunk = n // 4
    batch = contrastive_batch(ctx, clip, n)
    with ieee_float32():
        loss_full, full = step_gradients(clip, params, batch, fp32_runtime(ctx), 0)
        loss_chunked, chunked = step_gradients(clip, params, batch, fp32_runtime(ctx), chunk)
        _, bf_full = step_gradients(clip, params, batch, bf16_runtime(ctx), 0)
        _, bf_chunked = step_gradients(clip, params, batch, bf16_runtime(ctx), chunk)
    zero = [k for k, g in full.items() if not g.abs().max() > 0]
    out = {"batch": n, "chunk": chunk, "loss": loss_full, "fp32_loss_diff": abs(loss_chunked - loss_full),
           "fp32_gradient_relative_diff": worst_relative_diff(chunked, full),
           "bf16_gradient_relative_diff": worst_relative_diff(bf_chunked, bf_full),
           "bf16_vs_fp32_gradient_relative_diff": worst_relative_diff(bf_full, full)}
    passed = (not zero and out["fp32_loss_diff"] <= 1e-5 * max(1.0, abs(loss_full))
              and out["fp32_gradient_relative_diff"] < 1e-4
              and out["bf16_gradient_relative_diff"] < min(2 ** -6, out["bf16_vs_fp32_gradient_relative_diff"]))
    return ok_if(passed, f"parameters without gradient: {zero[:3]}" if zero else
                 "the chunked gradient differs from the full batch's beyond the bounds", **out)


def count_syncs(fn: Callable[[], None], device: torch.device) -> tuple[int, list[str]]:
    """Host-device synchronisations while `fn` runs, as torch.cuda.set_sync_debug_mode("warn") reports them."""
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    found = [f"{w.filename}:{w.lineno}: {str(w.message)[:120]}" for w in caught
             if "synchroniz" in str(w.message).lower()]
    return len(found), found


def check_syncs_per_step(ctx: Context) -> dict:
    if ctx.cpu:
        return skipped("CUDA only: torch.cuda.set_sync_debug_mode counts device synchronisations")
    n, steps = ctx.shapes.sync_batch, 3
    clip = copy.deepcopy(ctx.pristine())  # RoBERTa-base's vocabulary: the benchmark's captions fit it
    data = bench.make_data("short", n * (steps + 1), 0, ctx.device, ctx.shapes.context_length)
    bank = torch.randn(data["n"], clip.config.projection_dim, device=ctx.device)
    args = argparse.Namespace(seed=0, grad_cache_chunk=0, no_packing=False)
    run = bench.trainer_run(clip, data, ctx.runtime, bench.bench_recipe(args, n), bank)
    rows = [torch.arange(i * n, (i + 1) * n) for i in range(steps + 1)]
    run._step(rows[0])  # warm-up: first-call allocations and lazy initialisation are not the steady state
    trainer_syncs, where = count_syncs(lambda: [run._step(r) for r in rows[1:]], ctx.device)

    def without_host_mask() -> None:  # the step's text tower fed as before the host mask existed
        for r in rows[1:]:
            tokens = gather_tokens(data["tokens"], r, ctx.device)
            run.optimizer.zero_grad(set_to_none=True)
            contrastive_step(clip, run.trainable, tokens, bank[r.to(ctx.device)], None, None, ctx.runtime)

    control_syncs, _ = count_syncs(without_host_mask, ctx.device)
    per_step, control = trainer_syncs / steps, control_syncs / steps
    return ok_if(per_step <= 1 and control > per_step,
                 "more than the trainer's one sync per step (its finiteness check)" if per_step > 1 else
                 "the control (no host mask) shows no more syncs: the count does not see them",
                 batch=n, steps=steps, syncs_per_step=per_step, control_syncs_per_step=control, where=where[:8])


def loss_run(image: torch.Tensor, text: torch.Tensor, scale: torch.nn.Parameter, keys, **chunk) -> dict:
    """The loss's forward and backward: its value, gradients, and peak memory above the inputs (CUDA)."""
    device = image.device
    text = text.detach().requires_grad_(True)
    scale.grad = None
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    try:
        loss = clip_loss(image, text, scale, keys[0], keys[1], **chunk)
        loss.backward()
    except torch.cuda.OutOfMemoryError as exc:
        return {"out_of_memory": str(exc).splitlines()[0][:200]}
    out = {"loss": loss.detach(), "grads": {"text": text.grad, "logit_scale": scale.grad.clone()}}
    if device.type == "cuda":
        sync(device)
        out["peak_mib"] = round((torch.cuda.max_memory_allocated(device) - start) / 2 ** 20, 1)
    return out


def reference_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, keys, block: int = 1024) -> float:
    """The masked symmetric InfoNCE written out again, in float64, a block of rows at a time (no N x N matrix)."""
    image, text = (torch.nn.functional.normalize(t.detach().double(), dim=-1) for t in (image, text))
    s = scale.detach().double().exp()
    n, total = image.shape[0], torch.zeros((), dtype=torch.float64, device=image.device)
    for rows_of, columns in ((image, text), (text, image)):
        for start in range(0, n, block):
            rows = torch.arange(start, min(start + block, n), device=image.device)
            logits = s * rows_of[rows] @ columns.t()
            masked = (keys[0][rows, None] == keys[0][None, :]) | (keys[1][rows, None] == keys[1][None, :])
            masked[torch.arange(len(rows), device=image.device), rows] = False  # the positive itself counts
            logits = logits.masked_fill(masked, float("-inf"))
            total += (torch.logsumexp(logits, 1) - logits[torch.arange(len(rows), device=image.device), rows]).sum()
    return float(total / (2 * n))


def check_loss_memory(ctx: Context) -> dict:
    """Each loss (full, and chunked where cnclip.loss offers it) against a float64 reference of its value;
    the chunked one against the full one's value and gradient too; peak memory of each on CUDA."""
    sizes: dict = {}
    failures = []
    scale = torch.nn.Parameter(torch.tensor(2.6592, device=ctx.device))
    with ieee_float32():
        for n in ctx.shapes.loss_sizes:
            gen = torch.Generator().manual_seed(n)
            image = torch.randn(n, ctx.shapes.loss_dim, generator=gen).to(ctx.device)
            text = torch.randn(n, ctx.shapes.loss_dim, generator=gen).to(ctx.device)
            keys = ((torch.arange(n) // 2).to(ctx.device), torch.arange(n).to(ctx.device))  # pairs share images
            runs = {"full": loss_run(image, text, scale, keys, chunk=0),
                    "chunked": loss_run(image, text, scale, keys, chunk=ctx.shapes.loss_chunk)}
            reference = reference_loss(image, text, scale, keys)
            row: dict = {"one_fp32_matrix_mib": n * n * 4 / 2 ** 20, "reference_loss_float64": reference}
            for name, r in runs.items():
                row[name] = {k: r[k] for k in ("peak_mib", "out_of_memory") if k in r}
                if "loss" in r:
                    row[name]["relative_diff_vs_float64"] = abs(float(r["loss"]) - reference) / abs(reference)
                    if row[name]["relative_diff_vs_float64"] > 1e-4:
                        failures.append(f"{n}: the {name} loss differs from the float64 reference")
            if "out_of_memory" in runs["chunked"]:
                failures.append(f"{n}: out of memory in the chunked loss")
            if "loss" in runs["full"] and "loss" in runs["chunked"]:
                full, chunked = runs["full"], runs["chunked"]
                row["chunked_vs_full"] = {"loss": relative_diff(chunked["loss"], full["loss"]),
                                          "gradient": worst_relative_diff(chunked["grads"], full["grads"])}
                if row["chunked_vs_full"]["loss"] > 1e-5 or row["chunked_vs_full"]["gradient"] > 1e-4:
                    failures.append(f"{n}: the chunked loss or gradient differs from the full one")
            sizes[str(n)] = row
            del runs, image, text
    out = {"chunk": ctx.shapes.loss_chunk,
           "dim": ctx.shapes.loss_dim, "sizes": sizes}
    if ctx.cpu:
        out["peak_memory"] = "not measured on a CPU (no allocator statistics); values compared only"
    return ok_if(not failures, "; ".join(failures), **out)


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def finetune(ctx: Context, run_dir: Path, name: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """`python -m cnclip.finetune recipes/demo.yaml` with the mode's overrides, output in WORK/<name>.log."""
    data = ctx.work / "demo-data"
    overrides = [f"run_dir={run_dir}", f"cache.dir={ctx.work / 'demo-cache'}", f"data.root={data}",
                 f"zeroshot.images={data / 'zeroshot'}", f"zeroshot.classes={data / 'zeroshot_classes.txt'}",
                 "train.deterministic=true", f"train.device={ctx.device.type}", *ctx.shapes.demo]
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if crash_at:
        env[CRASH_ENV] = crash_at
    if ctx.cpu:  # one thread, as this process (main): on a busy machine idle OpenMP threads spin for cores
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "cnclip.finetune", str(DEMO_RECIPE), *overrides], env=env,
                          capture_output=True, text=True, cwd=REPO)  # the recipe's paths are the repository's
    (ctx.work / f"{name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    return proc


def tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-1500:]


def check_demo(ctx: Context) -> dict:
    run_dir = ctx.work / "demo-run"
    first = finetune(ctx, run_dir, "demo")
    if first.returncode != 0:
        return ok_if(False, f"the demo exited {first.returncode}: {tail(first)}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    saved = {"checkpoint": file_digests(latest_checkpoint(run_dir)), "best": file_digests(run_dir / "best")}
    again = finetune(ctx, run_dir, "demo-rerun")
    summary_again = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    unchanged = saved == {"checkpoint": file_digests(latest_checkpoint(run_dir)), "best": file_digests(run_dir / "best")}
    before, after = summary["before"]["mean_recall"], summary["after"]["mean_recall"]
    out = {"precision": "fp32" if ctx.cpu else "bf16", "steps": summary["steps"], "mean_recall_before": before,
           "mean_recall_after": after, "zeroshot_top1_before": summary["before"].get("zeroshot", {}).get("top1"),
           "zeroshot_top1_after": summary["after"].get("zeroshot", {}).get("top1"),
           "rerun_exit": again.returncode, "rerun_steps_this_run": summary_again.get("steps_this_run"),
           "rerun_files_unchanged": unchanged}
    return ok_if(after > before and again.returncode == 0 and summary_again.get("steps_this_run") == 0 and unchanged,
                 "training did not raise recall" if after <= before else
                 f"the rerun trained or changed files: {tail(again)}", **out)


def check_compile(ctx: Context) -> dict:
    clip, model, _ = lora_text_model(ctx)
    model.eval()
    eager_clip = copy.deepcopy(clip)  # the same weights, never compiled
    eager_params = {n: p for n, p in eager_clip.named_parameters() if p.requires_grad}
    compiled_params = {n: p for n, p in clip.named_parameters() if p.requires_grad}
    backend = "eager" if ctx.cpu else "inductor"
    if ctx.cpu:
        clip.text_model.compile(backend="eager")
    else:
        prepare_text_tower(clip, compile=True)  # what train.compile runs
    out: dict = {"backend": backend, "lengths": {}}
    worst = 0.0
    with ieee_float32():
        for length in ctx.shapes.compile_lengths:
            tokens = captions(ctx, ctx.shapes.captions, seed=length, context_length=length)
            tic = time.perf_counter()
            emb, grads = embed_and_grads(encode_texts, clip, compiled_params, tokens, fp32_runtime(ctx))
            sync(ctx.device)
            first_s = time.perf_counter() - tic
            ref_emb, ref = embed_and_grads(encode_texts, eager_clip, eager_params, tokens, fp32_runtime(ctx))
            diffs = {"embedding": relative_diff(emb, ref_emb), "gradient": worst_relative_diff(grads, ref),
                     "first_call_s": round(first_s, 2)}
            worst = max(worst, diffs["embedding"], diffs["gradient"])
            out["lengths"][str(tokens["input_ids"].shape[1])] = diffs
        batch = contrastive_batch(ctx, clip, ctx.shapes.captions)
        batch["packed"] = False  # train.compile runs the tower's own forward
        _, full = step_gradients(clip, compiled_params, batch, fp32_runtime(ctx), 0)
        _, chunked = step_gradients(clip, compiled_params, batch, fp32_runtime(ctx), ctx.shapes.captions // 4)
    out["grad_cache_relative_diff_under_compile"] = worst_relative_diff(chunked, full)
    out["max_relative_diff"] = worst
    return ok_if(worst < 1e-4, "the compiled text tower differs from the eager one beyond 1e-4", **out)


def check_sigkill_resume(ctx: Context) -> dict:
    reference = ctx.work / "demo-run"
    if not (reference / "summary.json").is_file():
        return skipped("needs the demo check's finished run (the uninterrupted reference)")
    run_dir = ctx.work / "killed-run"
    killed = finetune(ctx, run_dir, "killed", crash_at=f"train-step:{ctx.shapes.crash_step}")
    if killed.returncode != -signal.SIGKILL:
        return ok_if(False, f"the run was not killed (exit {killed.returncode}): {tail(killed)}")
    resumed = finetune(ctx, run_dir, "resumed")
    if resumed.returncode != 0:
        return ok_if(False, f"the resumed run exited {resumed.returncode}: {tail(resumed)}")
    from safetensors.torch import load_file

    a = load_file(str(latest_checkpoint(reference) / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(run_dir) / "trainable.safetensors"))
    differing = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    resumed_from = "resuming from" in resumed.stderr
    return ok_if(bool(a) and a.keys() == b.keys() and not differing and resumed_from,
                 "the resumed run did not resume from a checkpoint" if not resumed_from else
                 f"weights differ from the uninterrupted run's: {differing[:5]}",
                 killed_in_step=ctx.shapes.crash_step, tensors=len(a), bit_identical=not differing)


def check_throughput(ctx: Context) -> dict:
    out_file = ctx.work / "throughput.json"
    argv = [*ctx.shapes.throughput, "--device", str(ctx.device.type), "--out", str(out_file)]
    with open(ctx.work / "throughput.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        code = bench.main(argv)
    if code != 0:
        return ok_if(False, f"benchmarks/train_throughput.py exited {code}")
    result = json.loads(out_file.read_text(encoding="utf-8"))
    scenarios = {}
    problems = []
    for name, s in result["scenarios"].items():
        fractions = {loop: s[loop].get("fraction_of_matmul") for loop in ("baseline", "cnclip")}
        scenarios[name] = {"speedup": s["speedup"], "baseline_samples_per_s": s["baseline"]["samples_per_s"],
                           "cnclip_samples_per_s": s["cnclip"]["samples_per_s"], "fraction_of_matmul": fractions,
                           "cache_images_per_s": s["cache"]["images_per_s"]}
        if not s["speedup"] > 1:
            problems.append(f"{name}: cnclip's step is not faster than the baseline loop")
        problems += [f"{name}: {loop} FLOP rate {f} of the matmul ceiling is outside (0, 1.5]"
                     for loop, f in fractions.items() if f is not None and not 0 < f <= 1.5]
    return ok_if(not problems, "; ".join(problems), arguments=ctx.shapes.throughput, precision=result["precision"],
                 matmul=result["matmul"], matmul_ceiling_flops_per_s=result["matmul_ceiling_flops_per_s"],
                 scenarios=scenarios)


CHECKS: dict[str, Callable[[Context], dict]] = {
    "environment": check_environment,
    "packed_text": check_packed_text,
    "grad_cache": check_grad_cache,
    "syncs_per_step": check_syncs_per_step,
    "loss_memory": check_loss_memory,
    "demo": check_demo,
    "compile": check_compile,
    "sigkill_resume": check_sigkill_resume,
    "throughput": check_throughput,
}


def run_check(name: str, ctx: Context) -> dict:
    """One check, timed; an exception is that check's failure (with where it happened), not the script's."""
    tic = time.perf_counter()
    try:
        result = CHECKS[name](ctx)
    except Exception as exc:  # noqa: BLE001 - every failure is reported in the summary
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:1000],
                  "traceback": traceback.format_exc()[-2000:]}
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - tic, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="small shapes on the CPU (the default without CUDA)")
    parser.add_argument("--only", help=f"comma-separated checks to run (default all: {', '.join(CHECKS)})")
    parser.add_argument("--work-dir", help="where the demo runs and logs go (default a new temporary directory)")
    parser.add_argument("--out", help="also write the JSON summary here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.only or ",".join(CHECKS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown checks {unknown}; known: {', '.join(CHECKS)}")
    cpu = args.cpu or not torch.cuda.is_available()
    # Small shapes gain nothing from threads, and on a shared (CI) machine waiting threads spin.
    with torch_threads(1) if cpu else contextlib.nullcontext():
        return run_checks(args, names, cpu)


def run_checks(args: argparse.Namespace, names: list[str], cpu: bool) -> int:
    """Run the checks `names`; print (and with --out write) the summary; 1 if any failed."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cnclip-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    try:
        runtime = pick_runtime("cpu" if cpu else "cuda")
    except CnclipError as exc:  # e.g. a torch build without kernels for this GPU: nothing else can run
        checks = {name: skipped(f"no runtime: {exc}") for name in names}
        checks["environment"] = {"status": "failed", "reason": str(exc)}
        runtime = None
    if runtime is not None:
        ctx = Context(cpu=cpu, runtime=runtime, shapes=CPU_SHAPES if cpu else GPU_SHAPES, work=work)
        checks = {name: run_check(name, ctx) for name in names}
    summary = {"check": "gpu_check", "mode": "cpu" if cpu else "gpu", "device": str(runtime and runtime.device),
               "work_dir": str(work), "seconds": round(time.perf_counter() - tic, 1),
               "failed": [n for n, r in checks.items() if r["status"] == "failed"],
               "skipped": [n for n, r in checks.items() if r["status"] == "skipped"], "checks": checks}
    text = json.dumps(summary, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
