"""The search index: build, incremental add/remove, answers equal brute force, model check, CLI."""

import io
import json
import os

import numpy as np
import pytest

from cnclip.commands.search import main as search_main
from cnclip.errors import DataError, UsageError
from cnclip.images import decode_rgb
from cnclip.embedders import TorchEmbedder
from cnclip.search_index import (Searcher, SearchIndex, build_faiss, build_index, choose_kind, ivf_cells, read_payload,
                                 search_faiss, APPROXIMATE_FROM, IVF_NPROBE)

from conftest import COLORS, image_bytes, load_benchmark, make_tiny_model, write_split

SHAPES = {"circle": "圆形", "square": "正方形"}


def make_photos(root, n_per=2):
    """root/<colour>/<shape>_<i>.png, plus a sub-sub-folder and files that are not images."""
    names = {"红色": "red", "绿色": "green", "蓝色": "blue", "黄色": "yellow"}
    for cname, color in COLORS.items():
        for shape in SHAPES:
            for i in range(n_per):
                path = root / names[cname] / f"{shape}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(image_bytes(color, (40 + 6 * i, 30 + 3 * i), shape))
    (root / "red" / "deeper" / "more").mkdir(parents=True)
    (root / "red" / "deeper" / "more" / "x.jpg").write_bytes(image_bytes((200, 0, 0), (36, 36), "circle", "JPEG"))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(image_bytes())
    return root


def build(src, out, model_dir, **kw):
    return build_index([str(s) for s in (src if isinstance(src, list) else [src])], out,
                       TorchEmbedder.load(str(model_dir), "cpu"), cache_dir=str(out.parent / "cache"), **kw)


def brute_force(index, query, k):
    sims = index.vectors @ query
    order = np.argsort(-sims, kind="stable")[:k]
    return order.tolist(), sims[order]


def test_build_walks_the_folder_and_answers_like_brute_force(tiny_model_dir, tmp_path):
    src = make_photos(tmp_path / "photos")
    report = build(src, tmp_path / "idx", tiny_model_dir)
    index = SearchIndex.load(tmp_path / "idx")
    refs = sorted(i.ref for i in index.items)
    assert len(refs) == 17 and "red/deeper/more/x.jpg" in refs and ".hidden.png" not in refs
    assert report.total == report.embedded == 17 and report.kept == report.removed == 0
    assert index.manifest["kind"] == "exact" and index.vectors.shape == (17, 16)
    assert np.allclose(np.linalg.norm(index.vectors, axis=1), 1, atol=1e-5)
    searcher = Searcher.open(tmp_path / "idx")
    for text in ("一个红色的圆形", "蓝色正方形", "猫"):
        hits = searcher.by_text(text, 5)
        expected, scores = brute_force(index, searcher.text_embedding(text), 5)
        assert [h.row for h in hits] == expected
        assert np.allclose([h.score for h in hits], scores, atol=1e-5)
    # An indexed image finds itself first, with cosine 1.
    item = index.items[3]
    hits = searcher.by_image(decode_rgb(read_payload(item)), 3)
    assert hits[0].row == 3 and hits[0].score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("kind", ["auto", "ivf"])
def test_incremental_update_embeds_only_new_images_and_drops_removed_ones(tiny_model_dir, tmp_path, kind):
    src = make_photos(tmp_path / "photos")
    build(src, tmp_path / "idx", tiny_model_dir, kind=kind)
    before = SearchIndex.load(tmp_path / "idx")
    vec_before = {i.key: before.vectors[r] for r, i in enumerate(before.items)}
    (src / "red" / "circle_0.png").unlink()
    (src / "new").mkdir()
    (src / "new" / "purple.png").write_bytes(image_bytes((150, 40, 200), (44, 30), "circle"))
    (src / "green" / "square_1.png").write_bytes(image_bytes((10, 90, 10), (50, 30), "square"))  # changed content
    report = build(src, tmp_path / "idx", tiny_model_dir, kind=kind)
    after = SearchIndex.load(tmp_path / "idx")
    assert (report.embedded, report.kept, report.removed, report.total) == (2, 15, 2, 17)
    assert after.manifest["kind"] == report.kind == ("exact" if kind == "auto" else kind)
    refs = {i.ref for i in after.items}
    assert "red/circle_0.png" not in refs and "new/purple.png" in refs
    for r, item in enumerate(after.items):  # reused rows carry the stored vector, bit for bit
        if item.ref not in ("new/purple.png", "green/square_1.png"):
            assert np.array_equal(after.vectors[r], vec_before[item.key])
    # the faiss structure was rebuilt over exactly these rows
    q = after.vectors[0]
    _, rows = after.search(q[None, :], 17)
    assert sorted(rows[0].tolist()) == list(range(17))
    searcher = Searcher.open(tmp_path / "idx")
    for text in ("一个红色的圆形", "紫色"):  # the loaded index answers like brute force over the stored vectors
        hits = searcher.by_text(text, 5)
        assert [h.row for h in hits] == brute_force(after, searcher.text_embedding(text), 5)[0]


