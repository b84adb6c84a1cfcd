"""Image-embedding cache for a locked image tower.

With the image tower locked and no image augmentation, an image's embedding never changes
during training: compute it once, keep it on disk, and train the text side against it. The
cache key is a fingerprint of the image tower's weights, the preprocessing, the compute
precision and the image set's content, so any change to one of them computes a fresh cache.

Storage is plain safetensors parts written as they finish (no pre-allocated map file): a run
killed while caching resumes from the last finished part. Part i holds the images
`ids[i * part_size:(i + 1) * part_size]`, and nothing on disk is trusted for being there: a part
proves what it holds before it is reused or read. Its header records how many images it covers,
which of them could not be decoded (with why) and a digest of its ids and embeddings; it counts
only if its embedded ids plus its undecodable ones are exactly its share of the image ids, in
order, and the digest matches. A part that fails (written with another part_size, truncated,
corrupted, from an older cache version) is computed again, never used. The manifest, written
last, is checked the same way on every read: it must cover every image id exactly once, or the
entry is rebuilt.

Several processes may share one cache directory (two runs, a run and an evaluate, the ranks of a
job): one process computes an entry while holding its lock file (`<key>/.lock`, released by the OS
when the process dies), the others wait for it and then read the finished entry; an entry is read
only once its manifest exists, and temporaries are removed only when their writer is gone.

Under torchrun (`sharded=True`, every rank calling with the same images) the ranks share the work
instead of waiting for one of them: rank 0 holds the entry's lock for the whole job (so
independent processes wait for the job and the job for them, exactly as for one process), part i
is embedded by rank i % world, each rank writes its own parts, and rank 0 writes the manifest once
every part is on disk. Part boundaries depend only on `part_size`, so the entry is byte-identical
to a single process's, and a job killed mid-cache resumes (on any number of processes) from the
parts already written.

Reading an entry costs one pass over its parts and, besides the result, one part's memory at a time:
the result is allocated once (its size follows from the manifest, each part checked against it) and
each part, checked, is copied into its rows. The result may live on another device, in another
dtype and pre-normalised (`EmbeddingLayout`), as the trainer's image bank does: then the host holds
no more than one part of the entry at any time. Under torchrun a finished entry is read once per
rank (the read is also the check that decides whether to compute).
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
from safetensors import safe_open
import torch.nn.functional as F
from tqdm import tqdm

from .errors import DataError
from .data import ImageArrays, ImageTransform, collate_image_arrays
from .image_sources import ImageTSV
from .skiplog import SkipLog
from .faults import crash_point
from .atomic import remove_stale_temporaries, save_tensors, temporary_path, write_json
from .models import encode_images
from . import distributed

log = logging.getLogger(__name__)

# 2: parts prove their content (header metadata), undecodable images live in the parts' headers.
CACHE_VERSION = 2


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


@dataclass(frozen=True)
class EmbeddingLayout:
    """Where and how an entry's embeddings are loaded. The default is the cache's own form (host,
    float32, as the image tower produced them); the trainer's bank is (its device, its training dtype,
    L2-normalised), so nothing but the bank itself is ever held for the whole run."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    normalized: bool = False

    def convert(self, embeddings: torch.Tensor) -> torch.Tensor:
        """A part's float32 embeddings on this device, normalised (in float32) if asked; copying them
        into a tensor of `dtype` casts them."""
        embeddings = embeddings.to(self.device)
        return F.normalize(embeddings, dim=-1) if self.normalized else embeddings


HOST_FLOAT32 = EmbeddingLayout()


def bank_layout(runtime) -> EmbeddingLayout:
    """How the training images' embeddings are loaded for `runtime` (cnclip.runtime): straight onto its
    device, L2-normalised, in its training dtype (bf16 under bf16 autocast: half of float32). They are
    read part by part into the bank itself, so on an accelerator no host copy of the bank exists at any
    time. The loss normalises its inputs again in float32, which leaves a normalised row unchanged up
    to rounding."""
    return EmbeddingLayout(runtime.device, runtime.autocast_dtype or torch.float32, normalized=True)


