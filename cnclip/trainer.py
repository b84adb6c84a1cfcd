"""The fine-tuning loop: LoRA on the text tower against cached image embeddings.

`train(recipe)` is what `cnclip finetune` runs: `FinetuneRun.run()`, which reads top to bottom.
`setup()` sets up the run directory, data, model and image cache, the optimizer, and the state to
resume from; then for each epoch `train_epoch()` (batch -> text embeddings -> contrastive loss ->
step, with periodic logging), `validate()` and `save()` (best model, summary, plots, checkpoint);
then `finish()`. The same command run again resumes exactly where the last checkpoint left off.
"""

from __future__ import annotations

import json
import logging
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import TRAINABLE, TrainState, latest_checkpoint, load_checkpoint, save_best, save_checkpoint
from .errors import ConfigError, DataError, TrainingDiverged
from .log_setup import FILE_ONLY, setup_logging
from .data import (ImageTransform, Split, check_context_length, gather_tokens, int64_tensor, load_data_split,
                   tokenize)
from .skiplog import SkipLog
from .optim import make_optimizer, warmup_cosine
from .runtime import Runtime, float32_matmuls, pick_runtime
from .retrieval import evaluate_split, format_metrics, scorable_texts
from .faults import crash_point
from .host_memory import bound_cpu_kernel_cache
from .determinism import attention_kernels, deterministic_algorithms, seed_step
from .image_cache import HOST_FLOAT32, EmbeddingLayout, ImageFeatures, bank_layout, split_image_features
from .atomic import write_json
from .models import (attach_text_tuning, clamp_logit_scale, describe_trainable, image_tower_fingerprint, load_base_model,
                     lock_image_tower)
from .recipe import Recipe, dump_recipe, flatten, load_recipe
from .inference import RECIPE_FILE
from .train_step import TextEncoder, contrastive_step, prepare_text_tower
from .classifier import ZeroShotTracker
from .distill import Teacher, frozen_base_teacher, loaded_teacher
from .plots import write_run_plots, write_wise_plot
from . import wise
from .tensorboard_log import TENSORBOARD_DIR, TensorBoardLog

log = logging.getLogger("cnclip.trainer")


@dataclass
class TrainingPairs:
    """Every (caption, image) positive pair of the training split, as tensors ready to index."""

    tokens: dict[str, torch.Tensor]  # pre-tokenised captions, one row per distinct text record (compact dtypes)
    text_rows: torch.Tensor  # pair -> row in tokens
    image_rows: torch.Tensor  # pair -> row in the image-embedding cache
    text_keys: torch.Tensor  # pair -> id of its caption string (equal strings share an id)

    def __len__(self) -> int:
        return self.text_rows.shape[0]


