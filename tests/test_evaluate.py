import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cnclip.retrieval import BLOCK_ELEMENTS, chinese_clip_result, recall_at, retrieve, topk_indices


def brute_force_recall(sim: torch.Tensor, positives: list[set[int]], k: int) -> float:
    hits = scored = 0
    for q, pos in enumerate(positives):
        if not pos:
            continue
        scored += 1
        ranked = sorted(range(sim.shape[1]), key=lambda j: -sim[q, j].item())
        hits += bool(pos & set(ranked[:k]))
    return 100.0 * hits / scored


def test_recall_matches_brute_force():
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(30, 8), dim=-1)
    images = F.normalize(torch.randn(25, 8), dim=-1)
    positives = [{i % 25, (i * 7) % 25} if i % 4 else {i % 25} for i in range(30)]
    positives[3] = set()  # an unlabelled query is not scored
    got = recall_at(topk_indices(texts, images, 10), positives)
    sim = texts @ images.t()
    for k in (1, 5, 10):
        assert abs(got[f"r{k}"] - brute_force_recall(sim, positives, k)) < 1e-9
    assert abs(got["mean_recall"] - (got["r1"] + got["r5"] + got["r10"]) / 3) < 1e-9


def test_topk_is_block_independent():
    torch.manual_seed(1)
    q, g = torch.randn(50, 4), torch.randn(40, 4)
    whole = topk_indices(q, g, 10)
    for block_elements in (1, 7, 40 * 7, 40 * 50):  # one row per block, 7 rows, the whole matrix
        assert torch.equal(topk_indices(q, g, 10, block_elements=block_elements), whole)


