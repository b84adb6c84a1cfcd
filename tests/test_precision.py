"""Precision and matmul settings: fp16 with a loss scaler where bf16 is not native, the CUDA build
check, and TF32. The GPU decisions run here with faked devices; the fp16 step runs on a CPU with
a real (enabled) GradScaler."""

import json

import pytest
import torch

import cnclip.trainer
from cnclip import runtime as rt
from cnclip.data import tokenize
from cnclip.errors import ConfigError, UsageError
from cnclip.finetune import main as finetune_main
from cnclip.runtime import (Runtime, choose_precision, cuda_build_runs_on, float32_matmuls, pick_runtime,
                            tf32_allowed)
from cnclip.trainer import fp16_overflow
from cnclip.train_step import contrastive_step

from conftest import DEMO_RECIPE, lora_model_with_gradients, tiny_overrides

CUDA = torch.device("cuda:0")
CPU = torch.device("cpu")


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], bf16: bool, arch_list: list[str]):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # pick_runtime makes the GPU current first


# ---- which precision


@pytest.mark.parametrize("device, native, asked, expected", [
    (CUDA, True, "auto", "bf16"),  # A100, H100
    (CUDA, False, "auto", "fp16"),  # T4, V100: fp16 tensor cores, with a loss scaler
    (CUDA, False, "fp16", "fp16"),
    (CUDA, True, "fp16", "fp16"),
    (CUDA, False, "fp32", "fp32"),
    (CPU, False, "auto", "fp32"),
    (CPU, False, "bf16", "bf16"),  # torch's CPU autocast has both
    (CPU, False, "fp16", "fp16"),
])
def test_precision_choice(monkeypatch, device, native, asked, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert choose_precision(device, asked, lambda dev: native) == expected


def test_bf16_on_a_gpu_without_it_is_refused_with_the_alternatives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError, match=r"Tesla V100-SXM2-16GB .* no native bf16.*use fp16, fp32 or auto"):
        choose_precision(CUDA, "bf16", lambda dev: False)


def test_auto_on_a_t4_is_fp16_with_an_enabled_scaler(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5), bf16=False, arch_list=["sm_75", "sm_80", "sm_86", "sm_90"])
    runtime = pick_runtime("cuda", "auto")
    assert (runtime.precision, runtime.autocast_dtype) == ("fp16", torch.float16)
    assert Runtime(CPU, torch.float16).grad_scaler().is_enabled()
    assert not Runtime(CPU, torch.bfloat16).grad_scaler().is_enabled()
    assert not Runtime(CPU, None).grad_scaler().is_enabled()


# ---- the build has kernels for the GPU


