"""Builds a split's image-embedding cache, for the sharded-cache tests (see test_cache_sharding.py).

  cache_driver.py MODEL_DIR DATA_DIR CACHE_DIR PART_SIZE OUT_DIR

Run plainly (one process) or under torchrun (each rank embeds its share). Writes
OUT_DIR/rank-R.json: how many images this process embedded and the cache entry it read.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(model_dir: str, data_dir: str, cache_dir: str, part_size: str, out_dir: str) -> None:
    from cnclip import distributed
    from cnclip.data import ImageTransform, load_split
    from cnclip.image_cache import ImageFeatureCache, split_image_features
    from cnclip.models import image_tower_fingerprint, load_clip, load_image_preprocess
    from cnclip.runtime import pick_runtime
    from cnclip.skiplog import SkipLog

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the tests read what the cache says
    runtime = pick_runtime("cpu")
    info = distributed.init_distributed(runtime.device)
    embedded = [0]
    encode = ImageFeatureCache._encode

    def counting_encode(*args):
        ids, emb, bad = encode(*args)
        embedded[0] += len(ids) + len(bad)
        return ids, emb, bad

    ImageFeatureCache._encode = staticmethod(counting_encode)
    clip = load_clip(model_dir)
    split = load_split(data_dir, "train", SkipLog())
    features = split_image_features(split.images, clip, ImageTransform(load_image_preprocess(model_dir)),
                                    image_tower_fingerprint(clip), runtime, cache_dir, 4, 0, SkipLog(),
                                    part_size=int(part_size), sharded=True)
    Path(out_dir, f"rank-{info.rank}.json").write_text(json.dumps(
        {"embedded": embedded[0], "images": len(features.ids), "world": info.world_size}))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:6])
