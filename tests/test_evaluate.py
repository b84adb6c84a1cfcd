import json

import torch
import torch.nn.functional as F

from cnclip.retrieval import chinese_clip_result, recall_at, retrieve, topk_indices


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


def test_topk_is_chunk_independent():
    torch.manual_seed(1)
    q, g = torch.randn(50, 4), torch.randn(40, 4)
    assert torch.equal(topk_indices(q, g, 10, chunk=7), topk_indices(q, g, 10, chunk=4096))


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
