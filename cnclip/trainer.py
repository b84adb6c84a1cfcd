"""The fine-tuning loop: LoRA on the text tower against cached image embeddings.

`train(recipe)` is what `cnclip finetune` runs. Read top to bottom: set up the run directory, data,
model and image cache; then the loop (batch -> text embeddings -> contrastive loss -> step), with
periodic logging, an evaluation and checkpoint at each epoch end, and exact resume when the same
command is run again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_best, save_checkpoint
from .errors import ConfigError, DataError, TrainingDiverged
from .log_setup import FILE_ONLY, setup_logging
from .data import ImageTransform, Split, gather_tokens, load_data_split, tokenize
from .skiplog import SkipLog
from .optim import make_optimizer, warmup_cosine
from .runtime import Runtime, pick_runtime
from .retrieval import evaluate_split, format_metrics, scorable_texts
from .faults import crash_point
from .determinism import attention_kernels, deterministic_algorithms, seed_step
from .image_cache import ImageFeatures, split_image_features
from .atomic import write_json
from .models import (attach_text_tuning, clamp_logit_scale, describe_trainable, image_tower_fingerprint, load_base_model,
                     lock_image_tower)
from .recipe import Recipe, dump_recipe, flatten, load_recipe
from .inference import RECIPE_FILE
from .train_step import contrastive_step, prepare_text_tower
from .classifier import ZeroShotTracker
from .plots import write_run_plots
from .tensorboard_log import TENSORBOARD_DIR, TensorBoardLog

log = logging.getLogger("cnclip.trainer")


@dataclass
class TrainingPairs:
    """Every (caption, image) positive pair of the training split, as tensors ready to index."""

    tokens: dict[str, torch.Tensor]  # pre-tokenised captions, one row per distinct text record
    text_rows: torch.Tensor  # pair -> row in tokens
    image_rows: torch.Tensor  # pair -> row in the image-embedding cache
    text_keys: torch.Tensor  # pair -> id of its caption string (equal strings share an id)

    def __len__(self) -> int:
        return self.text_rows.shape[0]


def build_pairs(split: Split, features: ImageFeatures, tokenizer, context_length: int,
                skips: SkipLog) -> TrainingPairs:
    text_rows, image_rows = [], []
    for t, image_id in split.pairs():
        if image_id in features.row:
            text_rows.append(t)
            image_rows.append(features.row[image_id])
        else:
            skips.skip("pair with undecodable image", f"{split.images.path} image_id {image_id}",
                       f"text_id {split.texts[t].text_id}")
    if len(text_rows) < 2:
        raise DataError(f"split '{split.name}' has {len(text_rows)} usable image-text pairs; at least 2 are needed")
    string_ids: dict[str, int] = {}
    keys = [string_ids.setdefault(rec.text, len(string_ids)) for rec in split.texts]
    text_rows_t = torch.tensor(text_rows)
    return TrainingPairs(
        tokens=tokenize(tokenizer, [rec.text for rec in split.texts], context_length),
        text_rows=text_rows_t,
        image_rows=torch.tensor(image_rows),
        text_keys=torch.tensor(keys)[text_rows_t],
    )


def report_epoch(title: str, metrics: dict) -> None:
    """Validation results: printed, and written to train.log."""
    print(f"\n{title}:\n{format_metrics(metrics)}\n")
    log.info("%s:\n%s", title, format_metrics(metrics), extra=FILE_ONLY)


def summary_lines(summary: dict, run_dir: Path) -> list[str]:
    """The end of a run in words: recall before training, after the last epoch and at the best epoch
    (the model best/, evaluate and export use), zero-shot the same way; a rerun of a finished run says so."""
    lines = []
    if summary.get("steps_this_run") == 0 and summary.get("steps"):
        lines.append(f"nothing to train: {run_dir} had already finished all {summary['steps']} steps; "
                     "these are its results")
    before, after, best = summary.get("before"), summary.get("after"), summary.get("best") or {}
    last_epoch, best_valid = summary.get("last_epoch"), best.get("valid")
    if before:
        lines.append(f"mean recall before training: {before['mean_recall']:.2f}")
    if after and best_valid:
        lines.append(f"mean recall after training: last epoch ({last_epoch}) {after['mean_recall']:.2f}, "
                     f"best epoch ({best['epoch']}) {best_valid['mean_recall']:.2f}")
    if after and "zeroshot" in after and best_valid and "zeroshot" in best_valid:
        first = f" before training: {before['zeroshot']['top1']:.2f}," if before and "zeroshot" in before else ""
        lines.append(f"zero-shot top-1{first} last epoch: {after['zeroshot']['top1']:.2f}, "
                     f"best epoch: {best_valid['zeroshot']['top1']:.2f}")
    if best:
        lines.append(f"best checkpoint (used by evaluate and export): epoch {best['epoch']} -> {run_dir / 'best'}")
    return lines


class MetricsLog:
    """metrics.jsonl in the run dir; on resume, entries past the checkpoint are dropped (they get redone)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.is_file():
            keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, **entry) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")


