"""Training throughput: the plain transformers + peft loop vs cnclip's cached path; prints one JSON document.

Both run side by side in one process on the same randomly initialised ChineseCLIPModel with the shapes
of OFA-Sys/chinese-clip-vit-base-patch16 (ViT-B/16 at 224 px, RoBERTa-base text tower: 12 layers,
hidden 768, vocab 21128, projection 512), the same data, batch size and LoRA config (r 16, alpha 32,
dropout 0.05 on query/value, text projection trained).

* baseline: the loop the transformers and peft docs lead to: get_peft_model, then every step
  `model(input_ids=..., attention_mask=..., pixel_values=..., return_loss=True)`, backward, AdamW.
  The image tower is frozen (peft freezes the base) but runs forward every step. Pixels arrive
  already preprocessed, so the baseline is *not* charged for JPEG decoding or resizing.
* cnclip: image embeddings computed once (encode_images, no grad: the one-time cache cost, in
  images/s), then the trainer's own step: `FinetuneRun._step` (cnclip.trainer), the method every
  optimizer step of `cnclip finetune` runs, on a FinetuneRun that holds this benchmark's model and
  data where its setup() would have read them from files: the host copy of the attention mask,
  the per-step seeding, cnclip.train_step.contrastive_step (text tower + cached embeddings + masked
  InfoNCE), gradient clipping, the finiteness check, fused-where-possible AdamW, the learning-rate
  schedule and the logit-scale clamp. The recipe is built by cnclip.recipe.load_recipe from the
  benchmark's options, so the LoRA settings are the recipe defaults.

Reported per caption-length scenario ("short": 6-24 Chinese characters, like MUGE's shopping
queries; "max": every caption 52 tokens, the context length, the worst case for cnclip): samples/s of
both and the ratio (median step; the loops alternate step by step so a busy spell hits both), peak
memory of the steps and of the cache pass (rise of RSS high-water mark on CPU, of max allocated on
CUDA, each in a fresh process), the FLOPs of one step counted by torch's FlopCounterMode and the
achieved FLOP/s as a fraction of the machine's own large-matmul FLOP/s measured in the same run
in the dtype the steps compute in (the runtime's autocast dtype, else float32 under the process's
float32 matmul precision; the best of measurements before, between and after), the one-time cache cost
in images/s, and the epoch count after which cnclip's total time (cache + training) is below the
baseline's (for one image per pair, and for MUGE's 0.52 images per pair). Load averages are
recorded: on a shared machine, compare runs only at similar load.

    python benchmarks/train_throughput.py            # full (several minutes on a 2-core CPU)
    python benchmarks/train_throughput.py --small    # smoke test: 2+2 layers, tiny batch, < 1 min

Also measured, cnclip's loop only, each pair of variants interleaved step by step in the same run:
"distill", the step with train.distill's default teacher (the frozen base) against the step without
it ("short" captions; step_time_ratio = with / without); "context_lengths", the step with every
caption filling data.context_length at 52, 128 and 256 tokens (ratios to the first length).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # peak_memory, however this file is loaded

from peak_memory import PeakMemory  # noqa: E402
from cnclip.checkpoint import TrainState  # noqa: E402
from cnclip.data import gather_tokens  # noqa: E402
from cnclip.runtime import AUTOCAST_DTYPES, Runtime, float32_matmuls, pick_runtime  # noqa: E402
from cnclip.models import attach_text_tuning, encode_images, lock_image_tower  # noqa: E402
from cnclip.recipe import Recipe, load_recipe  # noqa: E402
from cnclip.train_step import prepare_text_tower  # noqa: E402
from cnclip.trainer import FinetuneRun, NoMetricsLog, TrainingPairs  # noqa: E402

CONTEXT_LENGTH = 52
CLS, SEP, FIRST_ORDINARY_ID = 101, 102, 106  # bert-base-chinese's special-token ids
_MODEL_DEFAULTS = Recipe().model  # the recipe's LoRA settings: what both loops train
LORA = dict(r=_MODEL_DEFAULTS.lora_r, alpha=_MODEL_DEFAULTS.lora_alpha, dropout=_MODEL_DEFAULTS.lora_dropout,
            target_modules=list(_MODEL_DEFAULTS.target_modules))
# MUGE: 250,314 training pairs over 129,380 images, so a pair costs ~0.52 cached images.
MUGE_IMAGES_PER_PAIR = 129_380 / 250_314


def model_config(small: bool):
    from transformers import ChineseCLIPConfig

    layers = 2 if small else 12
    return ChineseCLIPConfig(
        text_config=dict(vocab_size=21128, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=12, max_position_embeddings=512, type_vocab_size=2),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers, num_attention_heads=12,
                           image_size=224, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=512,
    )


def make_captions(n: int, scenario: str, gen: torch.Generator, context_length: int = CONTEXT_LENGTH,
                  vocab_size: int = 21128) -> dict[str, torch.Tensor]:
    """Token tensors padded to the context length, as cnclip.data.tokenize leaves them (ids below `vocab_size`)."""
    if scenario == "max":
        lengths = torch.full((n,), context_length)
    else:
        # characters + [CLS] + [SEP], at most the context length (cnclip.data.tokenize truncates)
        lengths = (torch.randint(6, 25, (n,), generator=gen) + 2).clamp_max(context_length)
    ids = torch.randint(FIRST_ORDINARY_ID, vocab_size, (n, context_length), generator=gen)
    positions = torch.arange(context_length)[None, :]
    mask = (positions < lengths[:, None]).long()
    ids = ids * mask
    ids[:, 0] = CLS
    ids[torch.arange(n), lengths - 1] = SEP
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


# ---- measurement helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(runtime: Runtime, small: bool, n: int | None = None) -> dict:
    """The machine's own dense-matmul rate in the dtype the training steps compute in (the runtime's
    autocast dtype, else float32, in TF32 where the caller turned it on as training does): the ceiling
    a training step can be compared against. `n`: the matrix size (default by device)."""
    device = runtime.device
    dtype = runtime.autocast_dtype or torch.float32
    n = n or (8192 if device.type == "cuda" else (2048 if small else 4096))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    reps, best = (20 if device.type == "cuda" else 3), 0.0
    for _ in range(3):  # best of 3: the machine's capability, not its momentary load
        tic = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - tic))
    return {"flops_per_s": best, "size": n, "dtype": str(dtype).replace("torch.", "")}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def text_step_flops_analytic(cfg, tokens: dict[str, torch.Tensor]) -> float:
    """Forward + activation-gradient backward of the text tower over the batch padded to its longest.

    Per layer and caption of L tokens: 24*L*H^2 (Q, K, V, O projections and the 4H feed-forward)
    + 4*L^2*H (scores and weighted sum); backward to the activations costs the same again. The
    baseline pays this; cnclip's packed path skips the padding and most of the last layer.
    """
    t = cfg.text_config
    length = int(tokens["attention_mask"].sum(1).max())
    per_caption = t.num_hidden_layers * (24 * length * t.hidden_size ** 2 + 4 * length ** 2 * t.hidden_size)
    return 2.0 * per_caption * tokens["input_ids"].shape[0]


# ---- the two training loops

def baseline_setup(pristine, data: dict, runtime: Runtime, batch: int):
    """What a user writes from the transformers + peft docs: the whole model, every step."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(pristine), LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["target_modules"],
        modules_to_save=["text_projection"])).to(runtime.device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    device = runtime.device

    def step(i: int) -> None:
        rows = torch.arange(i * batch, (i + 1) * batch) % data["n"]
        inputs = gather_tokens(data["tokens"], rows, device)  # padding=True: padded to the batch's longest
        pixels = data["pixels"][rows].to(device, non_blocking=True)
        with runtime.autocast():
            out = model(**inputs, pixel_values=pixels, return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def cnclip_cache(clip, data: dict, runtime: Runtime, cache_batch: int) -> tuple[torch.Tensor, float]:
    """The one-time cost: every training image through the locked image tower, no graph."""
    device = runtime.device
    bank = []
    lock_image_tower(clip)
    with torch.no_grad():
        sync(device)
        tic = time.perf_counter()
        for start in range(0, data["n"], cache_batch):
            pixels = data["pixels"][start:start + cache_batch].to(device, non_blocking=True)
            with runtime.autocast():
                bank.append(encode_images(clip, pixels).float())
        sync(device)
        elapsed = time.perf_counter() - tic
    return torch.cat(bank), data["n"] / elapsed


def bench_recipe(args, batch: int, distill: bool = False) -> Recipe:
    """The recipe `cnclip finetune` would run with this benchmark's options (everything else at its
    default); with `distill`, train.distill's default teacher (the frozen base)."""
    overrides = ["data.root=in-memory", f"seed={args.seed}", f"train.batch_size={batch}", f"train.grad_cache_chunk={args.grad_cache_chunk}",
                 f"train.packed_text={'false' if args.no_packing else 'true'}"]
    if distill:
        overrides.append("train.distill.weight=1.0")
    return load_recipe(None, overrides, check_data=False)


def trainer_run(clip, data: dict, runtime: Runtime, recipe: Recipe, image_bank: torch.Tensor) -> FinetuneRun:
    """A FinetuneRun ready for its per-step method `_step`, holding this benchmark's model and data where
    `FinetuneRun.setup()` would have loaded them from files; the text tuning, teacher, optimizer and
    schedule are set up by the trainer's own functions from `recipe`. Pair i is caption i with image i."""
    run = FinetuneRun(recipe, runtime)
    run.clip = clip
    run.model = attach_text_tuning(clip, recipe.model).to(runtime.device)
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]
    prepare_text_tower(clip, recipe.train.gradient_checkpointing, recipe.train.compile)
    run.text_encoder = None  # LoRA: no DDP wrapper (FinetuneRun._setup_model makes one for full tuning only)
    rows = torch.arange(data["n"])
    run.pairs = TrainingPairs(tokens=data["tokens"], text_rows=rows, image_rows=rows, text_keys=rows)
    run.image_bank = image_bank
    run.teacher = run._setup_teacher()
    run._setup_optimizer()
    run.state, run.start_step = TrainState(), 0
    run.run_dir, run.metrics_log = Path(tempfile.gettempdir()), NoMetricsLog()  # written only on a skipped step
    run.packed = recipe.train.packed_text and not recipe.train.compile
    run.model.train()
    lock_image_tower(clip)
    return run


def cnclip_setup(pristine, data: dict, runtime: Runtime, batch: int, args, image_bank=None, distill: bool = False):
    """cnclip's path: image embeddings from the cache, then the trainer's step (`FinetuneRun._step`) on
    batch after batch of the data; with `distill`, train.distill's default teacher too (the frozen base:
    the LoRA adapter switched off). Returns (step(i), the cache timing, the model)."""
    clip = copy.deepcopy(pristine)
    cache = {}
    if image_bank is None:
        image_bank, cache["images_per_s"] = cnclip_cache(clip, data, runtime, args.cache_batch)
    run = trainer_run(clip, data, runtime, bench_recipe(args, batch, distill), image_bank)

    def step(i: int) -> None:
        run._step(torch.arange(i * batch, (i + 1) * batch) % data["n"])

    return step, cache, clip


def make_data(name: str, n: int, seed: int, device: torch.device, context_length: int = CONTEXT_LENGTH) -> dict:
    gen = torch.Generator().manual_seed(seed)
    data = {"n": n, "tokens": make_captions(n, name, gen, context_length),
            "pixels": torch.randn(n, 3, 224, 224, generator=gen)}
    if device.type == "cuda":
        data["pixels"] = data["pixels"].pin_memory()
        data["tokens"] = {k: v.pin_memory() for k, v in data["tokens"].items()}
    return data


def interleaved_times(steps: dict, device: torch.device, warmup: int, count: int) -> dict[str, list[float]]:
    """Alternate the loops step by step (order flipped each round), so a busy spell hits both."""
    names = list(steps)
    for i in range(warmup):
        for name in names:
            steps[name](i)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup, warmup + count):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync(device)
            tic = time.perf_counter()
            steps[name](i)
            sync(device)
            times[name].append(time.perf_counter() - tic)
    return times


