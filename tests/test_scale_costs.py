"""Costs that must not grow faster than the work: the per-query cap on a picture found by many
queries, and the memory of pre-tokenised captions (benchmarks/scale.py measures both at scale)."""

import torch

from cnclip import data
from cnclip.data import compact_tokens, gather_tokens, tokenize
from cnclip.models import load_tokenizer
from data_tools.cap import CapGroups, cap_groups


def test_cap_of_a_picture_refused_by_many_queries_costs_one_offer_per_query():
    """One picture found by m queries, each of which fills its cap of 1 with a better-ranked picture: the
    picture is offered to every query in turn and refused by all; its offers are found with one sort
    (O(m log m)), where scanning the earlier members' queries at each offer took m^2 / 2 comparisons."""
    m = 20_000
    logo = (2**63, tuple(f"query{i}" for i in range(m)))
    singles = [(i, (f"query{i}",)) for i in range(m)]
    keep = cap_groups(CapGroups.of([logo, *singles]), cap=1)
    assert keep[0] == -1  # refused by every query that found it
    assert keep[1:].tolist() == [0] * m


def test_cap_keeps_the_first_member_whose_query_is_new_to_the_group():
    """The member a group is kept through skips members whose query already refused it."""
    groups = CapGroups.of([(5, ("a", "a", "b")), (1, ("a",))])
    assert cap_groups(groups, cap=1).tolist() == [2, 0]


def test_compact_tokens_hold_the_same_rows_in_fewer_bytes(tiny_model_dir, monkeypatch):
    """Stored compactly (the tiny vocabulary's ids and the masks in uint8: 3 bytes per token instead of 24)
    and tokenised a chunk at a time, the captions give exactly the int64 batches the plain path gives."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = ["一个红色的圆形", "左上角有一个绿色的正方形", "猫", "", "蓝色三角形在图片中间", "黑白照片"] * 3
    calls = []
    original = tokenizer.__call__

    def counted(batch, **kwargs):
        calls.append(len(batch))
        return original(batch, **kwargs)

    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 4)
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, batch, **kwargs: counted(batch, **kwargs))
    plain = tokenize(tokenizer, texts, 16)
    compact = tokenize(tokenizer, texts, 16, compact=True)
    assert max(calls) == 4  # never the whole list in one tokenizer call
    assert plain["input_ids"].dtype == torch.int64
    assert all(t.dtype == torch.uint8 for t in compact.values())
    plain_bytes = sum(t.element_size() * t.numel() for t in plain.values())
    compact_bytes = sum(t.element_size() * t.numel() for t in compact.values())
    assert compact_bytes * 8 == plain_bytes
    assert plain.keys() == compact.keys()
    for name in plain:
        assert torch.equal(plain[name], compact[name].to(torch.int64))
    rows = torch.tensor([5, 0, 2, 11])
    expected, got = gather_tokens(plain, rows, "cpu"), gather_tokens(compact, rows, "cpu")
    for name in expected:
        assert got[name].dtype == torch.int64 and torch.equal(expected[name], got[name])


def test_compact_tokens_widen_only_as_far_as_the_values_need():
    tokens = {"input_ids": torch.tensor([[0, 40000]]), "attention_mask": torch.tensor([[1, 1]]),
              "token_type_ids": torch.tensor([[0, -1]]), "big": torch.tensor([[2**40]])}
    compact = compact_tokens(tokens)
    assert [compact[k].dtype for k in tokens] == [torch.int32, torch.uint8, torch.int16, torch.int64]
    for name in tokens:
        assert torch.equal(compact[name].to(torch.int64), tokens[name])


def test_training_pairs_hold_their_captions_compactly(tiny_model_dir, tiny_data_dir):
    """The trainer keeps every training caption's tokens for the whole run: in compact dtypes."""
    from types import SimpleNamespace

    from cnclip.data import load_split
    from cnclip.skiplog import SkipLog
    from cnclip.trainer import build_pairs

    split = load_split(tiny_data_dir, "train", SkipLog())
    features = SimpleNamespace(row={image_id: row for row, image_id in enumerate(split.images.ids)})
    pairs = build_pairs(split, features, load_tokenizer(str(tiny_model_dir)), 16, SkipLog())
    assert {t.dtype for t in pairs.tokens.values()} == {torch.uint8}  # a 70-token vocabulary: one byte per token



SIZES = (2000, 6000)  # per-pair costs are measured between two sizes, so fixed costs cancel out


def write_many_pairs(root, n: int) -> None:
    """n images (a stand-in payload: reading a split never decodes) with one 10-character caption each."""
    from conftest import write_split

    chars = "左右上下角中间有一个的红绿蓝黄紫黑白色圆形正方三角"
    texts = [{"text_id": k, "text": "".join(chars[(k >> (2 * d)) % len(chars)] for d in range(10)),
              "image_ids": [10**6 + k]} for k in range(n)]
    write_split(root, "train", {10**6 + k: b"not decoded here" for k in range(n)}, texts)