def test_split_source_has_captions_and_bad_images_are_counted(tiny_model_dir, tiny_data_dir, tmp_path):
    report = build(tiny_data_dir, tmp_path / "idx", tiny_model_dir, split="valid")
    index = SearchIndex.load(tmp_path / "idx")
    assert report.total == 8 and all(i.kind == "tsv" and i.caption.startswith("一个") for i in index.items)
    broken = tmp_path / "broken"
    write_split(broken, "valid", {1: image_bytes(), 2: b"not an image"}, [{"text_id": 1, "text": "一个红色的圆形",
                                                                          "image_ids": [1, 2]}])
    report = build(broken, tmp_path / "idx2", tiny_model_dir)
    assert report.total == 1 and report.undecodable == 1 and report.skipped["by_reason"] == {"undecodable image": 1}


def test_pairs_output_of_build_pairs_is_indexed(tiny_model_dir, tmp_path):
    import base64

    src = tmp_path / "pairs"
    src.mkdir()
    lines = [json.dumps({"id": f"p{i}", "image": base64.urlsafe_b64encode(image_bytes(c)).decode(), "text": t,
                         "query": "q"}, ensure_ascii=False)
             for i, (t, c) in enumerate([("红色的圆形", (200, 0, 0)), ("蓝色的圆形", (0, 0, 200))])]
    (src / "train_pairs.jsonl").write_text("\n".join(lines) + "\n{broken\n", encoding="utf-8")
    report = build(src, tmp_path / "idx", tiny_model_dir)
    index = SearchIndex.load(tmp_path / "idx")
    assert report.total == 2 and [i.caption for i in index.items] == ["红色的圆形", "蓝色的圆形"]
    assert report.skipped["by_reason"] == {"malformed pairs line": 1}
    assert decode_rgb(read_payload(index.items[1])).getpixel((20, 15)) == (0, 0, 200)