def break_even_epochs(base_sps: float, cn_sps: float, cache_ips: float, images_per_pair: float) -> float | None:
    """Epochs E after which cache + E epochs of cnclip take less time than E baseline epochs."""
    gain_per_pair = 1 / base_sps - 1 / cn_sps
    if gain_per_pair <= 0:
        return None
    return images_per_pair / cache_ips / gain_per_pair


def memory_probe(loop: str, name: str, args) -> dict:
    """Run in a fresh process: peak memory of one loop's steps (and of cnclip's cache pass)."""
    runtime = pick_runtime(args.device, args.precision)
    cfg = model_config(args.small)
    torch.manual_seed(args.seed)
    from transformers import ChineseCLIPModel

    pristine = ChineseCLIPModel(cfg).to(runtime.device)
    data = make_data(name, args.batch * (args.warmup + 1), args.seed, runtime.device)
    out: dict = {}
    if loop == "baseline":
        step = baseline_setup(pristine, data, runtime, args.batch)
    else:
        clip = copy.deepcopy(pristine)  # nothing is freed before a measurement: freed heap would hide growth
        with PeakMemory(runtime.device) as mem:
            bank, _ = cnclip_cache(clip, data, runtime, args.cache_batch)
        out["cache_peak_rise_mb"] = mem.rise_mb
        step, _, _ = cnclip_setup(pristine, data, runtime, args.batch, args, image_bank=bank)
    with PeakMemory(runtime.device) as mem:
        for i in range(args.warmup + 1):
            step(i)
    out["step_peak_rise_mb"] = mem.rise_mb  # the rise only: the probe holds extra model copies
    return out