def build_pairs(split: Split, features: ImageFeatures, tokenizer, context_length: int,
                skips: SkipLog) -> TrainingPairs:
    """The split's pairs as tensors. Built in int64 arrays (8 bytes a pair), never a Python tuple or int
    per pair: at a million pairs those cost ~100 bytes each, held until the tensors exist."""
    text_rows, image_rows = array("q"), array("q")
    for t, rec in enumerate(split.texts):
        for image_id in rec.image_ids:
            row = features.row.get(image_id)
            if row is not None:
                text_rows.append(t)
                image_rows.append(row)
            else:
                skips.skip("pair with undecodable image", f"{split.images.path} image_id {image_id}",
                           f"text_id {rec.text_id}")
    if len(text_rows) < 2:
        raise DataError(f"split '{split.name}' has {len(text_rows)} usable image-text pairs; at least 2 are needed")
    string_ids: dict[str, int] = {}
    keys = array("q", (string_ids.setdefault(rec.text, len(string_ids)) for rec in split.texts))
    text_rows_t = int64_tensor(text_rows)
    return TrainingPairs(
        tokens=tokenize(tokenizer, [rec.text for rec in split.texts], context_length, compact=True),
        text_rows=text_rows_t,
        image_rows=int64_tensor(image_rows),
        text_keys=int64_tensor(keys)[text_rows_t],
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
    picked = summary.get("wise")
    if picked:
        lines.append(wise_line(picked))
    if best:
        lines.append(f"best checkpoint (used by evaluate and export): epoch {best['epoch']} -> {run_dir / 'best'}")
    return lines


def wise_line(picked: dict) -> str:
    """The WiSE-FT result in one line: the alpha, its rule, and what it scores beside alpha 1."""
    zeroshot = "" if picked.get("zeroshot_top1") is None else f", zero-shot top-1 {picked['zeroshot_top1']:.2f}"
    tuned = "" if picked.get("tuned_mean_recall") is None else f" (alpha 1: {picked['tuned_mean_recall']:.2f})"
    return (f"WiSE-FT alpha {picked['alpha']:g} picked by rule {picked['rule']}: mean recall "
            f"{picked['mean_recall']:.2f}{tuned}{zeroshot}; best/ holds this model")


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
EXECUTION_KEYS = {"train.grad_cache_chunk", "train.loss_chunk", "train.gradient_checkpointing",
                  "logging.tensorboard"}
# Keys that act only after the last epoch (the WiSE-FT sweep): a finished run rerun with other values
# sweeps again (FinetuneRun.wise_sweep) and trains nothing.
AFTER_TRAINING_PREFIX = "train.wise"


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


def fp16_overflow(scaler: torch.amp.GradScaler, loss: torch.Tensor) -> bool:
    """A non-finite gradient under a finite loss, with fp16's loss scale above 1: the scaled gradient
    left fp16's range (the scaler starts high and finds its scale this way). At a scale of 1 or below
    the gradient is out of range unscaled: a bad step like any other."""
    return scaler.is_enabled() and bool(torch.isfinite(loss)) and scaler.get_scale() > 1.0


def skip_overflow_step(state: TrainState, metrics_log, scaler: torch.amp.GradScaler) -> None:
    log.info("step %d: fp16 gradient overflow at loss scale %g; update skipped, scale halved",
             state.global_step + 1, scaler.get_scale())
    metrics_log.write(step=state.global_step + 1, epoch=state.epoch, skipped="fp16 gradient overflow",
                      loss_scale=scaler.get_scale())


def check_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """A run directory belongs to one recipe: resuming under a different one would mix two runs."""
    saved = run_dir / RECIPE_FILE
    if not saved.is_file():
        return
    before = flatten(load_recipe(saved, check_data=False).to_dict())
    now = flatten(recipe.to_dict())
    changed = [k for k in now if before.get(k) != now[k] and k not in EXECUTION_KEYS
               and not k.startswith(AFTER_TRAINING_PREFIX)]
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
    if runtime.device.type == "cpu" and recipe.train.packed_text and not recipe.train.compile:
        bound_cpu_kernel_cache()  # before any CPU operator: packed batches' new shapes would grow it each step
    owns_group = not distributed.is_distributed()
    distributed.init_distributed(runtime.device)
    try:
        with (deterministic_algorithms(recipe.train.deterministic, runtime.device),
              float32_matmuls(runtime.device, recipe.train.deterministic)):
            return FinetuneRun(recipe, runtime).run()
    finally:
        if owns_group:
            distributed.shutdown()


def shared_directories(recipe: Recipe) -> dict[str, str]:
    """The directories every rank of a job must see as one (recipe key -> path): the run directory,
    the image cache (each rank writes its share of the parts, rank 0 reads them all), and a demo data
    set's root (rank 0 writes it, every rank reads it)."""
    from .image_cache import default_cache_dir

    directories = {"run_dir": recipe.run_dir, "cache.dir": recipe.cache.dir or str(default_cache_dir())}
    if recipe.data.generate is not None:
        directories["data.root"] = recipe.data.root
    return directories


class FinetuneRun:
    """One rank's fine-tuning run, in the order `run()` reads: `setup()`, then for each epoch
    `train_epoch()`, `validate()` and `save()`, then `finish()`.

    Every rank calls the same methods in the same order, so barriers and collectives match; only
    rank 0 validates and writes files, and the others wait on the host (`distributed.host_barrier`)
    while it does. Besides `recipe` and `runtime` (the constructor's), the attributes below are set
    by `setup()` and shared by the methods:

    run_dir, main_rank: the run directory; whether this is rank 0 (which validates and writes files)
    skips: the bad-item counts of every split read (SkipLog), kept in summary.json
    train_split, valid_split: the data splits (valid_split is None without data.valid_split)
    base, clip, model: the loaded base (tokenizer, preprocess), its ChineseCLIPModel, and the model
        being tuned (a peft LoRA model around clip, or clip itself)
    trainable: the parameters the optimizer updates (the same on every rank)
    text_encoder: the text side under DDP (train_step.TextEncoder) for full text tuning on several
        processes, else None
    transform, tower: the image transform and image-tower fingerprint the image cache is keyed on
    train_features, valid_features: the splits' cached image embeddings (the training split's in
        `bank_layout`, on the device; the validation split's as cached, on the host)
    image_bank: the training images' embeddings (train_features.embeddings), one row per image
    base_trainables: the trainable parameters' values before training (host copies), where WiSE-FT
        interpolates from (cnclip.wise)
    pairs: the training split's (caption, image) pairs as tensors (TrainingPairs)
    zeroshot: the zero-shot forgetting check (rank 0 only, None elsewhere or without one)
    world, batch_size, steps_per_epoch, total_steps: the data-parallel shape of the run
        (batch_size is the global batch)
    optimizer, scheduler: the optimizer and its per-step learning-rate schedule
    scaler: fp16's loss scaler (Runtime.grad_scaler; a disabled pass-through at other precisions), its
        state kept in TrainState.loss_scaler at each checkpoint
    checkpoint: the checkpoint this invocation resumed from, or None for a fresh run
    state: the position and best score (TrainState), what a checkpoint saves
    start_step: the global step this invocation started from (0, or where it resumed)
    metrics_log: metrics.jsonl (rank 0), optionally mirrored to TensorBoard; a no-op elsewhere
    summary_path, summary: summary.json and its contents so far
    packed: whether the text tower runs on packed tokens (train.packed_text without compile)
    """

    def __init__(self, recipe: Recipe, runtime: Runtime):
        self.recipe = recipe
        self.runtime = runtime

    def run(self) -> dict:
        """Train every epoch not yet done; the run's summary (summary.json's contents)."""
        self.setup()
        while self.state.epoch < self.recipe.train.epochs:
            self.train_epoch()
            metrics = self.validate()  # None on ranks other than 0, and without a validation split
            self.save(metrics)
        return self.finish()

    # ---- setup
    def setup(self) -> None:
        """Everything before the first step, in this order on every rank: the run directory (logging,
        the recipe check), the demo data, the splits, the model, the image cache and training pairs,
        the optimizer, the state to resume from, and (on a fresh run) the validation before training."""
        self._setup_run_dir()
        self._write_demo_data()
        self._read_splits()
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()
        self._resume()
        if self.checkpoint is None:
            torch.manual_seed(self.recipe.seed)
            if self.recipe.eval.before_training:
                self._validate_before_training()
        # the others wait here, not in a step's collective, while rank 0 validates
        distributed.host_barrier("rank 0 validated before training")
        self.packed = self.recipe.train.packed_text and not self.recipe.train.compile
        self.model.train()
        lock_image_tower(self.clip)

    def _setup_run_dir(self) -> None:
        recipe = self.recipe
        self.run_dir = run_dir = Path(recipe.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.main_rank = distributed.is_main()
        distributed.check_shared_directories(shared_directories(recipe))
        setup_logging(run_dir / "train.log" if self.main_rank else None)
        if not self.main_rank:
            logging.getLogger().setLevel(logging.WARNING)
        check_run_dir(run_dir, recipe)
        distributed.barrier()  # every rank has read the saved recipe before rank 0 rewrites it
        if self.main_rank:
            dump_recipe(recipe, run_dir / RECIPE_FILE)

    def _write_demo_data(self) -> None:
        recipe = self.recipe
        if recipe.data.generate == "demo" and self.main_rank:
            from .demo_data import write_demo_dataset

            write_demo_dataset(recipe.data.root, seed=recipe.seed)
        distributed.barrier()

    def _read_splits(self) -> None:
        # Every split the run needs is read (and an empty or unusable one refused, DataError) before the
        # model is loaded and the image cache is built: a data set with no validation pairs fails in seconds.
        data = self.recipe.data

        def read() -> tuple[SkipLog, Split, Split | None]:
            skips = SkipLog()
            train_split = load_data_split(data, data.train_split, skips)
            return skips, train_split, load_data_split(data, data.valid_split, skips) if data.valid_split else None

        if data.format == "hf":  # each rank opens the set: `datasets` keeps (and downloads) it per node
            self.skips, self.train_split, self.valid_split = read()
            return
        # Reading indexes and hashes every image file whole (the cache key): rank 0 alone does it, and the
        # others get the splits (file paths, byte offsets, texts, skip counts) from it, not 8x the I/O per node.
        self.skips, self.train_split, self.valid_split = distributed.computed_on_main(read, "rank 0 read the data")

    def _setup_model(self) -> None:
        recipe, runtime = self.recipe, self.runtime
        log.info("device %s, precision %s, %d process(es)%s", runtime.device, runtime.precision,
                 distributed.world_size(), ", deterministic algorithms" if recipe.train.deterministic else "")
        # One download per node: its local rank 0 fills the Hub / ModelScope cache, the others then read it.
        self.base = distributed.local_main_first(lambda: load_base_model(recipe.model, seed=recipe.seed),
                                                 "the first rank of each node loaded the model")
        check_context_length(self.base.clip, recipe.data.context_length)
        torch.manual_seed(recipe.seed)  # LoRA's initial A matrices are random: same seed, same start
        # LoRA (a peft model) or the full text tower (the model itself); the image side is the cache either way.
        self.model = attach_text_tuning(self.base.clip, recipe.model).to(runtime.device)
        self.clip = self.base.clip
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        distributed.broadcast_parameters(self.trainable)
        # alpha 0 of WiSE-FT: taken before any checkpoint is loaded, so a resumed run has it too (LoRA's B
        # matrices start at zero; the base projection, logit scale and, for full tuning, text tower as loaded).
        self.base_trainables = wise.snapshot_trainables(self.model) if recipe.train.wise is not None else None
        prepare_text_tower(self.clip, recipe.train.gradient_checkpointing, recipe.train.compile)
        # Full text tuning on several processes: DDP all-reduces the tower's gradients in buckets during backward.
        self.text_encoder = (distributed.data_parallel(TextEncoder(self.clip)) if recipe.model.text_tuning == "full"
                             else None)
        if self.text_encoder is not None:
            log.info("text tower gradients: all-reduced by DDP in buckets, overlapping backward")
        log.info(describe_trainable(self.model))

    def _image_features(self, split: Split, layout: EmbeddingLayout = HOST_FLOAT32) -> ImageFeatures:
        # Every rank embeds its share of the cache parts, then all read the whole cache (image_cache.py).
        recipe = self.recipe
        return split_image_features(split.images, self.clip, self.transform, self.tower, self.runtime,
                                    recipe.cache.dir, recipe.cache.batch_size, recipe.data.num_workers, self.skips,
                                    recipe.cache.part_size, sharded=True, layout=layout)

    def _setup_data(self) -> None:
        """The image-embedding cache (the image tower runs here, and only here) and the training pairs."""
        recipe = self.recipe
        self.transform = ImageTransform(self.base.preprocess)
        self.tower = image_tower_fingerprint(self.clip)
        self.train_features = self._image_features(self.train_split, bank_layout(self.runtime))
        self.pairs = build_pairs(self.train_split, self.train_features, self.base.tokenizer,
                                 recipe.data.context_length, self.skips)
        self.valid_features = None
        if self.valid_split is not None:
            self.valid_features = self._image_features(self.valid_split)
            # Count, once, the texts recall cannot score.
            scorable_texts(self.valid_split, self.valid_features, self.skips)
        self.zeroshot = (ZeroShotTracker.from_recipe(recipe, self.clip, self.base.tokenizer, self.transform,
                                                     self.runtime, self.skips)
                         if self.main_rank else None)  # only rank 0 validates
        distributed.host_barrier()  # the others wait on the host while rank 0 embeds the zero-shot folder
        if self.skips.total:
            log.warning("skipped %d bad items while reading data: %s", self.skips.total, dict(self.skips.counts))
        self.image_bank = self.train_features.embeddings
        self.teacher = self._setup_teacher()
        log.info("training on %d pairs (%d captions, %d images)", len(self.pairs),
                 self.pairs.tokens["input_ids"].shape[0], len(self.train_features.ids))

    def _setup_teacher(self) -> Teacher | None:
        """train.distill's teacher, set up before any checkpoint is resumed (the frozen base's logit
        scale is copied now); None without distillation."""
        d = self.recipe.train.distill
        if d is None:
            return None
        if d.teacher is None:
            return frozen_base_teacher(self.model, self.clip, self.image_bank, d.weight, d.temperature)
        return loaded_teacher(self.recipe, self.base.tokenizer, self.train_split.images, self.train_features,
                              self.runtime, self.skips)

    def _setup_optimizer(self) -> None:
        recipe = self.recipe
        self.world = world = distributed.world_size()
        if recipe.train.batch_size % world:
            raise ConfigError(f"recipe key 'train.batch_size' ({recipe.train.batch_size}) is the global batch and must "
                              f"split evenly over the {world} processes")
        # The global batch; each rank takes 1/world of it.
        self.batch_size = min(recipe.train.batch_size, len(self.pairs) // world * world)
        # The last partial batch is dropped: every step sees a full batch.
        self.steps_per_epoch = len(self.pairs) // self.batch_size
        self.total_steps = recipe.train.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(self.model, recipe, self.runtime)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(min(recipe.train.warmup_steps, self.total_steps), self.total_steps))
        self.scaler = self.runtime.grad_scaler()

    def _resume(self) -> None:
        """The state to start from (the latest checkpoint's, if any), metrics.jsonl and summary.json."""
        recipe, run_dir = self.recipe, self.run_dir
        self.checkpoint = checkpoint = latest_checkpoint(run_dir)
        self.state = state = TrainState()
        if checkpoint is not None:
            self.state = state = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
            if state.loss_scaler is not None and self.scaler.is_enabled():
                self.scaler.load_state_dict(state.loss_scaler)
        # Every rank must resume from the same step: ranks that see another run_dir (a node without the
        # shared filesystem) would otherwise run collectives that never match.
        distributed.same_on_every_rank(
            state.global_step, f"the step to resume from (run_dir {run_dir} and cache.dir must be on a filesystem "
                               "that every node shares)")
        self.start_step = state.global_step
        if checkpoint is not None and state.global_step >= self.total_steps:
            log.info("nothing to train: %s already finished all %d steps (%d epochs); the results are the finished "
                     "run's", run_dir, self.total_steps, recipe.train.epochs)
        elif checkpoint is not None:
            log.info("resuming from %s (epoch %d, step %d of %d)", checkpoint, state.epoch + 1, state.global_step,
                     self.total_steps)
        self.metrics_log = (MetricsLog(run_dir / "metrics.jsonl", state.global_step if checkpoint else None)
                            if self.main_rank else NoMetricsLog())
        if self.main_rank and recipe.logging.tensorboard:  # the same entries, also as TensorBoard scalars
            self.metrics_log = TensorBoardLog(self.metrics_log, run_dir / TENSORBOARD_DIR)
        self.summary_path = run_dir / "summary.json"
        self.summary = (json.loads(self.summary_path.read_text(encoding="utf-8"))
                        if checkpoint and self.summary_path.is_file() else {})

    def _validate_before_training(self) -> None:
        before = self.validate()
        if before is not None:
            report_epoch(f"validation recall before training ({self.valid_split.name})", before)
            self.metrics_log.write(step=0, epoch=0, valid=before)
            self.summary["before"] = before
            write_json(self.summary_path, self.summary)

    # ---- one epoch
    def train_epoch(self) -> None:
        """The steps left in this epoch (all of them, unless it resumed mid-epoch), with logging and
        mid-epoch checkpoints."""
        recipe, state = self.recipe, self.state
        order = torch.randperm(len(self.pairs),
                               generator=torch.Generator().manual_seed(recipe.seed * 1000 + state.epoch))
        progress = tqdm(total=self.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}",
                        unit="step", dynamic_ncols=True, disable=not self.main_rank)
        tic, seen = time.perf_counter(), 0
        while state.step_in_epoch < self.steps_per_epoch:
            start = state.step_in_epoch * self.batch_size
            idx = distributed.local_slice(order[start:start + self.batch_size])  # this rank's share of the global batch
            loss, lr = self._step(idx)
            state.step_in_epoch += 1
            state.global_step += 1
            crash_point("train-step")
            seen += len(idx) * self.world
            progress.update(1)
            if state.global_step % recipe.train.log_every == 0:  # .item() waits for the device: only here
                elapsed = time.perf_counter() - tic
                progress.set_postfix(loss=f"{loss.item():.4f}")
                self.metrics_log.write(step=state.global_step, epoch=state.epoch, loss=loss.item(),
                                       lr=lr, logit_scale=self.clip.logit_scale.exp().item(),
                                       samples_per_s=seen / max(elapsed, 1e-9))
                tic, seen = time.perf_counter(), 0
            if (state.global_step % recipe.train.save_every == 0 and state.step_in_epoch < self.steps_per_epoch
                    and self.main_rank):
                self._save_checkpoint()
        progress.close()

    def _step(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimizer step on this rank's pairs `idx`; the loss (still on the device) and the rate it used."""
        recipe, runtime, pairs, state = self.recipe, self.runtime, self.pairs, self.state
        image_rows = pairs.image_rows[idx].to(runtime.device, non_blocking=True)
        tokens = gather_tokens(pairs.tokens, pairs.text_rows[idx], runtime.device)
        if self.packed:  # the mask's host copy: the packed layout is computed without waiting for the GPU
            tokens["host_attention_mask"] = pairs.tokens["attention_mask"][pairs.text_rows[idx],
                                                                           :tokens["attention_mask"].shape[1]]
        self.optimizer.zero_grad(set_to_none=True)
        seed_step(recipe.seed, distributed.rank(), state.global_step)  # dropout: same masks however resumed
        teacher_images = None if self.teacher is None else self.teacher.image_bank[image_rows]
        with attention_kernels(recipe.train.deterministic, runtime.device):
            # contrastive_step and clamp_logit_scale are looked up in this module at call time (tests replace them).
            loss = contrastive_step(self.clip, self.trainable, tokens, self.image_bank[image_rows], image_rows,
                                    pairs.text_keys[idx].to(runtime.device, non_blocking=True), runtime,
                                    recipe.train.grad_cache_chunk, packed=self.packed, teacher=self.teacher,
                                    teacher_image_emb=teacher_images, text_encoder=self.text_encoder,
                                    scaler=self.scaler, image_bank=self.image_bank,
                                    loss_chunk=recipe.train.loss_chunk)
        self.scaler.unscale_(self.optimizer)  # fp16: the true gradients, before clipping (a no-op otherwise)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.trainable, recipe.train.grad_clip if recipe.train.grad_clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):  # the step's one host-device sync
            # Not scaler.step: it would wait on the device again for the same finiteness check.
            self.optimizer.step()
        elif fp16_overflow(self.scaler, loss):  # the scaler's normal work: a smaller scale, no bad step
            skip_overflow_step(state, self.metrics_log, self.scaler)
        else:  # one bad batch must not poison the weights: skip the update, count it
            skip_non_finite_step(state, recipe, self.run_dir, self.metrics_log, loss, grad_norm)
        self.scaler.update()  # fp16: halves the scale after an overflow, grows it after a run of good steps
        self.scheduler.step()
        clamp_logit_scale(self.clip)
        return loss, lr

    def validate(self) -> dict | None:
        """Recall on the validation split, plus zero-shot accuracy when the recipe has a zero-shot check;
        None on ranks other than 0 (rank 0 validates; the others go on) and without a validation split."""
        if self.valid_split is None or not distributed.is_main():
            return None
        self.model.eval()
        result = evaluate_split(self.clip, self.base.tokenizer, self.valid_split, self.valid_features, self.runtime,
                                self.recipe.data.context_length, self.recipe.eval.batch_size)
        if self.zeroshot is not None:  # forgetting check: zero-shot accuracy on a held-out classification folder
            result.metrics["zeroshot"] = self.zeroshot.score(self.clip)
        self.model.train()
        lock_image_tower(self.clip)
        return result.metrics

    def save(self, metrics: dict | None) -> None:
        """The end of an epoch: rank 0 keeps its results (`_keep_results`) and checkpoints; every rank
        moves on to the next epoch, the others waiting on the host until rank 0 is done."""
        state = self.state
        if self.main_rank:  # rank 0 validates, keeps the best model and checkpoints
            self._keep_results(metrics)
        state.epoch += 1
        state.step_in_epoch = 0
        if self.main_rank:
            self._save_checkpoint()
        distributed.host_barrier("rank 0 validated and saved the epoch")

    def _save_checkpoint(self) -> None:
        """A resumable checkpoint of the state as it is now (fp16's loss scale included)."""
        self.state.loss_scaler = self.scaler.state_dict() if self.scaler.is_enabled() else None
        save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, self.state)

    def _keep_results(self, metrics: dict | None) -> None:
        """The finished epoch's validation: reported, logged, the best model kept (by mean recall, or
        the latest epoch without a validation split), summary.json and the plots rewritten."""
        state, summary, valid_split = self.state, self.summary, self.valid_split
        finished_epoch = state.epoch + 1
        if metrics is not None:
            report_epoch(f"epoch {finished_epoch} validation recall ({valid_split.name})", metrics)
            self.metrics_log.write(step=state.global_step, epoch=finished_epoch, valid=metrics)
        score = metrics["mean_recall"] if metrics is not None else float(finished_epoch)
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_epoch = score, finished_epoch
            save_best(self.run_dir, self.model, {"epoch": finished_epoch, "step": state.global_step,
                                                 "split": valid_split.name if valid_split else None,
                                                 "valid": metrics})
            summary["best"] = {"epoch": finished_epoch, "valid": metrics}
        summary["after"] = metrics
        summary["last_epoch"] = finished_epoch
        summary["skipped"] = self.skips.summary()
        write_json(self.summary_path, summary)
        write_run_plots(self.run_dir)  # RUN/plots/*.png, redrawn from metrics.jsonl

    # ---- the end
    def finish(self) -> dict:
        """The run's summary: rank 0 runs the WiSE-FT sweep (train.wise), completes summary.json and writes
        its lines to train.log."""
        if self.main_rank and self.recipe.train.wise is not None:
            self.wise_sweep()
        distributed.host_barrier("rank 0 ran the WiSE-FT sweep")  # the others wait on the host meanwhile
        distributed.barrier()  # rank 0 finishes its last validation and checkpoint before anyone leaves
        if not self.main_rank:
            return self.summary
        summary, state = self.summary, self.state
        summary.setdefault("skipped", self.skips.summary())
        summary["steps"] = state.global_step
        summary["steps_this_run"] = state.global_step - self.start_step  # 0: a finished run, rerun
        write_json(self.summary_path, summary)
        for line in summary_lines(summary, self.run_dir):  # what the command prints, in train.log too
            log.info(line, extra=FILE_ONLY)
        return summary

    def wise_sweep(self) -> None:
        """WiSE-FT (cnclip.wise): validate the best epoch's model at every alpha of train.wise.alphas, pick
        one by train.wise.pick, and make best/ that model (the fine-tuned weights kept beside it, for
        `--alpha`); then RUN/wise.json and RUN/plots/wise.png.

        A run whose wise.json has the recipe's alphas and rule is not swept again; a finished run rerun
        with other train.wise values (or with train.wise newly set) is swept again from the fine-tuned
        weights, training nothing. Crash-safe: best/ is replaced whole before wise.json is written, and a
        sweep redone after a crash reads the fine-tuned weights from best/ either way."""
        w, run_dir = self.recipe.train.wise, self.run_dir
        wise_path, best = run_dir / wise.WISE_FILE, run_dir / "best"
        done = json.loads(wise_path.read_text(encoding="utf-8")) if wise_path.is_file() else None
        if done is not None and (done["alphas"], done["rule"], done["max_zeroshot_drop"]) == (
                w.alphas, w.pick, w.max_zeroshot_drop):  # a finished run, rerun: its sweep is done
            self.summary.setdefault("wise", picked_summary(done))
            return
        from safetensors.torch import load_file

        tuned_file = best / wise.TUNED_FILE if (best / wise.TUNED_FILE).is_file() else best / TRAINABLE
        tuned = load_file(str(tuned_file))
        best_meta = json.loads((best / "metrics.json").read_text(encoding="utf-8"))
        table = []
        for alpha in w.alphas:
            wise.set_trainables(self.model, wise.interpolate(self.base_trainables, tuned, alpha))
            metrics = self.validate()
            report_epoch(f"WiSE-FT alpha {alpha:g} validation recall ({self.valid_split.name})", metrics)
            table.append({"alpha": alpha, "valid": metrics})
        picked = wise.pick_alpha(table, w.pick, w.max_zeroshot_drop)
        picked_metrics = next(r["valid"] for r in table if r["alpha"] == picked)
        wise.set_trainables(self.model, wise.interpolate(self.base_trainables, tuned, picked))
        tuned_metrics = best_meta.get("tuned_valid", best_meta.get("valid"))
        choice = {"alpha": picked, "rule": w.pick, "rule_text": wise.rule_text(w.pick, w.max_zeroshot_drop)}
        save_best(run_dir, self.model, {**best_meta, "valid": picked_metrics, "tuned_valid": tuned_metrics,
                                        "wise": choice},
                  extra_tensors={wise.TUNED_FILE: tuned})
        record = wise.write_wise_json(wise_path, table, w.pick, w.max_zeroshot_drop, picked, best_meta.get("epoch"))
        plot = write_wise_plot(run_dir, record)
        self.summary["wise"] = picked_summary(record)  # summary["best"] stays the best epoch's (alpha 1)
        write_json(self.summary_path, self.summary)
        log.info("WiSE-FT: alpha %g picked by rule %s; wrote %s%s and best/", picked, w.pick, wise_path,
                 f", {plot}" if plot else "")


def picked_summary(record: dict) -> dict:
    """summary.json's "wise": the picked alpha, its rule and scores, and alpha 1's mean recall."""
    rows = {r["alpha"]: r["valid"] for r in record["metrics"]}
    picked = rows[record["picked_alpha"]]
    return {"alpha": record["picked_alpha"], "rule": record["rule"], "rule_text": record["rule_text"],
            "mean_recall": picked["mean_recall"], "zeroshot_top1": wise.zeroshot_top1(picked),
            "tuned_mean_recall": rows[1.0]["mean_recall"] if 1.0 in rows else None,
            "file": wise.WISE_FILE}
