"""Image-embedding cache for a locked image tower.

With the image tower locked and no image augmentation, an image's embedding never changes
during training: compute it once, keep it on disk, and train the text side against it. The
cache key is a fingerprint of the image tower's weights, the preprocessing, the compute
precision and the image set's content, so any change to one of them computes a fresh cache.

Storage is plain safetensors parts written as they finish (no pre-allocated map file): a run
killed while caching resumes from the last finished part.

Several processes may share one cache directory (two runs, a run and an evaluate, the ranks of a
job): one process computes an entry while holding its lock file (`<key>/.lock`, released by the OS
when the process dies), the others wait for it and then read the finished entry; an entry is read
only once its manifest exists, and temporaries are removed only when their writer is gone.

Under torchrun (`sharded=True`, every rank calling with the same images) the ranks share the work
instead of waiting for one of them (the lock above is for independent processes):
part i is embedded by rank i % world, each rank writes its own parts, and rank 0 writes the
manifest once every part is on disk. Part boundaries depend only on `part_size`, so the entry is
byte-identical to a single process's, and a job killed mid-cache resumes (on any number of
processes) from the parts already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from .data import ImageArrays, ImageTransform, collate_image_arrays
from .image_sources import ImageTSV
from .skiplog import SkipLog
from .faults import crash_point
from .atomic import atomic_file, remove_stale_temporaries, save_tensors, temporary_path, write_json
from .models import encode_images
from . import distributed

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnclip" / "image_features"


def cache_key(tower_fingerprint: str, preprocess: dict, images_fingerprint: str, precision: str) -> str:
    blob = json.dumps(
        {"v": CACHE_VERSION, "tower": tower_fingerprint, "pre": preprocess, "images": images_fingerprint,
         "precision": precision},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class ImageFeatures:
    """Cached projected embeddings (float32, unnormalised), row i belongs to ids[i]."""

    ids: list[int]
    embeddings: torch.Tensor
    bad: dict[int, str]  # images that could not be decoded, with why
    computed: bool  # False when everything came from disk

    def __post_init__(self):
        self.row = {image_id: i for i, image_id in enumerate(self.ids)}


class ImageFeatureCache:
    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else default_cache_dir()

    def get(self, key: str) -> ImageFeatures | None:
        entry = self.root / key
        manifest = entry / "manifest.json"
        if not manifest.is_file():
            return None
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        ids: list[int] = []
        chunks = []
        for part in meta["parts"]:
            tensors = load_file(str(entry / part))
            ids.extend(tensors["ids"].tolist())
            chunks.append(tensors["embeddings"])
        bad = {int(k): v for k, v in meta["bad"].items()}
        embeddings = torch.cat(chunks) if chunks else torch.zeros(0, meta["dim"])
        return ImageFeatures(ids, embeddings, bad, computed=False)

    def get_or_compute(
        self,
        key: str,
        clip,
        images: ImageTSV,
        transform: ImageTransform,
        device: torch.device,
        batch_size: int,
        num_workers: int,
        autocast_dtype: torch.dtype | None,
        skips: SkipLog,
        desc: str = "caching image embeddings",
        part_size: int = 8192,
        sharded: bool = False,
    ) -> ImageFeatures:
        if sharded and distributed.is_distributed():
            return self._get_or_compute_sharded(key, clip, images, transform, device, batch_size, num_workers,
                                                autocast_dtype, skips, desc, part_size)
        cached = self.get(key)
        if cached is None:
            with self.lock(key):
                cached = self.get(key)  # finished by another process while we waited for the lock
                if cached is None:
                    self._compute(key, clip, images, transform, device, batch_size, num_workers, autocast_dtype,
                                  desc, part_size)
                    cached = self.get(key)
                    cached.computed = True
        for image_id, why in cached.bad.items():
            skips.skip("undecodable image", f"{images.path} image_id {image_id}", why)
        return cached

    def _get_or_compute_sharded(self, key, clip, images, transform, device, batch_size, num_workers, autocast_dtype,
                                skips, desc, part_size) -> ImageFeatures:
        """Every rank embeds its share of the parts; rank 0 writes the manifest when all are on disk."""
        missing = distributed.any_rank(self.get(key) is None, device)  # one decision for every rank
        if missing:
            self._compute(key, clip, images, transform, device, batch_size, num_workers, autocast_dtype, desc,
                          part_size, shard=(distributed.rank(), distributed.world_size()))
            # Every part is written. Waited for on the host, not in an NCCL collective: a resumed cache
            # can leave the ranks very unequal shares (the parts already on disk are skipped).
            distributed.host_barrier()
            if distributed.is_main():
                self._write_manifest(key, images, part_size, clip.visual_projection.out_features)
            distributed.host_barrier()
        cached = self.get(key)
        cached.computed = missing
        for image_id, why in cached.bad.items():
            skips.skip("undecodable image", f"{images.path} image_id {image_id}", why)
        return cached

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the entry's lock; when another process holds it, say so and wait for it."""
        from filelock import FileLock, Timeout

        (self.root / key).mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / key / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("another process is computing image embeddings in %s; waiting for it", self.root / key)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @torch.no_grad()
    def _compute(self, key, clip, images, transform, device, batch_size, num_workers, autocast_dtype, desc,
                 part_size, shard: tuple[int, int] = (0, 1)):
        """Write the parts numbered `rank (mod world)` that are not on disk yet; one process: all, and the manifest."""
        rank, world = shard
        entry = self.root / key
        entry.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(entry)
        ids = images.ids
        starts = list(range(0, len(ids), part_size))[rank::world]
        progress = tqdm(total=sum(min(part_size, len(ids) - s) for s in starts), desc=desc, unit="img",
                        dynamic_ncols=True, disable=rank > 0)
        for start in starts:
            name = _part_name(start, part_size)
            bad_file = entry / f"{name}.bad.json"
            if (entry / name).is_file() and bad_file.is_file():  # finished by an earlier (killed) run
                progress.update(min(part_size, len(ids) - start))
                continue
            part_ids, part_emb, part_bad = self._encode(
                clip, images, ids[start:start + part_size], transform, device, batch_size, num_workers,
                autocast_dtype, progress,
            )
            dim = clip.visual_projection.out_features
            emb = torch.cat(part_emb) if part_emb else torch.zeros(0, dim)
            with atomic_file(entry / bad_file.name, "w", encoding="utf-8") as fh:
                json.dump({str(k): v for k, v in part_bad.items()}, fh)
            tmp = temporary_path(entry / name)
            save_tensors({"ids": torch.tensor(part_ids, dtype=torch.int64), "embeddings": emb.contiguous()}, tmp)
            os.replace(tmp, entry / name)
            crash_point("cache-part")
        progress.close()
        if world == 1:
            self._write_manifest(key, images, part_size, clip.visual_projection.out_features)

    def _write_manifest(self, key: str, images, part_size: int, dim: int) -> None:
        """The manifest that makes an entry readable: every part, and every undecodable image, in part order."""
        entry = self.root / key
        parts, bad = [], {}
        for start in range(0, len(images.ids), part_size):
            name = _part_name(start, part_size)
            bad.update(json.loads((entry / f"{name}.bad.json").read_text(encoding="utf-8")))
            parts.append(name)
        write_json(entry / "manifest.json",
                   {"version": CACHE_VERSION, "parts": parts, "bad": bad, "count": len(images.ids),
                    "dim": dim, "images": str(images.path)})

    @staticmethod
    def _encode(clip, images, ids, transform, device, batch_size, num_workers, autocast_dtype, progress):
        loader = torch.utils.data.DataLoader(
            ImageArrays(images, ids, transform), batch_size=batch_size, num_workers=num_workers,
            collate_fn=collate_image_arrays, pin_memory=device.type == "cuda",
        )
        out_ids, out_emb, bad = [], [], {}
        for batch_ids, arrays, batch_bad in loader:
            bad.update(batch_bad)
            if arrays is not None:
                pixels = transform.normalize(arrays.to(device, non_blocking=True))
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    emb = encode_images(clip, pixels)
                out_emb.append(emb.float().cpu())
                out_ids.extend(batch_ids)
            progress.update(len(batch_ids) + len(batch_bad))
        return out_ids, out_emb, bad


def _part_name(start: int, part_size: int) -> str:
    return f"part-{start // part_size:05d}.safetensors"


def split_image_features(
    split_images: ImageTSV,
    clip,
    transform: ImageTransform,
    tower_fingerprint: str,
    runtime,
    cache_dir: str | None,
    batch_size: int,
    num_workers: int,
    skips: SkipLog,
    part_size: int = 8192,
    sharded: bool = False,
) -> ImageFeatures:
    """The cached embeddings of every image in a split, computing them only when the key is new.

    sharded=True: called by every rank of a torchrun job, which then share the work (see the module doc).
    """
    key = cache_key(tower_fingerprint, transform.cfg.to_dict(), split_images.fingerprint, runtime.precision)
    cache = ImageFeatureCache(cache_dir)
    features = cache.get_or_compute(
        key, clip, split_images, transform, runtime.device, batch_size, num_workers, runtime.autocast_dtype,
        skips, desc=f"image embeddings ({split_images.path.name})", part_size=part_size, sharded=sharded,
    )
    log.info("image embeddings for %s: %s (%d images, cache %s)", split_images.path.name,
             "computed" if features.computed else "loaded from cache", len(features.ids), cache.root / key)
    return features
