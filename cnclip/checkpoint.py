"""Resumable checkpoints and the best model of a run.

run_dir/
  checkpoints/latest           name of the newest complete checkpoint (replaced atomically)
  checkpoints/step-00000120/   trainable.safetensors, optimizer.pt, rng.pt, state.json
  best/                        peft adapter (adapter_model.safetensors + adapter_config.json),
                               trainable.safetensors, metrics.json

A checkpoint directory is filled under a temporary name and renamed into place, and only then
does `latest` point at it: a run killed at any moment leaves the previous checkpoint usable.
Everything is safetensors or loaded with weights_only=True: loading a checkpoint runs no code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .faults import crash_point
from .atomic import atomic_dir, atomic_file, remove_stale_temporaries, save_tensors, save_torch, write_json

TRAINABLE = "trainable.safetensors"
KEEP_CHECKPOINTS = 1


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # optimizer steps already taken in that epoch (the data position)
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient
    loss_scaler: dict | None = None  # fp16's GradScaler state at the checkpoint (None at other precisions)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    """Load saved trainable parameters by name; every saved tensor must find its parameter."""
    saved = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
    if unknown or missing:
        raise ValueError(
            f"{path} does not match this model (recipe changed?): "
            f"{len(unknown)} unexpected tensors {unknown[:3]}, {len(missing)} missing {missing[:3]}"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def _rng_state() -> dict:
    """The CPU generator's state and that of this process's own GPU only (each rank drives one).

    Training reseeds every step (cnclip.determinism), so these states only carry what runs
    between steps; saving one device's keeps a checkpoint loadable with any number of visible GPUs.
    """
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda, device = state["cuda"], torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU rank 0 saw
            if device >= len(cuda):
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.global_step:08d}"
    with atomic_dir(root / name) as tmp:
        save_tensors(trainable_state(model), tmp / TRAINABLE)
        save_torch({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        save_torch(_rng_state(), tmp / "rng.pt")
        crash_point("checkpoint-write")  # half-written: only the temporary directory exists
        write_json(tmp / "state.json", asdict(state))
    with atomic_file(root / "latest", "w", encoding="utf-8") as fh:
        fh.write(name)
    for old in sorted(p for p in root.glob("step-*") if p.name != name)[:-KEEP_CHECKPOINTS or None]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    remove_stale_temporaries(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    load_trainable(model, path / TRAINABLE)
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    return TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))


def stabilise_adapter_config(path: Path, **changes) -> None:
    """Rewrite peft's adapter_config.json with `target_modules` sorted (and `changes` applied).

    peft keeps target_modules as a set and writes it in set order, which string hashing changes from one
    process to the next: two runs of the same recipe would write different bytes.
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config.update(changes)
    write_json(path, config)


def save_best(run_dir: Path, peft_model, metrics: dict,
              extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """The best model so far, as a peft adapter users can load on its own (LoRA runs), plus our trainables
    (with model.text_tuning=full: the whole text tower), plus `extra_tensors` (file name -> tensors) in the
    same atomic replacement."""
    from peft import get_peft_model_state_dict

    with atomic_dir(run_dir / "best") as tmp:
        if hasattr(peft_model, "peft_config"):
            # peft's save_pretrained layout (adapter_config.json + adapter_model.safetensors), written
            # through save_tensors so that a full disk is reported like any other write failure.
            peft_model.peft_config["default"].save_pretrained(str(tmp))
            stabilise_adapter_config(tmp / "adapter_config.json")
            save_tensors({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()},
                         tmp / "adapter_model.safetensors")
        save_tensors(trainable_state(peft_model), tmp / TRAINABLE)
        for name, tensors in (extra_tensors or {}).items():
            save_tensors(tensors, tmp / name)
        write_json(tmp / "metrics.json", metrics)


def has_checkpoints(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").is_file() or (run_dir / "best").is_dir()


def remove_run_state(run_dir: Path) -> None:
    for name in ("checkpoints", "best"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "summary.json"):
        if (run_dir / name).exists():
            os.remove(run_dir / name)
