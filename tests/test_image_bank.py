"""The image bank's memory: a cache entry is read once, into one preallocated tensor, in the layout the
trainer asks for (its device, its training dtype, pre-normalised), so the host never holds the bank
twice, nor at all when the bank lives on an accelerator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cnclip.image_cache as image_cache
from cnclip import distributed
from cnclip.image_cache import ImageFeatureCache
from cnclip.runtime import Runtime
from cnclip.skiplog import SkipLog

KEY = "k" * 32


def write_entry(root: Path, count: int, part_size: int, dim: int, bad: frozenset[int] = frozenset()) -> list[int]:
    """A finished cache entry of `count` images (ids 100..), written by the cache's own writers; the
    ids in `bad` are recorded as undecodable. Embeddings: row r of the images that were embedded = r + 1."""
    ids = list(range(100, 100 + count))
    entry = root / KEY
    entry.mkdir(parents=True)
    row = 0
    for start in range(0, count, part_size):
        share = ids[start:start + part_size]
        kept = [i for i in share if i not in bad]
        emb = (torch.arange(row, row + len(kept), dtype=torch.float32)[:, None] + 1) * torch.ones(len(kept), dim)
        emb += torch.randn(len(kept), dim, generator=torch.Generator().manual_seed(start))
        row += len(kept)
        image_cache._write_part(entry / image_cache._part_name(start, part_size), kept, emb,
                                {i: "broken" for i in share if i in bad}, len(share))
    images = SimpleNamespace(ids=ids, path=root / "images.tsv")
    ImageFeatureCache(root)._write_manifest(KEY, images, part_size, dim)
    return ids


def test_an_entry_loads_in_the_layout_asked_for(tmp_path):
    ids = write_entry(tmp_path, 23, 5, 8, bad=frozenset({104, 111}))
    cache = ImageFeatureCache(tmp_path)
    plain = cache.get(KEY, ids)
    assert plain.embeddings.dtype == torch.float32 and plain.embeddings.shape == (21, 8)
    assert plain.ids == [i for i in ids if i not in (104, 111)] and set(plain.bad) == {104, 111}
    bank = cache.get(KEY, ids, image_cache.EmbeddingLayout(torch.device("cpu"), torch.bfloat16, normalized=True))
    assert bank.ids == plain.ids and bank.bad == plain.bad
    assert bank.embeddings.dtype == torch.bfloat16
    assert torch.equal(bank.embeddings, F.normalize(plain.embeddings, dim=-1).bfloat16())
    # "meta" stands in for a GPU: the result lives on the device asked for, never on the host.
    on_device = cache.get(KEY, ids, image_cache.EmbeddingLayout(torch.device("meta"), torch.bfloat16, normalized=True))
    assert on_device.embeddings.device.type == "meta" and on_device.embeddings.shape == (21, 8)


def test_a_manifest_that_undercounts_undecodable_images_is_not_trusted(tmp_path):
    """The result is sized from the manifest's counts: a manifest that does not match its parts fails the
    check (the entry is rebuilt), never writes past the result or leaves rows unset."""
    ids = write_entry(tmp_path, 12, 4, 8, bad=frozenset({105}))
    manifest = tmp_path / KEY / "manifest.json"
    meta = json.loads(manifest.read_text())
    for wrong in ({}, {"105": "x", "106": "y"}):
        manifest.write_text(json.dumps({**meta, "bad": wrong}))
        assert ImageFeatureCache(tmp_path).get(KEY, ids) is None


def test_the_trainer_bank_is_normalised_in_the_training_dtype():
    assert image_cache.bank_layout(Runtime(torch.device("cpu"), torch.bfloat16)) == image_cache.EmbeddingLayout(
        torch.device("cpu"), torch.bfloat16, normalized=True)
    assert image_cache.bank_layout(Runtime(torch.device("meta"), None)) == image_cache.EmbeddingLayout(
        torch.device("meta"), torch.float32, normalized=True)


def test_a_finished_entry_is_read_once_by_a_rank_of_a_job(tmp_path, monkeypatch):
    """Under torchrun the read that checks the entry is the one returned (it was read twice: once to
    decide whether to compute, then again)."""
    ids = write_entry(tmp_path, 20, 4, 8)
    for name, value in {"is_distributed": True, "is_main": True, "rank": 0, "world_size": 1}.items():
        monkeypatch.setattr(distributed, name, lambda value=value: value)
    monkeypatch.setattr(distributed, "any_rank", lambda flag, device="cpu": flag)
    monkeypatch.setattr(distributed, "host_barrier", lambda: None)
    reads = []
    read_part = image_cache._read_part

    def counting(path, expected, dim):
        reads.append(path.name)
        return read_part(path, expected, dim)

    monkeypatch.setattr(image_cache, "_read_part", counting)
    images = SimpleNamespace(ids=ids, path=tmp_path / "images.tsv")
    got = ImageFeatureCache(tmp_path).get_or_compute(KEY, None, images, None, torch.device("cpu"), 4, 0, None,
                                                     SkipLog(), sharded=True)
    assert not got.computed and got.ids == ids
    assert sorted(reads) == sorted(image_cache._part_names(20, 4))  # every part once, none twice


PEAK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from safetensors import safe_open
    from cnclip.image_cache import ImageFeatureCache, _content_digest
    if sys.argv[3] != "cpu":
        from cnclip.image_cache import EmbeddingLayout

    root, key, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    ids = json.loads((root / "ids.json").read_text())
    def status(field):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field))
        return int(line.split()[1]) * 1024
    cache = ImageFeatureCache(root)
    # Libraries that initialise on first use (safetensors, hashing) are not the read's memory.
    first = sorted((root / key).glob("part-*"))[0]
    with safe_open(str(first), framework="pt") as fh:
        _content_digest(fh.get_tensor("ids"), fh.get_tensor("embeddings"))
    if device == "meta":  # torch imports its meta-device kernels on first use (~0.1 GB of Python)
        torch.empty(2, 2, device="meta")[:1] = torch.ones(1, 2).to("meta")
    Path("/proc/self/clear_refs").write_text("5")
    start = status("VmRSS")
    if device == "cpu":  # the default: the cache's own layout
        features = cache.get(key, ids)
    else:
        features = cache.get(key, ids, EmbeddingLayout(torch.device(device), torch.float32))
    print(json.dumps({"growth": status("VmHWM") - start, "rows": features.embeddings.shape[0]}))
""")


