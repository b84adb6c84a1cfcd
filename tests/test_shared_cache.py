"""One image cache shared by several processes at once (two runs, a run and an evaluate).

The bug this guards against: a process starting to cache deleted the temporaries another live
process was about to rename into place, and that process crashed.
"""

import json
import os
import subprocess
import sys
import time

import torch

from cnclip.atomic import owner_tag, remove_stale_temporaries, writer_alive

from conftest import REPO, image_bytes, write_split


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = owner_tag().split("-")[0]
        live = tmp_path / f".part-00000.safetensors.tmp-{host}-{sleeper.pid}"
        live_dir = tmp_path / f".step-00000002.tmp-{host}-{sleeper.pid}"
        dead = tmp_path / f".part-00001.safetensors.tmp-{host}-{_dead_pid()}"
        dead_old_style = tmp_path / f".manifest.json.tmp-{_dead_pid()}"
        foreign_fresh = tmp_path / ".part-00002.safetensors.tmp-0badc0de-1"
        for p in (live, dead, dead_old_style, foreign_fresh):
            p.write_bytes(b"x")
        live_dir.mkdir()
        assert writer_alive(live) and not writer_alive(dead) and writer_alive(foreign_fresh)
        remove_stale_temporaries(tmp_path)
        assert live.exists() and live_dir.is_dir() and foreign_fresh.exists()
        assert not dead.exists() and not dead_old_style.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    remove_stale_temporaries(tmp_path)  # its writer is gone now
    assert not live.exists() and not live_dir.exists()


WORKER = """
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO)
import cnclip.image_cache as ic
from cnclip.data import ImageTransform, load_split
from cnclip.models import image_tower_fingerprint, load_clip, load_image_preprocess
from cnclip.runtime import pick_runtime
from cnclip.skiplog import SkipLog

model_dir, data_dir, cache_dir, go = sys.argv[1:5]
encode = ic.ImageFeatureCache._encode
def slow_encode(*args):  # a part takes a while, so the two processes overlap for certain
    time.sleep(0.3)
    return encode(*args)
ic.ImageFeatureCache._encode = staticmethod(slow_encode)
clip = load_clip(model_dir).eval()
transform = ImageTransform(load_image_preprocess(model_dir))
split = load_split(data_dir, "train", SkipLog())
while not Path(go).exists():
    time.sleep(0.01)
started = time.time()
f = ic.split_image_features(split.images, clip, transform, image_tower_fingerprint(clip), pick_runtime("cpu", "fp32"),
                            cache_dir, 2, 0, SkipLog(), part_size=2)
print(json.dumps({"computed": f.computed, "ids": f.ids, "sum": f.embeddings.double().sum().item(),
                  "started": started, "ended": time.time()}))
"""


def test_two_processes_build_and_read_the_same_cache_at_once(tmp_path, tiny_model_dir):
    images = {i: image_bytes((20 * i, 100, 200 - 10 * i), (30 + i, 30)) for i in range(1, 13)}
    write_split(tmp_path / "data", "train", images, [{"text_id": 1, "text": "一个", "image_ids": list(images)}])
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tiny_model_dir), str(tmp_path / "data"),
                               str(tmp_path / "cache"), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    time.sleep(0.5)
    go.touch()  # both start caching at the same moment
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["computed"] for r in results) == [False, True]  # one computed, the other waited and read
    assert results[0]["ids"] == results[1]["ids"] == sorted(images)
    assert results[0]["sum"] == results[1]["sum"]
    assert max(r["started"] for r in results) < min(r["ended"] for r in results)  # they did overlap
    waiter = next(err for (_, err), r in zip(outs, results) if not r["computed"])
    assert "waiting for it" in waiter
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and [p.name for p in entries[0].iterdir() if p.name.startswith(".")] == [".lock"]
    assert torch.isfinite(torch.tensor(results[0]["sum"]))