def start_probe(loop: str, name: str, args) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", loop, "--scenarios", name,
           "--batch", str(args.batch), "--warmup", str(args.warmup), "--cache-batch", str(args.cache_batch),
           "--grad-cache-chunk", str(args.grad_cache_chunk), "--device", args.device, "--seed", str(args.seed),
           "--precision", args.precision]
    cmd += ["--small"] if args.small else []
    cmd += ["--no-packing"] if args.no_packing else []
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def probe_result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        return {"error": stderr[-2000:]}
    return json.loads(stdout.strip().splitlines()[-1])


def summarise(times: list[float], batch: int) -> dict:
    """Headline numbers use the median step: on a shared machine the minimum flatters the short
    step (a quiet half-second is likelier than a quiet seven seconds); the best step is kept too."""
    return {"step_times_s": [round(t, 3) for t in times], "step_s_median": statistics.median(times),
            "step_s_best": min(times), "samples_per_s": batch / statistics.median(times),
            "samples_per_s_best": batch / min(times)}


def run_scenario(name: str, pristine, cfg, runtime: Runtime, args) -> dict:
    n = args.batch * (args.warmup + args.steps)
    data = make_data(name, n, args.seed, runtime.device)
    cn_step, cache, _ = cnclip_setup(pristine, data, runtime, args.batch, args)
    base_step = baseline_setup(pristine, data, runtime, args.batch)
    times = interleaved_times({"baseline": base_step, "cnclip": cn_step}, runtime.device, args.warmup, args.steps)
    base, cn = summarise(times["baseline"], args.batch), summarise(times["cnclip"], args.batch)
    tokens0 = gather_tokens(data["tokens"], torch.arange(args.batch), "cpu")
    cn["text_flops_padded_analytic"] = text_step_flops_analytic(cfg, tokens0)
    if not args.no_flops:
        for result, step in ((base, base_step), (cn, cn_step)):
            result["flops_per_step"] = count_flops(lambda: step(0))
            result["achieved_flops_per_s"] = result["flops_per_step"] / result["step_s_median"]
    del base_step, cn_step
    gc.collect()
    if not args.no_memory and runtime.device.type == "cpu":  # separate processes measure independently
        procs = {loop: start_probe(loop, name, args) for loop in ("baseline", "cnclip")}
    elif not args.no_memory:  # one GPU: one probe at a time
        procs = {loop: probe_result(start_probe(loop, name, args)) for loop in ("baseline", "cnclip")}
    for loop, result in (("baseline", base), ("cnclip", cn)):
        if not args.no_memory:
            probe = procs[loop]
            result["memory"] = probe if isinstance(probe, dict) else probe_result(probe)
            if "cache_peak_rise_mb" in result["memory"]:
                cache["peak_rise_mb"] = result["memory"].pop("cache_peak_rise_mb")
    cache["images"] = n
    out = {
        "caption_tokens_mean": round(float(data["tokens"]["attention_mask"].sum(1).float().mean()), 1),
        "baseline": base,
        "cnclip": cn,
        "speedup": cn["samples_per_s"] / base["samples_per_s"],
        "speedup_best_steps": cn["samples_per_s_best"] / base["samples_per_s_best"],
        "cache": cache,
    }
    if "flops_per_step" in cn:
        out["flop_ratio"] = base["flops_per_step"] / cn["flops_per_step"]
    out["break_even_epochs"] = {
        "one_image_per_pair": break_even_epochs(base["samples_per_s"], cn["samples_per_s"],
                                                cache["images_per_s"], 1.0),
        "muge_images_per_pair": break_even_epochs(base["samples_per_s"], cn["samples_per_s"],
                                                  cache["images_per_s"], MUGE_IMAGES_PER_PAIR),
    }
    return out