class NoMetricsLog:
    """What ranks other than 0 write metrics to: nothing (rank 0 owns metrics.jsonl)."""

    def write(self, **entry) -> None:
        pass


# Keys that change how a step is computed, never what it computes: a run may resume with other values.
# (train.packed_text and train.compile are not among them: the packed text tower draws its dropout
# masks per real token, so switching it mid-run would change the rest of the run.)
EXECUTION_KEYS = {"train.grad_cache_chunk", "train.gradient_checkpointing", "logging.tensorboard"}


def skip_non_finite_step(state: TrainState, recipe: Recipe, run_dir: Path, metrics_log, loss: torch.Tensor,
                         grad_norm: torch.Tensor) -> None:
    state.bad_steps += 1
    log.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d of at most %d)",
                state.global_step + 1, loss.item(), grad_norm.item(), state.bad_steps, recipe.train.max_bad_steps)
    metrics_log.write(step=state.global_step + 1, epoch=state.epoch, skipped="non-finite loss or gradient",
                      loss=str(loss.item()), grad_norm=str(grad_norm.item()))
    if state.bad_steps > recipe.train.max_bad_steps:
        raise TrainingDiverged(
            f"{state.bad_steps} steps had a non-finite loss or gradient (train.max_bad_steps="
            f"{recipe.train.max_bad_steps}); stopped at step {state.global_step + 1}. The last good checkpoint "
            f"is kept in {run_dir / 'checkpoints'}; try a lower train.lr or check the data")


def check_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """A run directory belongs to one recipe: resuming under a different one would mix two runs."""
    saved = run_dir / RECIPE_FILE
    if not saved.is_file():
        return
    before = flatten(load_recipe(saved, check_data=False).to_dict())
    now = flatten(recipe.to_dict())
    changed = [k for k in now if before.get(k) != now[k] and k not in EXECUTION_KEYS]
    if changed:
        raise ConfigError(
            f"run directory {run_dir} was started with a different recipe (changed: {', '.join(changed)}); "
            f"use a new run_dir=..., or delete {run_dir} to start over"
        )


def train(recipe: Recipe) -> dict:
    """Train one process, or this rank of a torchrun job (detected from its environment variables).

    Data parallel: train.batch_size is the global batch, split evenly over the processes; the
    loss sees the whole global batch and gradients are averaged, so N processes train exactly
    like one process with the same recipe (up to float rounding). The ranks share the work of
    the image cache (each embeds its own parts); rank 0 validates and writes every file; the data
    position in a checkpoint counts global optimizer steps, so a run can resume on a different
    number of processes.
    """
    runtime = pick_runtime(recipe.train.device, recipe.train.precision)
    owns_group = not distributed.is_distributed()
    distributed.init_distributed(runtime.device)
    try:
        with deterministic_algorithms(recipe.train.deterministic, runtime.device):
            return _train(recipe, runtime)
    finally:
        if owns_group:
            distributed.shutdown()


