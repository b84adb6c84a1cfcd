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
from cnclip.search_index import (Searcher, SearchIndex, build_faiss, build_index, choose_kind, read_payload,
                                 APPROXIMATE_FROM)

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


def test_incremental_update_embeds_only_new_images_and_drops_removed_ones(tiny_model_dir, tmp_path):
    src = make_photos(tmp_path / "photos")
    build(src, tmp_path / "idx", tiny_model_dir)
    before = SearchIndex.load(tmp_path / "idx")
    vec_before = {i.key: before.vectors[r] for r, i in enumerate(before.items)}
    (src / "red" / "circle_0.png").unlink()
    (src / "new").mkdir()
    (src / "new" / "purple.png").write_bytes(image_bytes((150, 40, 200), (44, 30), "circle"))
    (src / "green" / "square_1.png").write_bytes(image_bytes((10, 90, 10), (50, 30), "square"))  # changed content
    report = build(src, tmp_path / "idx", tiny_model_dir)
    after = SearchIndex.load(tmp_path / "idx")
    assert (report.embedded, report.kept, report.removed, report.total) == (2, 15, 2, 17)
    refs = {i.ref for i in after.items}
    assert "red/circle_0.png" not in refs and "new/purple.png" in refs
    for r, item in enumerate(after.items):  # reused rows carry the stored vector, bit for bit
        if item.ref not in ("new/purple.png", "green/square_1.png"):
            assert np.array_equal(after.vectors[r], vec_before[item.key])
    # the faiss structure was rebuilt over exactly these rows
    q = after.vectors[0]
    _, rows = after.search(q[None, :], 17)
    assert sorted(rows[0].tolist()) == list(range(17))


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


def test_hnsw_finds_nearly_what_exact_finds_and_auto_picks_by_size():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    _, exact = build_faiss(data, "exact").search(queries, 10)
    _, approx = build_faiss(data, "hnsw").search(queries, 10)
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    assert np.array_equal(exact, truth)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx.tolist(), exact.tolist())]) > 0.9
    assert choose_kind(APPROXIMATE_FROM - 1) == "exact" and choose_kind(APPROXIMATE_FROM) == "hnsw"
    assert choose_kind(10, "hnsw") == "hnsw"


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

    from cnclip.search_index import HNSW_EF_SEARCH, HNSW_M

    script = REPO / "benchmarks" / "search_throughput.py"
    out = subprocess.run([sys.executable, str(script), "--sizes", "600", "--queries", "20", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)["results"][0]
    assert result["vectors"] == 600 and result["exact"]["query_ms_median"] > 0
    hnsw = result["hnsw"]
    assert hnsw["params"] == {"M": HNSW_M, "efSearch": HNSW_EF_SEARCH}  # the index cnclip builds
    # efSearch 512 over 600 vectors searches nearly all of them: HNSW must find (almost) the exact ten.
    assert hnsw["recall_at_10_vs_exact"] >= 0.97 and hnsw["recall_at_10_vs_exact_near_queries"] >= 0.97, hnsw
    sweep = {e["efSearch"]: e for e in hnsw["ef_sweep"]}
    assert list(sweep) == [32, 128, 512, 2048]
    # the sweep's run at the default efSearch searches the same 20 queries on the same graph: the same answer
    assert sweep[HNSW_EF_SEARCH]["recall_at_10_vs_exact"] == hnsw["recall_at_10_vs_exact"]
    assert sweep[HNSW_EF_SEARCH]["recall_at_10_vs_exact_near_queries"] == hnsw["recall_at_10_vs_exact_near_queries"]

    # the recall measure itself, on rankings whose overlap is known
    bench = load_benchmark("search_throughput")
    exact = np.array([list(range(10)), list(range(10, 20))])
    assert bench.overlap(exact, exact) == 1.0
    assert bench.overlap(np.array([list(range(5, 15)), list(range(30, 40))]), exact) == 0.25  # 5 of 10, 0 of 10
    assert bench.overlap(exact[:, ::-1], exact) == 1.0  # order inside the top ten does not count