def test_webdataset_shards_of_build_pairs_are_indexed_in_place(tiny_model_dir, tmp_path):
    import tarfile

    src = tmp_path / "wds"
    src.mkdir()
    with tarfile.open(src / "valid-00000.tar", "w") as tar:
        for key, text, color in (("a", "红色的圆形", (200, 0, 0)), ("b", "绿色的圆形", (0, 160, 0))):
            for name, data in ((f"{key}.jpg", image_bytes(color, fmt="JPEG")), (f"{key}.txt", text.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    report = build(src, tmp_path / "idx", tiny_model_dir)
    index = SearchIndex.load(tmp_path / "idx")
    assert report.total == 2
    assert [(i.kind, i.caption) for i in index.items] == [("tar", "红色的圆形"), ("tar", "绿色的圆形")]
    assert decode_rgb(read_payload(index.items[1])).getpixel((20, 15))[1] > 120
    hits = Searcher.open(tmp_path / "idx").by_image(decode_rgb(read_payload(index.items[0])), 2)
    assert hits[0].row == 0


def test_empty_folder_and_wrong_out_are_clear_errors(tiny_model_dir, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images to index"):
        build(tmp_path / "empty", tmp_path / "idx", tiny_model_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a search index"):
        build(make_photos(tmp_path / "p"), tmp_path / "busy", tiny_model_dir)
    with pytest.raises(UsageError, match="is not a search index"):
        SearchIndex.load(tmp_path / "busy")


def test_a_different_model_is_refused(tiny_model_dir, tmp_path):
    src = make_photos(tmp_path / "photos")
    build(src, tmp_path / "idx", tiny_model_dir)
    other = make_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(UsageError, match="model mismatch.*was built with"):
        Searcher.open(tmp_path / "idx", model=str(other))
    with pytest.raises(UsageError, match="model mismatch"):  # updating with another model too
        build(src, tmp_path / "idx", other)


def test_thumbnails_never_leave_the_indexed_folder(tiny_model_dir, tmp_path):
    src = make_photos(tmp_path / "photos")
    outside = tmp_path / "secret.png"
    outside.write_bytes(image_bytes((1, 2, 3)))
    os.symlink(outside, src / "red" / "link.png")  # a symlink leading out is not indexed
    build(src, tmp_path / "idx", tiny_model_dir)
    index = SearchIndex.load(tmp_path / "idx")
    assert "red/link.png" not in {i.ref for i in index.items}
    item = index.items[0]
    item.ref = "../secret.png"  # a tampered index
    with pytest.raises(ValueError, match="outside the indexed folder"):
        read_payload(item)
    item = index.items[1]
    (src / item.ref).write_bytes(image_bytes((9, 9, 9)))
    with pytest.raises(ValueError, match="changed since it was indexed"):
        read_payload(item)


def mixture(rng, n, dim=32, clusters=40, spread=0.35):
    """n unit vectors around `clusters` random centres (cosine ~0.9 inside a cluster): clustered, as embeddings are."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + spread / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(rows, exact):
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())])


def test_ivf_is_exact_when_it_probes_every_cell_and_finds_nearly_all_at_the_default():
    rng = np.random.default_rng(0)
    data, queries = np.split(mixture(rng, 4100), [4000])  # queries: fresh draws from the same mixture
    exact_scores, exact = build_faiss(data, "exact").search(queries, 10)
    assert np.array_equal(exact, np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :10])
    index = build_faiss(data, "ivf")
    assert index.nlist == ivf_cells(4000) == 100 and index.nprobe == IVF_NPROBE < index.nlist
    index.nprobe = index.nlist  # every cell: the 8-bit codes only choose candidates, the stored vectors rank them
    scores, rows = search_faiss(index, "ivf", data, queries, 10)
    assert np.array_equal(rows, exact)
    assert np.allclose(scores, exact_scores, atol=1e-5)  # exact cosines, not the codes' approximations
    index.nprobe = IVF_NPROBE
    _, rows = search_faiss(index, "ivf", data, queries, 10)
    assert recall_at_10(rows, exact) >= 0.95
    index.nprobe = 1  # the bound above is not vacuous: one cell of 100 misses neighbours in the next cells
    assert recall_at_10(search_faiss(index, "ivf", data, queries, 10)[1], exact) < 0.95


def test_auto_picks_the_kind_by_count_and_a_tiny_ivf_still_works():
    assert choose_kind(APPROXIMATE_FROM - 1) == "exact" and choose_kind(APPROXIMATE_FROM) == "ivf"
    assert choose_kind(10, "ivf") == "ivf" and choose_kind(10**7, "exact") == "exact"
    with pytest.raises(UsageError, match="choose from auto, exact, ivf"):
        choose_kind(10, "hnsw")
    # cells grow like the square root of the count, each with enough vectors to train k-means on
    assert [ivf_cells(n) for n in (1, 79, 80, 10_000, 1_000_000)] == [1, 1, 2, 250, 4000]
    data = mixture(np.random.default_rng(2), 5)
    index = build_faiss(data, "ivf")  # five vectors: one cell, an exact scan
    scores, rows = search_faiss(index, "ivf", data, data, 10)
    assert index.nlist == 1 and rows.shape == (5, 10) and (rows[:, 5:] == -1).all()
    assert np.array_equal(rows[:, 0], np.arange(5)) and np.allclose(scores[:, 0], 1, atol=1e-5)


def test_the_build_checks_nprobe_on_the_data_and_auto_builds_exact_for_vectors_that_do_not_cluster(
        monkeypatch, caplog):
    import faiss

    import cnclip.search_index as search_index

    clustered = mixture(np.random.default_rng(5), 8000, dim=512)
    flat = np.random.default_rng(6).standard_normal((8000, 512)).astype(np.float32)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)  # uniformly random: no cells to find
    kind, index, info = search_index.build_structure(clustered, "ivf")
    assert kind == "ivf" and info["cells"] == index.nlist == 200 and info["nprobe"] == index.nprobe == IVF_NPROBE
    assert info["check_recall_at_10"] >= 0.95
    kind, index, info = search_index.build_structure(flat, "ivf")  # asked for: kept, at the widest nprobe, with a warning
    assert kind == "ivf" and index.nprobe == info["nprobe"] == search_index.IVF_NPROBE_MAX
    assert info["check_recall_at_10"] < 0.95
    assert f"finds {info['check_recall_at_10']:.0%} of the exact top 10" in caplog.text
    assert "--kind exact would always find the true top k" in caplog.text
    monkeypatch.setattr(search_index, "APPROXIMATE_FROM", 1000)
    kind, index, info = search_index.build_structure(flat, "auto")
    assert kind == "exact" and isinstance(index, faiss.IndexFlatIP) and index.ntotal == 8000
    assert info["ivf_rejected"]["check_recall_at_10"] < 0.95 and "building the exact index instead" in caplog.text
    assert search_index.build_structure(clustered, "auto")[0] == "ivf"
    # duplicate images: which of the equal copies comes back does not count against the check
    copies = np.repeat(clustered[:2000], 4, axis=0)
    kind, index, info = search_index.build_structure(copies, "auto")
    assert kind == "ivf" and info["nprobe"] == IVF_NPROBE and info["check_recall_at_10"] >= 0.95


def _synthetic_index(path, vectors, kind, faiss_index):
    from cnclip.search_index import INDEX_VERSION, Item

    items = [Item(f"file:/x:{i}.png", "file", "/x", f"{i}.png", "", f"{i:032x}") for i in range(len(vectors))]
    manifest = {"version": INDEX_VERSION, "kind": kind, "count": len(vectors),
                "model": {"spec": "m", "fingerprint": "f", "backend": "torch"}}
    return SearchIndex(path, manifest, items, vectors, faiss_index)


def test_an_ivf_index_round_trips_and_an_hnsw_index_of_earlier_versions_still_answers(tmp_path):
    import faiss

    rng = np.random.default_rng(3)
    data, queries = np.split(mixture(rng, 3050), [3000])
    truth = np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :10]
    written = _synthetic_index(tmp_path / "ivf", data, "ivf", build_faiss(data, "ivf"))
    written.faiss_index.nprobe = 23  # the nprobe a build's check chose is kept in faiss.index
    written.write()
    loaded = SearchIndex.load(tmp_path / "ivf")
    assert isinstance(loaded.faiss_index, faiss.IndexIVFScalarQuantizer) and loaded.faiss_index.nprobe == 23
    assert np.array_equal(loaded.search(queries, 10)[1], written.search(queries, 10)[1])
    assert recall_at_10(loaded.search(queries, 10)[1], truth) >= 0.95
    # an index directory holding an HNSW graph, as `--kind hnsw` wrote before "ivf" replaced it
    graph = faiss.IndexHNSWFlat(32, 16, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efSearch = 256
    graph.add(data)
    _synthetic_index(tmp_path / "hnsw", data, "hnsw", graph).write()
    old = SearchIndex.load(tmp_path / "hnsw")
    assert isinstance(old.faiss_index, faiss.IndexHNSWFlat)
    assert recall_at_10(old.search(queries, 10)[1], truth) >= 0.95


def test_cli_index_query_image_json_and_table(tiny_model_dir, tmp_path, capsys):
    src = make_photos(tmp_path / "photos")
    idx = tmp_path / "idx"
    assert search_main(["index", str(src), "--model", str(tiny_model_dir), "--out", str(idx),
                        "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 17 and report["kind"] == "exact"
    assert search_main(["query", str(idx), "红色的圆形", "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3] and out["query"] == "红色的圆形"
    # --kind ivf: 17 images make one cell, so the inverted file answers exactly as the flat index does
    assert search_main(["index", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "ivf"),
                        "--cache-dir", str(tmp_path / "cache"), "--kind", "ivf", "--json"]) == 0
    ivf_report = json.loads(capsys.readouterr().out)
    assert ivf_report["kind"] == "ivf"
    assert ivf_report["structure"] == {"cells": 1, "nprobe": 1, "check_recall_at_10": 1.0}  # 17 images: one cell
    assert json.loads((tmp_path / "ivf" / "index.json").read_text())["structure"] == ivf_report["structure"]
    assert search_main(["index", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "ivf"),
                        "--cache-dir", str(tmp_path / "cache"), "--kind", "ivf"]) == 0  # an update: all 17 kept
    text = capsys.readouterr().out
    assert "17 images (ivf index): 17 reused from the index" in text and "memory per image: " in text
    assert "inverted file: 1 cells, 1 scanned a query; queries near stored images found 100.0% of their exact" in text
    for name, key in (("faiss.index", "index_bytes_per_image"), ("vectors.safetensors", "vector_bytes_per_image")):
        assert ivf_report[key] == round(os.path.getsize(tmp_path / "ivf" / name) / 17, 1)
    assert ivf_report["vector_bytes_per_image"] >= 4 * 16  # float32 vectors of the tiny model's 16 dimensions
    assert search_main(["query", str(tmp_path / "ivf"), "红色的圆形", "-k", "3", "--json"]) == 0
    ivf = json.loads(capsys.readouterr().out)["results"]
    assert [r["row"] for r in ivf] == [r["row"] for r in out["results"]]
    assert np.allclose([r["score"] for r in ivf], [r["score"] for r in out["results"]], atol=1e-5)
    assert search_main(["query", str(idx), "红色的圆形", "-k", "3"]) == 0
    table = capsys.readouterr().out
    assert "rank" in table and out["results"][0]["ref"] in table
    assert search_main(["image", str(idx), str(src / "blue" / "circle_1.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["ref"] == "blue/circle_1.png"
    # bad input: exit status and one line naming it
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    assert search_main(["image", str(idx), str(tmp_path / "bad.jpg")]) == 4
    assert "bad.jpg: undecodable image" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert search_main(["index", str(tmp_path / "empty"), "--model", str(tiny_model_dir), "--out",
                        str(tmp_path / "i2")]) == 4
    assert "holds no images to index" in capsys.readouterr().err
    assert search_main(["query", str(tmp_path / "nowhere"), "x"]) == 2
    assert "is not a search index" in capsys.readouterr().err


def test_serve_refuses_a_mismatched_model_and_a_bad_class_list_before_listening(tiny_model_dir, tmp_path, capsys):
    from cnclip.commands.serve import main as serve_main

    build(make_photos(tmp_path / "photos"), tmp_path / "idx", tiny_model_dir)
    other = make_tiny_model(tmp_path / "other", seed=2)
    assert serve_main([str(tmp_path / "idx"), "--model", str(other), "--port", "1"]) == 2
    assert "model mismatch" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("red: 红色\n", encoding="utf-8")
    assert serve_main([str(tmp_path / "idx"), "--classes", str(tmp_path / "one.txt"), "--port", "1"]) == 4
    assert "only one class" in capsys.readouterr().err


def test_search_benchmark_prints_json(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    script = REPO / "benchmarks" / "search_throughput.py"
    out = subprocess.run([sys.executable, str(script), "--sizes", "2000", "--queries", "20", "--threads", "1",
                          "--data", "clustered", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout) == json.loads((tmp_path / "r.json").read_text())
    result = json.loads(out.stdout)["results"][0]
    assert result["vectors"] == 2000 and result["exact"]["query_ms_median"] > 0
    assert result["exact"]["bytes_per_vector"] >= 4 * 512  # the float32 vectors themselves
    ivf = result["ivf"]
    assert ivf["params"]["cells"] == ivf_cells(2000) == 50 and IVF_NPROBE == 16
    assert ivf["params"]["nprobe"] in (16, 32, 50)  # what the check on the data chose, and index.json records
    assert 512 <= ivf["bytes_per_vector"] < 2 * 512  # 8-bit codes: a quarter of the float32 size, plus ids
    sweep = {e["nprobe"]: e for e in ivf["nprobe_sweep"]}
    assert list(sweep) == [4, 8, 16, 32, 50]  # 64 is capped at the 50 cells there are
    # probing every cell finds the exact ten (candidates from the codes, ranked by the stored vectors)
    assert sweep[50]["recall_at_10_vs_exact"] >= 0.99, sweep
    assert sweep[50]["recall_at_10_vs_exact_near_queries"] >= 0.99, sweep
    # re-ranking 4 * k candidates with the stored vectors never does worse than the 8-bit codes alone
    assert all(e["recall_at_10_vs_exact"] >= e["codes_only_recall_at_10_vs_exact"] for e in sweep.values()), sweep
    # the sweep's run at the chosen nprobe searches the same 20 queries on the same index: the same answer
    chosen = sweep[ivf["params"]["nprobe"]]
    assert chosen["recall_at_10_vs_exact"] == ivf["recall_at_10_vs_exact"]
    assert chosen["recall_at_10_vs_exact_near_queries"] == ivf["recall_at_10_vs_exact_near_queries"]

    # the recall measure itself, on rankings whose overlap is known
    bench = load_benchmark("search_throughput")
    exact = np.array([list(range(10)), list(range(10, 20))])
    assert bench.overlap(exact, exact) == 1.0
    assert bench.overlap(np.array([list(range(5, 15)), list(range(30, 40))]), exact) == 0.25  # 5 of 10, 0 of 10
    assert bench.overlap(exact[:, ::-1], exact) == 1.0  # order inside the top ten does not count
