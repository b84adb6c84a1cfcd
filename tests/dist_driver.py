"""Worker entry point for the multi-process tests, launched with torchrun (see test_distributed.py).

  dist_driver.py [--step IN.pt OUT_DIR] [--count-image-reads DIR] [--stop-after N] [--node-local-dirs]
                 [RECIPE key=value ...]

--step: one contrastive step on this rank's slice of the global batch in IN.pt (plain and with
gradient caching, and with distillation when IN.pt has a distill_weight), with LoRA and (when IN.pt
has "full") with the whole text tower trained under DDP; writes this rank's loss and gradients to
OUT_DIR/rank-R.pt. The process group is then left up for the fine-tuning run, which joins it.
RECIPE ...: python -m cnclip.finetune; with --stop-after N > 0 every rank dies in optimizer step N,
the way a pre-empted job dies: after its last checkpoint, with work in flight.
--count-image-reads DIR: DIR/image-reads-rank-R.json counts the images TSVs this rank indexed and hashed.
--node-local-dirs: rank R > 0 uses run_dir + "-rankR" and cache.dir + "-rankR", as if each node had its own disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def step(inputs: Path, out_dir: Path) -> None:
    from cnclip import distributed
    from cnclip.checkpoint import load_trainable
    from cnclip.data import gather_tokens
    from cnclip.distill import frozen_base_teacher
    from cnclip.runtime import pick_runtime
    from cnclip.models import attach_lora, load_base_model, lock_image_tower
    from cnclip.recipe import ModelConfig
    from cnclip.train_step import contrastive_step

    runtime = pick_runtime("auto")
    info = distributed.init_distributed(runtime.device)
    assert info.world_size == 2 and info.backend == "gloo", info
    data = torch.load(inputs, weights_only=True)
    cfg = ModelConfig(base=data["model_dir"], lora_dropout=0.0, target_modules=["query", "value", "dense"])
    base = load_base_model(cfg)
    model = attach_lora(base.clip, cfg)
    load_trainable(model, Path(data["trainable"]))
    model.train()
    lock_image_tower(base.clip)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    rows = distributed.local_slice(torch.arange(data["image_emb"].shape[0]))
    tokens = gather_tokens(data["tokens"], rows, runtime.device)  # trimmed to this rank's longest caption
    # With "distill_weight" in IN.pt: distillation towards the frozen base (the adapter switched off) too.
    teacher = (frozen_base_teacher(model, base.clip, data["image_emb"], data["distill_weight"], None)
               if "distill_weight" in data else None)
    result = {}
    for chunk in (0, 2):
        for mode, t in (("chunk", None), ("distill", teacher)):
            if mode == "distill" and teacher is None:
                continue
            for p in params.values():
                p.grad = None
            loss = contrastive_step(base.clip, list(params.values()), tokens, data["image_emb"][rows],
                                    data["image_keys"][rows], data["text_keys"][rows], runtime, grad_cache_chunk=chunk,
                                    teacher=t, teacher_image_emb=None if t is None else data["image_emb"][rows])
            result[f"{mode}{chunk}"] = {"loss": loss, "grads": {n: p.grad.clone() for n, p in params.items()}}
    if "full" in data:
        result.update(full_tuning_steps(data, tokens, rows, runtime))
    torch.save(result, out_dir / f"rank-{info.rank}.pt")


def full_tuning_steps(data: dict, tokens: dict, rows: torch.Tensor, runtime) -> dict:
    """The same step with model.text_tuning=full, the text side under DDP (as the trainer runs it),
    plain and with gradient caching: loss, gradients, and the largest tensor all-reduced from Python
    (average_gradients' flat copy; DDP's bucketed all-reduce runs in C++)."""
    from cnclip import distributed
    from cnclip.models import attach_text_tuning, load_base_model, lock_image_tower
    from cnclip.recipe import ModelConfig
    from cnclip.train_step import TextEncoder, contrastive_step

    cfg = ModelConfig(base=data["model_dir"], text_tuning="full")
    clip = load_base_model(cfg).clip
    attach_text_tuning(clip, cfg)
    clip.train()
    lock_image_tower(clip)
    encoder = distributed.data_parallel(TextEncoder(clip))
    params = {n: p for n, p in clip.named_parameters() if p.requires_grad}
    all_reduce, flat = distributed.dist.all_reduce, [0]

    def recording_all_reduce(tensor, *args, **kwargs):
        flat[0] = max(flat[0], tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    distributed.dist.all_reduce = recording_all_reduce
    result = {}
    for chunk in (0, 2):
        for p in params.values():
            p.grad = None
        flat[0] = 0
        loss = contrastive_step(clip, list(params.values()), tokens, data["image_emb"][rows], data["image_keys"][rows],
                                data["text_keys"][rows], runtime, grad_cache_chunk=chunk, text_encoder=encoder)
        result[f"full{chunk}"] = {"loss": loss, "grads": {n: p.grad.clone() for n, p in params.items()},
                                  "largest_flat_all_reduce": flat[0]}
    distributed.dist.all_reduce = all_reduce
    return result


def count_image_reads(out_dir: Path) -> None:
    """Count every ImageTSV this process builds (each one reads and hashes its whole file)."""
    import json
    import os

    from cnclip.image_sources import ImageTSV

    init, reads = ImageTSV.__init__, []

    def counting_init(self, path, skips):
        init(self, path, skips)
        reads.append(Path(path).name)
        (out_dir / f"image-reads-rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(reads))

    ImageTSV.__init__ = counting_init


def finetune(stop_after: int, argv: list[str]) -> int:
    import cnclip.finetune
    import cnclip.trainer

    if stop_after > 0:
        from conftest import clamp_that_stops_in_step

        cnclip.trainer.clamp_logit_scale = clamp_that_stops_in_step(stop_after)
    return cnclip.finetune.main(argv)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--step"]:
        step(Path(args[1]), Path(args[2]))
        args = args[3:]
    if args[:1] == ["--count-image-reads"]:
        count_image_reads(Path(args[1]))
        args = args[2:]
    stop_after = 0
    if args[:1] == ["--stop-after"]:
        stop_after, args = int(args[1]), args[2:]
    if args[:1] == ["--node-local-dirs"]:
        import os

        rank = int(os.environ["RANK"])
        args = [a + f"-rank{rank}" if a.startswith(("run_dir=", "cache.dir=")) and rank > 0 else a for a in args[1:]]
    if args:
        sys.exit(finetune(stop_after, args))