def traced(make):
    """(result, bytes it holds, peak bytes while it was made): Python allocations, tracemalloc."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = make()
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
        return result, held - before, peak - before
    finally:
        tracemalloc.stop()


def per_pair(measure, tmp_path) -> float:
    """measure(root, n) -> bytes, for a split of n pairs at each of SIZES: the bytes each further pair adds."""
    small, large = SIZES
    grown = []
    for n in SIZES:
        write_many_pairs(tmp_path / str(n), n)
        grown.append(measure(tmp_path / str(n), n))
    return (grown[1] - grown[0]) / (large - small)


def test_a_split_holds_its_pairs_in_few_bytes(tmp_path):
    """A read split's per-pair Python objects: the caption record (slots, no __dict__), its string (~96
    bytes of 10 characters), id and image-id tuple, and its image's entry (id -> row, the payload's offset
    and length in int64 arrays). With a dict of (offset, length) tuples and a __dict__ per record a pair
    held ~80 bytes more (tracemalloc, Python 3.11: ~480 against ~400)."""
    from cnclip.data import load_split
    from cnclip.skiplog import SkipLog

    def held(root, n):
        split, held, _ = traced(lambda: load_split(root, "train", SkipLog()))
        assert len(split.texts) == n and split.images.offsets[10**6 + 7][1] == 24  # 16 bytes, base64
        return held

    cost = per_pair(held, tmp_path)
    assert cost < 440, cost


def test_training_pairs_are_built_without_python_objects_per_pair(tiny_model_dir, tmp_path, monkeypatch):
    """build_pairs' peak beside the split: int64 arrays and the caption-string dict, never a tuple and int
    objects per pair (which cost ~30 bytes more a pair at its peak; tracemalloc, Python 3.11: ~135 against
    ~105, most of it the caption-string dict)."""
    from types import SimpleNamespace

    from cnclip import data
    from cnclip.data import load_split
    from cnclip.skiplog import SkipLog
    from cnclip.trainer import build_pairs

    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 256)  # the tokenizer's share is then fixed
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def peak(root, n):
        split = load_split(root, "train", SkipLog())
        features = SimpleNamespace(row={image_id: row for row, image_id in enumerate(split.images.ids)})
        pairs, _, peak = traced(lambda: build_pairs(split, features, tokenizer, 16, SkipLog()))
        assert len(pairs) == n and torch.equal(pairs.image_rows, torch.arange(n))
        assert torch.equal(pairs.text_keys, torch.arange(n))  # every caption distinct
        return peak

    cost = per_pair(peak, tmp_path)
    assert cost < 120, cost


def test_evaluation_keeps_no_python_objects_per_query():
    """retrieve() scores recall from the top-k tensors (one int64 key per positive pair and per top-k entry)
    and makes the prediction rows only when they are written: its Python allocations per query are a few
    bytes (~16 measured), where lists of top-k ids, a dict per prediction and a set per image took ~1,500
    bytes a query at their peak (tracemalloc, Python 3.11)."""
    import torch.nn.functional as F

    from cnclip.retrieval import retrieve

    def peak(n):
        generator = torch.Generator().manual_seed(n)
        texts = F.normalize(torch.randn(n, 16, generator=generator), dim=-1)
        images = F.normalize(texts + 0.5 * torch.randn(n, 16, generator=generator), dim=-1)
        text_ids, image_ids, positives = list(range(n)), list(range(10**6, 10**6 + n)), [{q} for q in range(n)]
        result, _, peak = traced(lambda: retrieve(texts, images, text_ids, image_ids, positives))
        assert result.metrics["num_texts"] == result.metrics["num_images"] == n
        assert result.metrics["text_to_image"]["r10"] > 10 * 1000 / n  # far above chance: the pairs are found
        return peak

    small, large = SIZES
    cost = (peak(large) - peak(small)) / (large - small)
    assert cost < 200, cost


def test_build_pairs_holds_its_accepted_records_in_arrays(tmp_path):
    """The global stages' columns of every accepted record (location, query, caption, image digest, pHash,
    colour signature, shard and row): Arrow buffers and numpy arrays, about 210 bytes a record with the
    benchmark's captions, where a Python object per value held about 360 here and 450 at 1M records
    (tracemalloc, Python 3.11). The values read back are the shards' own, in input order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.scale import write_light_shards
    from data_tools.accepted import read_accepted
    from data_tools.shards import LIGHT_COLUMNS

    def held(n):
        paths = write_light_shards(tmp_path / str(n), n, seed=2, shard_size=3000)
        arrow_before = pa.total_allocated_bytes()
        (records, counts), python_bytes, _ = traced(lambda: read_accepted(paths, progress=False))
        expected = {name: [] for name in LIGHT_COLUMNS}
        for path in paths:
            for name, values in pq.read_table(path, columns=LIGHT_COLUMNS).to_pydict().items():
                expected[name] += values
        assert counts == [3000] * (n // 3000) + ([n % 3000] if n % 3000 else [])
        assert list(records.location) == expected["location"] and list(records.query) == expected["query"]
        assert list(records.text) == expected["text"] and list(records.sha) == expected["sha"]
        assert records.phash.tolist() == expected["phash"] and list(records.colour) == expected["colour"]
        assert records.text.take([n - 1, 0]) == [expected["text"][n - 1], expected["text"][0]]
        assert records.query.take([n - 1]) == [expected["query"][n - 1]] and records.query[2] == expected["query"][2]
        assert (records.shard[3000], records.row[3000], records.row[2999]) == (1, 0, 2999)
        return python_bytes + pa.total_allocated_bytes() - arrow_before

    small, large = 4000, 16000
    cost = (held(large) - held(small)) / (large - small)
    assert cost < 260, cost