def load_peak(root: Path, device: str) -> int:
    """Peak RSS growth (bytes) of reading the entry in a fresh process; glibc hands every block over
    64 KiB back when freed, so the peak is what the read holds at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PEAK, str(root), KEY, device], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    result = json.loads(out.stdout)
    assert result["rows"] == COUNT
    return result["growth"]


COUNT, PART, DIM = 40_000, 1000, 256  # a 41 MB bank in 40 parts of 1 MB


@pytest.fixture(scope="module")
def big_entry(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bank")
    ids = write_entry(root, COUNT, PART, DIM)
    (root / "ids.json").write_text(json.dumps(ids))
    return root


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from /proc/self/status, reset via clear_refs")
def test_reading_an_entry_holds_the_bank_once_plus_one_part(big_entry):
    bank = COUNT * DIM * 4
    growth = load_peak(big_entry, "cpu")
    # Parts kept until a torch.cat held the bank twice (2 x 41 MB).
    assert 0.9 * bank < growth < 1.25 * bank, (growth, bank)


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from /proc/self/status, reset via clear_refs")
def test_a_bank_on_a_device_costs_the_host_a_part_not_the_bank(big_entry):
    growth = load_peak(big_entry, "meta")  # "meta" stands in for a GPU
    # What the host keeps is the ids' Python bookkeeping (lists, the id -> row dict: ~200 bytes an
    # image, 0.1 of a 512-wide float32 row) and a part at a time, not the 41 MB of embeddings.
    part = PART * DIM * 4
    assert growth < 2 * part + 250 * COUNT, growth


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from /proc/self/status, reset via clear_refs")
def test_bank_memory_benchmark_small(capsys):
    from conftest import load_benchmark

    load_benchmark("bank_memory").main(["--sizes", "2000", "--dim", "16", "--part-size", "1000",
                                        "--predict", "5000000"])
    report = json.loads(capsys.readouterr().out)
    five_m = {case: p["5000000"] for case, p in report["predicted"].items()}
    assert five_m["bank_bf16"]["bank_gib_per_process"] * 2 == pytest.approx(five_m["bank_fp32"]["bank_gib_per_process"])
    assert five_m["host_fp32"]["bank_gib_per_process"] == pytest.approx(5_000_000 * 16 * 4 / 2 ** 30)
    assert [r["device"] for r in report["measured"]["bank_bf16"]] == ["meta"]


class StopAfterSetup(Exception):
    pass


def test_the_trainer_bank_is_the_cache_read_normalised_in_the_training_dtype(tiny_model_dir, tmp_path, monkeypatch):
    """A bf16 run's bank is the cache entry normalised in float32, then rounded to bf16: half the bytes
    of the float32 bank, and the same rows the step indexes."""
    import cnclip.trainer
    from cnclip.recipe import load_recipe
    from conftest import DEMO_RECIPE, make_tiny_dataset, tiny_overrides

    runs = []

    def stop(self):
        runs.append(self)
        raise StopAfterSetup

    monkeypatch.setattr(cnclip.trainer.FinetuneRun, "train_epoch", stop)
    overrides = tiny_overrides(tiny_model_dir, make_tiny_dataset(tmp_path / "data"), tmp_path / "run",
                               **{"train.precision": "bf16", "train.device": "cpu", "eval.before_training": False,
                                  "data.num_workers": 0})
    with pytest.raises(StopAfterSetup):
        cnclip.trainer.train(load_recipe(DEMO_RECIPE, overrides))
    (run,) = runs
    assert run.image_bank is run.train_features.embeddings and run.image_bank.dtype == torch.bfloat16
    cache, ids = ImageFeatureCache(tmp_path / "cache"), run.train_split.images.ids
    (host,) = [f for f in (cache.get(p.name, ids) for p in (tmp_path / "cache").iterdir()) if f is not None]
    assert host.ids == run.train_features.ids and host.embeddings.dtype == torch.float32
    assert torch.equal(run.image_bank, F.normalize(host.embeddings, dim=-1).bfloat16())