def distill_cost(pristine, runtime: Runtime, args) -> dict:
    """cnclip's step with and without distillation towards the frozen base (train.distill), side by side
    on the same data ("short" captions): the ratio is what the teacher's one extra text forward costs."""
    n = args.batch * (args.warmup + args.steps)
    data = make_data("short", n, args.seed, runtime.device)
    plain, cache, clip = cnclip_setup(pristine, data, runtime, args.batch, args)
    bank = cnclip_cache(clip, data, runtime, args.cache_batch)[0]
    distill, _, _ = cnclip_setup(pristine, data, runtime, args.batch, args, image_bank=bank, distill=True)
    times = interleaved_times({"plain": plain, "distill": distill}, runtime.device, args.warmup, args.steps)
    out = {"plain": summarise(times["plain"], args.batch), "distill": summarise(times["distill"], args.batch)}
    out["step_time_ratio"] = out["distill"]["step_s_median"] / out["plain"]["step_s_median"]
    out["step_time_ratio_best_steps"] = out["distill"]["step_s_best"] / out["plain"]["step_s_best"]
    return out


def context_length_cost(pristine, runtime: Runtime, args) -> dict:
    """cnclip's step with every caption filling data.context_length, for each length side by side
    (interleaved): the text step's cost of long captions; ratios are to the first length."""
    n = args.batch * (args.warmup + args.steps)
    steps, bank = {}, None
    for length in args.context_lengths:
        data = make_data("max", n, args.seed, runtime.device, length)
        steps[length], cache, clip = cnclip_setup(pristine, data, runtime, args.batch, args, image_bank=bank)
        if bank is None:  # the same images for every length
            bank = cnclip_cache(clip, data, runtime, args.cache_batch)[0]
    times = interleaved_times(steps, runtime.device, args.warmup, args.steps)
    out = {str(length): summarise(times[length], args.batch) for length in args.context_lengths}
    first = out[str(args.context_lengths[0])]
    for length in args.context_lengths:
        r = out[str(length)]
        r["step_time_ratio"] = r["step_s_median"] / first["step_s_median"]
        r["step_time_ratio_best_steps"] = r["step_s_best"] / first["step_s_best"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="smoke test: 2 layers per tower, batch 4, 3 timed steps")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 32; 4 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per loop (default 5; 3 with --small)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache-batch", type=int, default=64)
    parser.add_argument("--grad-cache-chunk", type=int, default=0, help="cnclip's train.grad_cache_chunk")
    parser.add_argument("--scenarios", default=None,
                        help="caption lengths, comma-separated: short, max (default both; short with --small)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", *AUTOCAST_DTYPES),
                        help="train.precision for both loops (auto: as cnclip.runtime.pick_runtime chooses)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the square matrices the matmul ceiling is measured on (default 8192 on a GPU, "
                             "4096 on a CPU, 2048 with --small)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP-counted extra steps")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (child processes)")
    parser.add_argument("--no-packing", action="store_true", help="cnclip without train.packed_text")
    parser.add_argument("--no-distill", action="store_true", help="skip the distillation cost measurement")
    parser.add_argument("--context-lengths", default=None,
                        help="data.context_length values to time cnclip's step at, every caption that long, "
                             "comma-separated (default 52,128,256); 'none' to skip")
    parser.add_argument("--probe", choices=("baseline", "cnclip"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.small else 32)
    args.steps = args.steps or (3 if args.small else 5)
    args.scenarios = args.scenarios or ("short" if args.small else "short,max")
    lengths = args.context_lengths or "52,128,256"
    args.context_lengths = [] if lengths == "none" else [int(x) for x in lengths.split(",") if x.strip()]
    runtime = pick_runtime(args.device, args.precision)
    # float32 matmuls as `cnclip finetune` runs them (TF32 on CUDA), for the steps and the ceiling alike
    with float32_matmuls(runtime.device, deterministic=False) as tf32:
        if args.probe:
            print(json.dumps(memory_probe(args.probe, args.scenarios, args)))
            return 0
        return run_benchmark(args, parser, runtime, tf32)


def run_benchmark(args, parser: argparse.ArgumentParser, runtime: Runtime, tf32: bool) -> int:
    """Everything the benchmark measures, into one JSON document (stdout, and --out)."""
    from transformers import ChineseCLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = model_config(args.small)
    torch.manual_seed(args.seed)
    tic = time.perf_counter()
    pristine = ChineseCLIPModel(cfg).to(runtime.device)
    build_s = time.perf_counter() - tic
    matmul = {**matmul_flops_per_s(runtime, args.small, args.matmul_size), "tf32": tf32}
    result = {
        "benchmark": "train_throughput",
        "small": args.small,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {"text_layers": cfg.text_config.num_hidden_layers,
                  "vision_layers": cfg.vision_config.num_hidden_layers,
                  "hidden": 768, "vocab": 21128, "projection": 512, "image_size": 224, "patch": 16,
                  "attn_implementation": pristine.config._attn_implementation, "build_s": round(build_s, 1)},
        "lora": LORA,
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "grad_cache_chunk": args.grad_cache_chunk,
        "packed_text": not args.no_packing,
        "matmul": matmul,
        "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "scenarios": {},
    }
    rates = [matmul["flops_per_s"]]
    for name in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        if name not in ("short", "max"):
            parser.error(f"--scenarios: unknown scenario {name!r}; accepted: short, max")
        result["scenarios"][name] = run_scenario(name, pristine, cfg, runtime, args)
        rates.append(matmul_flops_per_s(runtime, args.small, args.matmul_size)["flops_per_s"])
    if not args.no_distill:
        result["distill"] = distill_cost(pristine, runtime, args)
    if args.context_lengths:
        result["context_lengths"] = context_length_cost(pristine, runtime, args)
    # The ceiling is the best matmul rate seen (before, between and after the scenarios): a busy
    # spell during one measurement must not flatter the training steps.
    result["matmul_rates_flops_per_s"] = rates
    ceiling = max(rates)
    result["matmul_ceiling_flops_per_s"] = ceiling
    for scenario in result["scenarios"].values():
        for loop in ("baseline", "cnclip"):
            r = scenario[loop]
            if "flops_per_step" in r:
                r["fraction_of_matmul"] = r["flops_per_step"] / r["step_s_median"] / ceiling
                r["fraction_of_matmul_best_step"] = r["flops_per_step"] / r["step_s_best"] / ceiling
    result["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