def _train(recipe: Recipe, runtime: Runtime) -> dict:
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    main_rank = distributed.is_main()
    setup_logging(run_dir / "train.log" if main_rank else None)
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
    check_run_dir(run_dir, recipe)
    distributed.barrier()  # every rank has read the saved recipe before rank 0 rewrites it
    if main_rank:
        dump_recipe(recipe, run_dir / RECIPE_FILE)

    if recipe.data.generate == "demo" and main_rank:
        from .demo_data import write_demo_dataset

        write_demo_dataset(recipe.data.root, seed=recipe.seed)
    distributed.barrier()
    # Every split the run needs is read (and an empty or unusable one refused, DataError) before the
    # model is loaded and the image cache is built: a data set with no validation pairs fails in seconds.
    skips = SkipLog()
    train_split = load_data_split(recipe.data, recipe.data.train_split, skips)
    valid_split = load_data_split(recipe.data, recipe.data.valid_split, skips) if recipe.data.valid_split else None

    log.info("device %s, precision %s, %d process(es)%s", runtime.device, runtime.precision,
             distributed.world_size(), ", deterministic algorithms" if recipe.train.deterministic else "")
    base = load_base_model(recipe.model, seed=recipe.seed)
    torch.manual_seed(recipe.seed)  # LoRA's initial A matrices are random: same seed, same start
    # LoRA (a peft model) or the full text tower (the model itself); the image side is the cache either way.
    model = attach_text_tuning(base.clip, recipe.model).to(runtime.device)
    clip = base.clip
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(trainable)
    prepare_text_tower(clip, recipe.train.gradient_checkpointing, recipe.train.compile)
    log.info(describe_trainable(model))

    # ---- data and the image-embedding cache (the image tower runs here, and only here)
    transform = ImageTransform(base.preprocess)
    tower = image_tower_fingerprint(clip)

    def features_of(split: Split) -> ImageFeatures:
        # Every rank embeds its share of the cache parts, then all read the whole cache (image_cache.py).
        return split_image_features(split.images, clip, transform, tower, runtime, recipe.cache.dir,
                                    recipe.cache.batch_size, recipe.data.num_workers, skips, recipe.cache.part_size,
                                    sharded=True)

    train_features = features_of(train_split)
    pairs = build_pairs(train_split, train_features, base.tokenizer, recipe.data.context_length, skips)
    valid_features = None
    if valid_split is not None:
        valid_features = features_of(valid_split)
        scorable_texts(valid_split, valid_features, skips)  # count, once, the texts recall cannot score
    zeroshot = (ZeroShotTracker.from_recipe(recipe, clip, base.tokenizer, transform, runtime, skips)
                if main_rank else None)  # only rank 0 validates
    distributed.host_barrier()  # the others wait on the host while rank 0 embeds the zero-shot folder
    if skips.total:
        log.warning("skipped %d bad items while reading data: %s", skips.total, dict(skips.counts))
    image_bank = train_features.embeddings.to(runtime.device)
    if image_bank.device.type != "cpu":  # the bank lives on the GPU now: no second, host copy per rank
        train_features.embeddings = train_features.embeddings[:0]
    log.info("training on %d pairs (%d captions, %d images)", len(pairs), pairs.tokens["input_ids"].shape[0],
             len(train_features.ids))

    # ---- optimisation
    world = distributed.world_size()
    if recipe.train.batch_size % world:
        raise ConfigError(f"recipe key 'train.batch_size' ({recipe.train.batch_size}) is the global batch and must "
                          f"split evenly over the {world} processes")
    batch_size = min(recipe.train.batch_size, len(pairs) // world * world)  # global; each rank takes 1/world
    steps_per_epoch = len(pairs) // batch_size  # the last partial batch is dropped: every step sees a full batch
    total_steps = recipe.train.epochs * steps_per_epoch
    optimizer = make_optimizer(model, recipe, runtime)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(min(recipe.train.warmup_steps, total_steps), total_steps))

    def validate() -> dict | None:
        if valid_split is None or not distributed.is_main():  # rank 0 validates; the others go on
            return None
        model.eval()
        result = evaluate_split(clip, base.tokenizer, valid_split, valid_features, runtime,
                                recipe.data.context_length, recipe.eval.batch_size)
        if zeroshot is not None:  # forgetting check: zero-shot accuracy on a held-out classification folder
            result.metrics["zeroshot"] = zeroshot.score(clip)
        model.train()
        lock_image_tower(clip)
        return result.metrics

    checkpoint = latest_checkpoint(run_dir)
    state = TrainState()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    # Every rank must resume from the same step: ranks that see another run_dir (a node without the
    # shared filesystem) would otherwise run collectives that never match.
    distributed.same_on_every_rank(
        state.global_step, f"the step to resume from (run_dir {run_dir} and cache.dir must be on a filesystem "
                           "that every node shares)")
    start_step = state.global_step
    if checkpoint is not None and state.global_step >= total_steps:
        log.info("nothing to train: %s already finished all %d steps (%d epochs); the results are the finished "
                 "run's", run_dir, total_steps, recipe.train.epochs)
    elif checkpoint is not None:
        log.info("resuming from %s (epoch %d, step %d of %d)", checkpoint, state.epoch + 1, state.global_step,
                 total_steps)
    metrics_log = (MetricsLog(run_dir / "metrics.jsonl", state.global_step if checkpoint else None)
                   if main_rank else NoMetricsLog())
    if main_rank and recipe.logging.tensorboard:  # the same entries, also as TensorBoard scalars
        metrics_log = TensorBoardLog(metrics_log, run_dir / TENSORBOARD_DIR)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if checkpoint and summary_path.is_file() else {}
    if checkpoint is None:
        torch.manual_seed(recipe.seed)
        if recipe.eval.before_training:
            before = validate()
            if before is not None:
                report_epoch(f"validation recall before training ({valid_split.name})", before)
                metrics_log.write(step=0, epoch=0, valid=before)
                summary["before"] = before
                write_json(summary_path, summary)

    distributed.host_barrier()  # the others wait here, not in a step's collective, while rank 0 validates

    # ---- the loop
    packed = recipe.train.packed_text and not recipe.train.compile
    model.train()
    lock_image_tower(clip)
    while state.epoch < recipe.train.epochs:
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(recipe.seed * 1000 + state.epoch))
        progress = tqdm(total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}",
                        unit="step", dynamic_ncols=True, disable=not main_rank)
        tic, seen = time.perf_counter(), 0
        while state.step_in_epoch < steps_per_epoch:
            start = state.step_in_epoch * batch_size
            idx = distributed.local_slice(order[start:start + batch_size])  # this rank's share of the global batch
            image_rows = pairs.image_rows[idx].to(runtime.device, non_blocking=True)
            tokens = gather_tokens(pairs.tokens, pairs.text_rows[idx], runtime.device)
            if packed:  # the mask's host copy: the packed layout is computed without waiting for the GPU
                tokens["host_attention_mask"] = pairs.tokens["attention_mask"][pairs.text_rows[idx],
                                                                               :tokens["attention_mask"].shape[1]]
            optimizer.zero_grad(set_to_none=True)
            seed_step(recipe.seed, distributed.rank(), state.global_step)  # dropout: same masks however resumed
            with attention_kernels(recipe.train.deterministic, runtime.device):
                loss = contrastive_step(clip, trainable, tokens, image_bank[image_rows], image_rows,
                                        pairs.text_keys[idx].to(runtime.device, non_blocking=True), runtime,
                                        recipe.train.grad_cache_chunk, packed=packed)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, recipe.train.grad_clip if recipe.train.grad_clip > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):  # the step's one host-device sync
                optimizer.step()
            else:  # one bad batch (or an overflow) must not poison the weights: skip the update, count it
                skip_non_finite_step(state, recipe, run_dir, metrics_log, loss, grad_norm)
            scheduler.step()
            clamp_logit_scale(clip)
            state.step_in_epoch += 1
            state.global_step += 1
            crash_point("train-step")
            seen += len(idx) * world
            progress.update(1)
            if state.global_step % recipe.train.log_every == 0:  # .item() waits for the device: only here
                elapsed = time.perf_counter() - tic
                progress.set_postfix(loss=f"{loss.item():.4f}")
                metrics_log.write(step=state.global_step, epoch=state.epoch, loss=loss.item(),
                                  lr=lr, logit_scale=clip.logit_scale.exp().item(),
                                  samples_per_s=seen / max(elapsed, 1e-9))
                tic, seen = time.perf_counter(), 0
            if (state.global_step % recipe.train.save_every == 0 and state.step_in_epoch < steps_per_epoch
                    and main_rank):
                save_checkpoint(run_dir, model, optimizer, scheduler, state)
        progress.close()
        if not main_rank:  # rank 0 validates, keeps the best model and checkpoints
            state.epoch += 1
            state.step_in_epoch = 0
            distributed.host_barrier()
            continue

        metrics = validate()
        finished_epoch = state.epoch + 1
        if metrics is not None:
            report_epoch(f"epoch {finished_epoch} validation recall ({valid_split.name})", metrics)
            metrics_log.write(step=state.global_step, epoch=finished_epoch, valid=metrics)
        score = metrics["mean_recall"] if metrics is not None else float(finished_epoch)
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_epoch = score, finished_epoch
            save_best(run_dir, model, {"epoch": finished_epoch, "step": state.global_step,
                                       "split": valid_split.name if valid_split else None, "valid": metrics})
            summary["best"] = {"epoch": finished_epoch, "valid": metrics}
        summary["after"] = metrics
        summary["last_epoch"] = finished_epoch
        summary["skipped"] = skips.summary()
        write_json(summary_path, summary)
        write_run_plots(run_dir)  # RUN/plots/*.png, redrawn from metrics.jsonl
        state.epoch += 1
        state.step_in_epoch = 0
        save_checkpoint(run_dir, model, optimizer, scheduler, state)
        distributed.host_barrier()

    distributed.barrier()  # rank 0 finishes its last validation and checkpoint before anyone leaves
    if not main_rank:
        return summary
    summary.setdefault("skipped", skips.summary())
    summary["steps"] = state.global_step
    summary["steps_this_run"] = state.global_step - start_step  # 0: a finished run, rerun
    write_json(summary_path, summary)
    for line in summary_lines(summary, run_dir):  # what the command prints, in train.log too
        log.info(line, extra=FILE_ONLY)
    return summary