@pytest.mark.parametrize("arch_list, capability, runs", [
    (["sm_75", "sm_80", "sm_86", "sm_90"], (7, 5), True),  # T4 on a cu12x wheel
    (["sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], (7, 5), False),  # T4 on a build without Turing
    (["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], (7, 0), False),  # V100 on cu13
    (["sm_50", "sm_60", "sm_70", "sm_75", "sm_80"], (7, 0), True),
    (["sm_70"], (7, 5), True),  # machine code runs on later minors of its major
    (["sm_86"], (8, 0), False),  # ... not on earlier ones
    (["sm_80"], (9, 0), False),  # ... nor on another major
    (["sm_80", "compute_80"], (9, 0), True),  # PTX: compiled by the driver for later GPUs
    (["sm_90a"], (9, 0), True),
    (["sm_100a"], (10, 3), False),  # arch-specific code runs on its own capability only
    (["sm_100", "sm_120"], (12, 1), True),
    (["gfx90a"], (9, 0), False),  # nothing that names a CUDA architecture
])
def test_cuda_build_runs_on(arch_list, capability, runs):
    assert cuda_build_runs_on(arch_list, capability) is runs


def test_a_build_without_kernels_for_the_gpu_stops_with_a_message(monkeypatch):
    fake_gpu(monkeypatch, "Tesla V100-SXM2-16GB", (7, 0), bf16=False, arch_list=["sm_75", "sm_80", "sm_90"])
    with pytest.raises(UsageError, match=r"Tesla V100-SXM2-16GB \(cuda:0\) has compute capability 7\.0, but this "
                                         r"torch build .* has kernels only for sm_75 sm_80 sm_90"):
        pick_runtime("cuda", "auto")
    monkeypatch.setattr(torch.version, "cuda", None)  # a ROCm or CPU build: nothing to compare
    assert pick_runtime("cuda", "fp32").device == CUDA


# ---- TF32


def test_tf32_only_on_cuda_and_never_in_deterministic_mode():
    assert tf32_allowed(CUDA, deterministic=False)
    assert not tf32_allowed(CUDA, deterministic=True)
    assert not tf32_allowed(CPU, deterministic=False)


def test_tf32_is_set_inside_and_the_callers_setting_restored():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with float32_matmuls(CUDA, deterministic=False) as on:
        assert on and matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    for device, deterministic in ((CUDA, True), (CPU, False)):
        with float32_matmuls(device, deterministic) as on:
            assert not on and matmul.fp32_precision == before


@pytest.mark.parametrize("deterministic", [False, True])
def test_training_runs_under_tf32_on_cuda_unless_deterministic(monkeypatch, deterministic):
    seen = []
    monkeypatch.setattr(cnclip.trainer, "pick_runtime", lambda device, precision: Runtime(CUDA, None))
    monkeypatch.setattr(cnclip.trainer.FinetuneRun, "run",
                        lambda self: seen.append(torch.backends.cuda.matmul.fp32_precision) or {})
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)  # deterministic mode sets it on CUDA
    recipe = cnclip.trainer.load_recipe(DEMO_RECIPE, [f"train.deterministic={str(deterministic).lower()}"],
                                        check_data=False)
    before = torch.backends.cuda.matmul.fp32_precision
    cnclip.trainer.train(recipe)
    assert seen == [before if deterministic else "tf32"]
    assert torch.backends.cuda.matmul.fp32_precision == before


# ---- the fp16 step


CAPTIONS = ["一个红色的圆形", "左上角有一个蓝色的正方形", "猫", "高级感托特包斜挎", "白色连衣裙", "黑色男鞋"]


@pytest.mark.parametrize("chunk", [0, 4])
def test_scaled_step_gives_the_unscaled_gradient_after_unscale(tiny_model_dir, chunk):
    """The backward runs on the scaled loss (plain and gradient-cached): unscale_ then gives exactly the
    unscaled step's gradient (a power-of-two scale multiplies and divides without rounding)."""
    model, base = lora_model_with_gradients(tiny_model_dir, 0.0, ["query", "value"])
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = tokenize(base.tokenizer, CAPTIONS, 16)
    images = torch.randn(len(CAPTIONS), 16, generator=torch.Generator().manual_seed(0))
    keys = torch.arange(len(CAPTIONS))
    runtime = Runtime(CPU, None)

    def grads(scaler):
        for p in params:
            p.grad = None
        loss = contrastive_step(base.clip, params, tokens, images, keys, keys, runtime, chunk, scaler=scaler)
        return loss, [p.grad.clone() for p in params]

    loss, plain = grads(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaled_loss, scaled = grads(scaler)
    assert scaled_loss == loss  # the step returns the loss, not the scaled loss
    assert all(torch.equal(s, 2.0 ** 12 * g) for s, g in zip(scaled, plain))  # the backward was scaled
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler.unscale_(optimizer)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, plain))


def test_overflow_is_the_scalers_business_and_a_bad_loss_is_not():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    finite, nan = torch.tensor(1.5), torch.tensor(float("nan"))
    assert fp16_overflow(scaler, finite)
    assert not fp16_overflow(scaler, nan)  # the loss itself: a bad batch, counted
    assert not fp16_overflow(torch.amp.GradScaler("cpu", enabled=False), finite)  # bf16 / fp32
    assert not fp16_overflow(torch.amp.GradScaler("cpu", init_scale=1.0), finite)  # out of range unscaled


def test_fp16_training_skips_overflow_steps_halves_the_scale_and_checkpoints_it(
        tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """fp16 autocast on a CPU with the scaler starting far too high: the first steps overflow, are
    skipped without counting as bad steps (train.max_bad_steps=0 would stop the run otherwise), each
    halves the scale, and training goes on once the scale fits; the checkpoint keeps the scale."""
    start = 2.0 ** 18  # the tiny model's projection gradient leaves fp16's range above about 2**15
    monkeypatch.setattr(Runtime, "grad_scaler", lambda self: torch.amp.GradScaler(
        self.device.type, init_scale=start, enabled=self.autocast_dtype == torch.float16))
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, tiny_data_dir, run_dir, **{
        "train.precision": "fp16", "train.max_bad_steps": 0, "train.epochs": 1, "eval.before_training": False,
        "data.num_workers": 0})
    assert finetune_main([str(DEMO_RECIPE), *overrides]) == 0
    entries = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skips = [e for e in entries if e.get("skipped")]
    trained = [e for e in entries if "loss" in e and "skipped" not in e]
    assert skips and all(e["skipped"] == "fp16 gradient overflow" for e in skips)
    assert [e["loss_scale"] for e in skips] == [start / 2 ** i for i in range(len(skips))]
    assert trained  # the scale came down within range and steps were taken
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())
    assert state["bad_steps"] == 0 and state["loss_scaler"]["scale"] == start / 2 ** len(skips)
    assert "precision fp16" in (run_dir / "train.log").read_text()


def test_runtime_module_names_every_precision_the_recipe_accepts():
    from cnclip.recipe import _PRECISIONS

    assert set(_PRECISIONS) == {"auto", *rt.AUTOCAST_DTYPES}