def test_ties_are_ranked_by_lowest_index_whatever_the_block_size():
    """Small-integer embeddings: every similarity is exact (any summation order gives it) and most
    are tied. The ranking is the reference's, (-similarity, index), at every block size, and ties at
    the cut keep the lowest indices (torch.topk alone keeps whichever its kernel meets first)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-1, 2, (40, 3), generator=gen).float()
    g = torch.randint(-1, 2, (30, 3), generator=gen).float()
    sim = (q @ g.t()).tolist()
    expected = [sorted(range(30), key=lambda j: (-row[j], j))[:10] for row in sim]
    for block_elements in (1, 30, 30 * 7, 1 << 22):
        assert topk_indices(q, g, 10, block_elements=block_elements).tolist() == expected, block_elements
    assert topk_indices(q, g, 10).tolist() == expected
    # k as large as the gallery: a full ranking, ties in index order
    assert topk_indices(q[:3], g[:4], 10).tolist() == [sorted(range(4), key=lambda j: (-row[j], j))
                                                       for row in (q[:3] @ g[:4].t()).tolist()]


MEMORY_PROBE = """
import resource, sys, torch
from cnclip.retrieval import topk_indices
q, g = torch.randn(2048, 8), torch.randn(20000, 8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
topk_indices(q, g, 10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and glibc's malloc are Linux's")
def test_peak_memory_is_bounded_by_the_block_not_the_gallery(tmp_path):
    """2048 queries against a 20,000-image gallery: the whole similarity matrix is 164 MB, one block
    (BLOCK_ELEMENTS) 16.8 MB. With glibc's mmap threshold pinned, freed blocks go back to the OS, so
    the process's peak resident memory measures what was alive at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], env=env, capture_output=True, text=True, check=True)
    grown = int(out.stdout.split()[-1])
    whole = 2048 * 20000 * 4
    assert grown < 3 * BLOCK_ELEMENTS * 4 < whole / 3, (grown, whole)


TIED_PROBE = """
import resource, sys, torch
from cnclip.retrieval import topk_indices
images = torch.nn.functional.normalize(torch.randn(10000, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
texts = torch.zeros(10000, 32)  # a collapsed text tower: every similarity ties
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
topk_indices(texts, images, 10)
topk_indices(images, texts, 10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and glibc's malloc are Linux's")
def test_a_ranking_where_every_similarity_ties_stays_within_a_few_blocks_with_the_default_allocator():
    """10k x 10k both ways, every similarity tied, glibc's malloc as it comes (no pinned threshold): the
    tie re-ranking runs on every row of every block. Block-sized temporaries of changing sizes left the
    heap fragmented (peak rise 212 MB measured, and 1-2.3 GB at 30k); one reused similarity buffer and
    the tied rows re-ranked TIE_ROWS at a time keep it within a few blocks (32-46 MB measured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", TIED_PROBE], env=env, capture_output=True, text=True, check=True)
    grown = int(out.stdout.split()[-1])
    assert grown < 6 * BLOCK_ELEMENTS * 4, grown


def test_predictions_have_ten_unique_ids_for_every_query_and_both_directions():
    torch.manual_seed(2)
    texts, images = F.normalize(torch.randn(12, 6), dim=-1), F.normalize(torch.randn(15, 6), dim=-1)
    text_ids, image_ids = list(range(100, 112)), list(range(500, 515))
    positives = [{i} for i in range(12)]
    result = retrieve(texts, images, text_ids, image_ids, positives)
    assert [p["text_id"] for p in result.text_predictions] == text_ids
    assert [p["image_id"] for p in result.image_predictions] == image_ids
    for p in result.text_predictions:
        assert len(set(p["image_ids"])) == 10 and all(isinstance(i, int) and i in image_ids for i in p["image_ids"])
    for p in result.image_predictions:
        assert len(set(p["text_ids"])) == 10 and set(p["text_ids"]) <= set(text_ids)
    m = result.metrics
    # image->text is scored on the 12 images that have a caption
    assert m["num_texts"] == 12 and m["num_images"] == 12
    assert abs(m["mean_recall"] - (m["text_to_image"]["mean_recall"] + m["image_to_text"]["mean_recall"]) / 2) < 1e-9


def test_perfect_embeddings_score_100():
    emb = torch.eye(12)
    result = retrieve(emb, emb, list(range(12)), list(range(12)), [{i} for i in range(12)])
    assert result.metrics["text_to_image"] == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "mean_recall": 100.0}


def test_unlabelled_split_gives_predictions_and_no_metrics():
    emb = torch.eye(11)
    result = retrieve(emb, emb, list(range(11)), list(range(11)), [set() for _ in range(11)])
    assert result.metrics is None and len(result.text_predictions) == 11


def test_result_json_shape_is_chinese_clip_s():
    out = chinese_clip_result({"r1": 10.0, "r5": 20.0, "r10": 30.0, "mean_recall": 20.0})
    assert out == {"success": True, "score": 20.0,
                   "scoreJson": {"score": 20.0, "mean_recall": 20.0, "r1": 10.0, "r5": 20.0, "r10": 30.0}}
    json.dumps(out)


def test_validation_and_zero_shot_make_no_host_copy(tiny_model_dir, monkeypatch):
    """Embeddings, similarities and top-k stay on the model's device: no `.cpu()` anywhere between
    the text tower and the numbers (on a GPU each one was a copy and a wait per batch)."""
    from cnclip.classifier import ensemble, score, similarities
    from cnclip.data import tokenize
    from cnclip.models import load_base_model
    from cnclip.recipe import ModelConfig
    from cnclip.retrieval import embed_texts
    from cnclip.runtime import pick_runtime

    base = load_base_model(ModelConfig(base=str(tiny_model_dir)))
    clip = base.clip.eval()
    tokens = tokenize(base.tokenizer, ["猫", "白色连衣裙", "黑色男鞋", "一个红色的圆形"], 16)

    def host_copy(self, *args, **kwargs):
        raise AssertionError("a host copy of an evaluation tensor")

    monkeypatch.setattr(torch.Tensor, "cpu", host_copy)
    text_emb = embed_texts(clip, tokens, pick_runtime("cpu"), batch_size=2)
    images = torch.randn(6, text_emb.shape[1])
    result = retrieve(text_emb, images, [1, 2, 3, 4], list(range(6)), [{0}, {1}, {2}, {3}])
    assert result.metrics["num_texts"] == 4
    classes = ensemble(text_emb, [0, 1, 1, 0], 2)
    assert score(similarities(images, classes), torch.tensor([0, 1, 1, 0, 1, 0]), ["a", "b"])["num_images"] == 6