@dataclass
class ImageFeatures:
    """Cached projected embeddings, row i belongs to ids[i]: float32 and unnormalised on the host, or in
    the `layout` they were loaded with."""

    ids: list[int]
    embeddings: torch.Tensor
    bad: dict[int, str]  # images that could not be decoded, with why
    computed: bool  # False when everything came from disk
    layout: EmbeddingLayout = HOST_FLOAT32

    def __post_init__(self):
        self.row = {image_id: i for i, image_id in enumerate(self.ids)}


class ImageFeatureCache:
    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else default_cache_dir()

    def get(self, key: str, ids: list[int], layout: EmbeddingLayout = HOST_FLOAT32) -> ImageFeatures | None:
        """The finished entry for the images `ids` in `layout`, or None: not finished, or failing its check."""
        entry = self.root / key
        manifest = entry / "manifest.json"
        if not manifest.is_file():
            return None
        try:
            return self._read_entry(entry, manifest, ids, layout)
        except BadCacheData as exc:
            log.warning("image cache entry %s fails its check (%s); it will be computed again", entry, exc)
            return None

    @staticmethod
    def _read_entry(entry: Path, manifest: Path, ids: list[int], layout: EmbeddingLayout) -> ImageFeatures:
        """The entry in one pass: the result allocated once from the manifest's counts, each part (checked)
        copied into its rows. Peak memory: the result plus one part, never the parts and a concatenation."""
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
            version, count, part_size, dim = meta["version"], meta["count"], int(meta["part_size"]), int(meta["dim"])
            undecodable = len(meta["bad"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadCacheData(f"unreadable manifest ({type(exc).__name__}: {exc})") from None
        if version != CACHE_VERSION or count != len(ids) or part_size < 1:
            raise BadCacheData(f"manifest of version {version} for {count} images, "
                               f"expected version {CACHE_VERSION} for {len(ids)}")
        if meta.get("parts") != _part_names(len(ids), part_size) or not 0 <= undecodable <= len(ids):
            raise BadCacheData("manifest does not list one part per share of the image ids")
        rows = len(ids) - undecodable  # checked below: the parts must fill exactly these rows
        embeddings = torch.empty((rows, dim), dtype=layout.dtype, device=layout.device)
        out_ids: list[int] = []
        bad: dict[int, str] = {}
        for start, part in zip(range(0, len(ids), part_size), meta["parts"]):
            part_ids, part_embeddings, part_bad = _read_part(entry / part, ids[start:start + part_size], dim)
            if len(out_ids) + len(part_ids) > rows:
                raise BadCacheData("the parts hold more images than the manifest counts")
            embeddings[len(out_ids):len(out_ids) + len(part_ids)] = layout.convert(part_embeddings)
            out_ids.extend(part_ids)
            bad.update(part_bad)
        # Each part holds exactly its own share, so together they hold every id once; checked all the same.
        if len(out_ids) != rows or len(out_ids) + len(bad) != len(ids) or set(out_ids) | set(bad) != set(ids):
            raise BadCacheData("the parts do not cover every image id exactly once")
        return ImageFeatures(out_ids, embeddings, bad, computed=False, layout=layout)

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
        layout: EmbeddingLayout = HOST_FLOAT32,
    ) -> ImageFeatures:
        """The entry `key` for `images` in `layout`, computed first when it is not on disk (or fails its check)."""
        if sharded and distributed.is_distributed():
            return self._get_or_compute_sharded(key, clip, images, transform, device, batch_size, num_workers,
                                                autocast_dtype, skips, desc, part_size, layout)
        cached = self.get(key, images.ids, layout)
        if cached is None:
            with self.lock(key):
                cached = self.get(key, images.ids, layout)  # finished by another process while we waited
                if cached is None:
                    self._compute(key, clip, images, transform, device, batch_size, num_workers, autocast_dtype,
                                  desc, part_size)
                    cached = self._written(key, images, layout)
        for image_id, why in cached.bad.items():
            skips.skip("undecodable image", f"{images.path} image_id {image_id}", why)
        return cached

    def _get_or_compute_sharded(self, key, clip, images, transform, device, batch_size, num_workers, autocast_dtype,
                                skips, desc, part_size, layout) -> ImageFeatures:
        """Every rank embeds its share of the parts; rank 0 writes the manifest when all are on disk.

        A finished entry is read once: the read that checks it is the one returned."""
        with self._job_lock(key):
            cached = self.get(key, images.ids, layout)
            missing = distributed.any_rank(cached is None, device)  # one decision for every rank
            if missing:
                cached = None  # this rank's copy (if any) goes: every rank reads the rebuilt entry
                self._compute(key, clip, images, transform, device, batch_size, num_workers, autocast_dtype, desc,
                              part_size, shard=(distributed.rank(), distributed.world_size()))
                # Every part is written. Waited for on the host, not in an NCCL collective: a resumed cache
                # can leave the ranks very unequal shares (the parts already on disk are skipped).
                distributed.host_barrier()
                if distributed.is_main():
                    try:  # never raised here: the other ranks would wait for rank 0 at the barrier forever
                        self._write_manifest(key, images, part_size, clip.visual_projection.out_features)
                    except BadCacheData as exc:
                        log.error("image cache entry %s: %s", self.root / key, exc)
                distributed.host_barrier()
        if missing:
            cached = self._written(key, images, layout)
        for image_id, why in cached.bad.items():
            skips.skip("undecodable image", f"{images.path} image_id {image_id}", why)
        return cached

    def _written(self, key: str, images, layout: EmbeddingLayout) -> ImageFeatures:
        """The entry this process (or job) has just finished, which must pass its check."""
        cached = self.get(key, images.ids, layout)
        if cached is None:
            raise DataError(f"image cache entry {self.root / key} failed its check right after it was written "
                            f"(see the warning above); is something else writing to this cache directory?")
        cached.computed = True
        return cached

    @contextmanager
    def _job_lock(self, key: str) -> Iterator[None]:
        """Under torchrun, rank 0 holds the entry's lock on behalf of the whole job.

        A lock per rank cannot work (the ranks write one entry together), and without one a job and an
        independent process (another run, an evaluate) would compute the same entry side by side. The
        other ranks wait for rank 0 on the host (it may wait long for another process to finish), and rank
        0 lets go only after the last barrier, when every rank's parts and the manifest are on disk.
        """
        if not distributed.is_main():
            distributed.host_barrier()
            yield
            return
        with self.lock(key):
            distributed.host_barrier()
            yield

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
        dim = clip.visual_projection.out_features
        for start in starts:
            part, expected = entry / _part_name(start, part_size), ids[start:start + part_size]
            if part.exists():  # written by an earlier (killed) run: reused only if it proves its content
                try:
                    _read_part(part, expected, dim)
                    progress.update(len(expected))
                    continue
                except BadCacheData as exc:
                    log.warning("image cache part %s is computed again: %s", part, exc)
            part_ids, part_emb, part_bad = self._encode(
                clip, images, expected, transform, device, batch_size, num_workers, autocast_dtype, progress,
            )
            emb = torch.cat(part_emb) if part_emb else torch.zeros(0, dim)
            _write_part(part, part_ids, emb, part_bad, len(expected))
            crash_point("cache-part")
        progress.close()
        if world == 1:
            self._write_manifest(key, images, part_size, clip.visual_projection.out_features)

    def _write_manifest(self, key: str, images, part_size: int, dim: int) -> None:
        """The manifest that makes an entry readable, written only once every part proves its share.

        Called by the entry's lock holder only, which also removes parts no manifest of this part_size
        lists (left by a killed run with another part_size): a finished entry holds nothing else.
        """
        entry = self.root / key
        parts, bad = _part_names(len(images.ids), part_size), {}
        if len(set(images.ids)) != len(images.ids):
            raise BadCacheData("the image ids are not unique")
        for start, part in zip(range(0, len(images.ids), part_size), parts):
            bad.update(_read_part(entry / part, images.ids[start:start + part_size], dim)[2])
        for stale in sorted(set(p.name for p in entry.glob("part-*")) - set(parts)):
            (entry / stale).unlink(missing_ok=True)
        write_json(entry / "manifest.json",
                   {"version": CACHE_VERSION, "parts": parts, "part_size": part_size,
                    "bad": {str(k): v for k, v in bad.items()}, "count": len(images.ids), "dim": dim,
                    "images": str(images.path)})

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


def _part_names(count: int, part_size: int) -> list[str]:
    return [_part_name(start, part_size) for start in range(0, count, part_size)]


class BadCacheData(DataError):
    """A part or manifest on disk that does not prove it holds what it should (never used: rebuilt)."""


def _content_digest(ids: torch.Tensor, embeddings: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(ids.contiguous().numpy())  # hashed in place through the buffer protocol, never copied
    digest.update(embeddings.contiguous().numpy())
    return digest.hexdigest()


def _write_part(path: Path, ids: list[int], embeddings: torch.Tensor, bad: dict[int, str], count: int) -> None:
    """One part, its proof in its header: how many images it covers, the undecodable ones, a digest."""
    tensors = {"ids": torch.tensor(ids, dtype=torch.int64), "embeddings": embeddings.float().contiguous()}
    # One metadata key: safetensors writes several in a random order, and parts must be byte-identical.
    proof = {"count": count, "bad": {str(k): v for k, v in bad.items()},
             "digest": _content_digest(tensors["ids"], tensors["embeddings"])}
    tmp = temporary_path(path)
    save_tensors(tensors, tmp, metadata={"cnclip": json.dumps(proof, sort_keys=True, ensure_ascii=False)})
    os.replace(tmp, path)


def _read_part(path: Path, expected: list[int], dim: int) -> tuple[list[int], torch.Tensor, dict[int, str]]:
    """(ids, embeddings, undecodable ids with why) of a part that proves it holds exactly `expected`.

    BadCacheData otherwise: unreadable, another share of ids (another part_size), a wrong count or
    shape, or content that does not match its digest.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            proof = json.loads((fh.metadata() or {})["cnclip"])
            ids, embeddings = fh.get_tensor("ids"), fh.get_tensor("embeddings")
        bad = {int(k): str(v) for k, v in proof["bad"].items()}
        count, digest = int(proof["count"]), proof["digest"]
    except Exception as exc:  # safetensors' own errors, a missing key, bad JSON: not a part we wrote
        raise BadCacheData(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from None
    if count != len(expected):
        raise BadCacheData(f"{path.name}: covers {count} images, its share is {len(expected)}")
    if ids.dtype != torch.int64 or embeddings.dtype != torch.float32 or tuple(embeddings.shape) != (len(ids), dim):
        raise BadCacheData(f"{path.name}: tensors of the wrong type or shape")
    id_list = ids.tolist()
    if not set(bad) <= set(expected) or id_list != [i for i in expected if i not in bad]:
        raise BadCacheData(f"{path.name}: holds other image ids than its share")
    if _content_digest(ids, embeddings) != digest:
        raise BadCacheData(f"{path.name}: content does not match its digest")
    return id_list, embeddings, bad


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
    layout: EmbeddingLayout = HOST_FLOAT32,
) -> ImageFeatures:
    """The cached embeddings of every image in a split, computing them only when the key is new.

    sharded=True: called by every rank of a torchrun job, which then share the work (see the module doc).
    layout: where and how the embeddings are returned (EmbeddingLayout); the entry on disk is the same.
    """
    key = cache_key(tower_fingerprint, transform.cfg.to_dict(), split_images.fingerprint, runtime.precision)
    cache = ImageFeatureCache(cache_dir)
    features = cache.get_or_compute(
        key, clip, split_images, transform, runtime.device, batch_size, num_workers, runtime.autocast_dtype,
        skips, desc=f"image embeddings ({split_images.path.name})", part_size=part_size, sharded=sharded,
        layout=layout,
    )
    log.info("image embeddings for %s: %s (%d images, cache %s)", split_images.path.name,
             "computed" if features.computed else "loaded from cache", len(features.ids), cache.root / key)
    return features
