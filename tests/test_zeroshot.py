import json
import math

import pytest
import torch

import cnclip.classifier
import cnclip.commands.zeroshot
from cnclip.data import ImageTransform
from cnclip.errors import EXIT_DATA, DataError
from cnclip.skiplog import SkipLog
from cnclip.runtime import pick_runtime
from cnclip.prompts import DEFAULT_TEMPLATES, build_prompts, load_classes, load_templates
from cnclip.errors import ConfigError
from cnclip.recipe import load_recipe
from cnclip.classifier import ensemble, folder_embeddings, probabilities, score, similarities
from cnclip.commands.zeroshot import load_run_config, main
from cnclip.image_sources import ImageFolder

from conftest import COLORS, DEMO_RECIPE, REPO, image_bytes, tiny_overrides

KEYS = {"red": "红色, 红", "green": "绿色，绿", "blue": "蓝色、蓝", "yellow": "黄色"}  # all three separators
NAMES = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_folder_set(root, per_class=3, extras=True):
    """root/images/<key>/*.png in the four test colours, a class list and a small template file."""
    for key in KEYS:
        for i in range(per_class):
            write_bytes = image_bytes(COLORS[NAMES[key]], (40 + 6 * i, 30 + 4 * i), "circle" if i % 2 else "square")
            (root / "images" / key).mkdir(parents=True, exist_ok=True)
            (root / "images" / key / f"{i}.png").write_bytes(write_bytes)
    if extras:
        (root / "images" / "red" / "broken.jpg").write_bytes(b"not an image at all")
        (root / "images" / "green" / "notes.txt").write_text("x")
    classes = write(root / "classes.txt", "# test colours\n" + "".join(f"{k}: {v}\n" for k, v in KEYS.items()))
    templates = write(root / "templates.txt", "# tiny test vocab\n一张{}的照片\n\n{}的圆形\n图片中间有{}\n")
    return root / "images", classes, templates


# ---------------------------------------------------------------- templates and class lists


def test_templates_skip_comments_and_blank_lines_and_single_keeps_the_first(tmp_path):
    f = write(tmp_path / "t.txt", "# comment\n\n一张{}的照片\n  {}的画  \n# another\n")
    assert load_templates(f) == ["一张{}的照片", "{}的画"]
    assert load_templates(f, single=True) == ["一张{}的照片"]


@pytest.mark.parametrize("text, message", [
    ("", "no templates"),
    ("# only a comment\n\n", "no templates"),
    ("一张{}的照片\n一张照片\n", ":2: template '一张照片' has no {}"),
    ("一张{}的照片\n一张{}的照片\n", ":2: template '一张{}的照片' repeats line 1"),
])
def test_bad_templates_file_is_named(tmp_path, text, message):
    f = write(tmp_path / "bad_templates.txt", text)
    with pytest.raises(DataError, match="bad_templates.txt") as err:
        load_templates(f)
    assert message in str(err.value)


def test_class_list_formats_and_synonyms(tmp_path):
    f = write(tmp_path / "c.txt", "# k: names\ncat: 猫, 猫咪\ndog：狗，小狗、狗狗\nbird\t鸟\n")
    classes = load_classes(f)
    assert classes.keys == ("cat", "dog", "bird")
    assert classes.names == (("猫", "猫咪"), ("狗", "小狗", "狗狗"), ("鸟",))
    assert classes.label(0) == "cat (猫)"


@pytest.mark.parametrize("text, message", [
    ("cat 猫\ndog: 狗\n", "c.txt:1: expected 'key: 名称1, 名称2'"),
    ("cat: 猫\ncat: 猫咪\n", "c.txt:2: class key 'cat' repeats line 1"),
    ("cat: 猫\ntiger: 猫\n", "c.txt:2: name '猫' of class 'tiger' is also a name of class 'cat'"),
    ("cat: ,\ndog: 狗\n", "c.txt:1: class 'cat' has no names"),
    ("cat: 猫\n", "only one class"),
    ("# nothing\n", "no classes"),
])
def test_bad_class_list_is_named(tmp_path, text, message):
    with pytest.raises(DataError) as err:
        load_classes(write(tmp_path / "c.txt", text))
    assert message in str(err.value)


def test_shipped_templates_and_cifar10_classes():
    templates = load_templates()
    assert DEFAULT_TEMPLATES == REPO / "cnclip" / "assets" / "zeroshot_templates.txt"
    assert len(templates) >= 15 and templates[0] == "一张{}的照片"
    assert load_templates(single=True) == ["一张{}的照片"]
    cifar = load_classes("cifar10")
    assert cifar.keys == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert all(names for names in cifar.names) and sum(map(len, cifar.names)) > 10  # synonyms present


# ---------------------------------------------------------------- the math, on fixed embeddings


def test_prompt_formatting_and_ensembling_match_a_hand_computation(tmp_path):
    classes = load_classes(write(tmp_path / "c.txt", "a: 猫, 猫咪\nb: 狗\n"))
    texts, owners = build_prompts(["一张{}的照片", "{}的画"], classes)
    assert texts == ["一张猫的照片", "猫的画", "一张猫咪的照片", "猫咪的画", "一张狗的照片", "狗的画"]
    assert owners == [0, 0, 0, 0, 1, 1]
    emb = torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0], [4.0, 3.0], [0.0, -2.0], [-3.0, -4.0]])
    got = ensemble(emb, owners, 2)
    # a: unit vectors (.6,.8) (0,1) (1,0) (.8,.6) average to (.6,.6) -> (1/sqrt2, 1/sqrt2);
    # b: (0,-1) (-.6,-.8) average to (-.3,-.9) -> divided by sqrt(.9). (Averaging the raw vectors
    # instead would give (.8,.6) and (-.447,-.894): normalising each prompt first matters.)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[s, s], [-0.3 / math.sqrt(0.9), -0.9 / math.sqrt(0.9)]])
    assert torch.allclose(got, expected, atol=1e-6)


def test_accuracy_per_class_and_confusion_on_planted_similarities():
    sims = torch.tensor([
        [0.9, 0.1, 0.0],  # a -> a
        [0.2, 0.5, 0.3],  # a -> b, and a is not even in its top 2
        [0.1, 0.8, 0.2],  # b -> b
        [0.6, 0.4, 0.0],  # b -> a, b second
        [0.0, 0.1, 0.7],  # c -> c
        [0.3, 0.2, 0.9],  # c -> c
    ])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    r = score(sims, labels, ["a", "b", "c"], k=2)
    assert r["top1"] == pytest.approx(400 / 6) and r["top2"] == pytest.approx(500 / 6)
    assert r["confusion"]["matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]  # rows true, columns predicted
    assert r["per_class"] == {"a": {"images": 2, "top1": 50.0, "top2": 50.0},
                              "b": {"images": 2, "top1": 50.0, "top2": 100.0},
                              "c": {"images": 2, "top1": 100.0, "top2": 100.0}}
    five = score(sims, labels, ["a", "b", "c"])
    assert five["top_k_used"] == 3 and five["top5"] == 100.0  # fewer classes than k: k shrinks
    assert "d" not in score(sims, labels, ["a", "b", "c"])["per_class"]


def test_probabilities_are_the_softmax_of_scaled_cosines():
    image = torch.tensor([[2.0, 0.0]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sims = similarities(image, classes)
    assert sims.tolist() == [[1.0, 0.0]]
    p = probabilities(sims, 10.0)[0]
    assert p[0].item() == pytest.approx(math.exp(10) / (math.exp(10) + 1))
    assert p.sum().item() == pytest.approx(1.0)


# ---------------------------------------------------------------- image folders


def test_folder_reading_counts_what_it_skips(tmp_path):
    images, classes_file, _ = make_folder_set(tmp_path)
    (images / "stray.png").write_bytes(image_bytes())
    skips = SkipLog()
    folder = ImageFolder(images, load_classes(classes_file), skips)
    assert len(folder) == 13  # 4 x 3 pngs + broken.jpg (its decoding fails later, counted there)
    assert skips.counts == {"not an image file": 1, "file outside a class folder": 1}
    assert sorted(set(folder.labels)) == [0, 1, 2, 3]


def test_folder_errors_name_the_folder(tmp_path):
    images, classes_file, _ = make_folder_set(tmp_path, extras=False)
    classes = load_classes(classes_file)
    (images / "purple").mkdir()
    with pytest.raises(DataError, match=r"class folder .*purple has no entry in the class list .*classes.txt"):
        ImageFolder(images, classes, SkipLog())
    (images / "purple").rmdir()
    for f in (images / "blue").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder .*blue has no images"):
        ImageFolder(images, classes, SkipLog())
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolder(tmp_path / "nowhere", classes, SkipLog())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders with images"):
        ImageFolder(empty, classes, SkipLog())


# ---------------------------------------------------------------- the command, end to end on a tiny model


def run_cli(*args):
    return main([str(a) for a in args])


def test_cli_end_to_end_writes_metrics_confusion_and_predictions(tiny_model_dir, tmp_path, capsys, monkeypatch):
    images, classes, templates = make_folder_set(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--model", tiny_model_dir, "--classes", classes, "--images", images, "--templates", templates,
            "--out", out, "--cache-dir", cache, "--workers", 0]
    assert run_cli(*args) == 0
    printed = capsys.readouterr().out
    assert "3 templates averaged" in printed and "confusion matrix" in printed and "red (红色)" in printed
    assert "skipped 2 items" in printed
    report = json.loads((out / "zeroshot.json").read_text(encoding="utf-8"))
    m = report["results"]["model"]
    assert m["num_images"] == 12 and m["num_classes"] == 4
    assert sum(map(sum, m["confusion"]["matrix"])) == 12 and m["confusion"]["labels"] == list(KEYS)
    assert all(c["images"] == 3 for c in m["per_class"].values())
    assert report["skipped"]["by_reason"] == {"not an image file": 1, "undecodable image": 1}
    assert any("broken.jpg" in e for e in report["skipped"]["examples"]["undecodable image"])
    assert report["templates"] == ["一张{}的照片", "{}的圆形", "图片中间有{}"] and report["ensemble"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12 and all(len(r["top"]) == 4 and r["label"] in KEYS for r in rows)
    top1 = sum(r["top"][0] == r["label"] for r in rows)
    assert m["top1"] == pytest.approx(100 * top1 / 12)
    assert len(list((cache / "class_embeddings").glob("*.safetensors"))) == 1

    # The same prompts on the same model come from the cache: no text pass at all.
    monkeypatch.setattr(cnclip.classifier, "embed_texts", lambda *a, **k: pytest.fail("class cache missed"))
    assert run_cli(*args) == 0
    assert json.loads((out / "zeroshot.json").read_text(encoding="utf-8"))["results"]["model"]["top1"] == m["top1"]
    monkeypatch.undo()
    # Other prompts (one template) are a new cache entry.
    assert run_cli(*args, "--single-template") == 0
    assert "one template 一张{}的照片" in capsys.readouterr().out
    assert len(list((cache / "class_embeddings").glob("*.safetensors"))) == 2


def test_planted_class_embeddings_give_the_known_answer(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Class c's embedding is planted as the image embedding of class perm[c]: every prediction is known."""
    from cnclip.inference import load_for_inference

    images, classes_file, templates = make_folder_set(tmp_path, per_class=1, extras=False)
    classes = load_classes(classes_file)
    loaded = load_for_inference(str(tiny_model_dir))
    runtime = pick_runtime("cpu", "fp32")
    folder = ImageFolder(images, classes, SkipLog())
    emb = folder_embeddings(folder, loaded.clip, ImageTransform(loaded.preprocess), runtime, str(tmp_path / "cache"),
                            8, 0, SkipLog())
    perm = [1, 2, 3, 0]  # class c looks like the image of class perm[c]
    planted = emb.embeddings[[emb.labels.tolist().index(p) for p in perm]]
    monkeypatch.setattr(cnclip.classifier, "class_embeddings", lambda *a, **k: planted)

    assert run_cli("--model", tiny_model_dir, "--classes", classes_file, "--images", images, "--out", tmp_path / "o",
                   "--cache-dir", tmp_path / "cache", "--predict", images / "green" / "0.png") == 0
    m = json.loads((tmp_path / "o" / "zeroshot.json").read_text(encoding="utf-8"))["results"]["model"]
    # The image of class t is predicted as the class c with perm[c] == t.
    expected = [[0] * 4 for _ in range(4)]
    for c, t in enumerate(perm):
        expected[t][c] = 1
    assert m["confusion"]["matrix"] == expected and m["top1"] == 0.0
    report = json.loads((tmp_path / "o" / "zeroshot.json").read_text(encoding="utf-8"))
    top = report["predictions"][0]["top"]
    assert top[0]["key"] == "red"  # perm[red] == green: the green image is nearest red's planted embedding
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)  # all 4 classes shown
    assert "red (红色)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_key", "empty_folder", "empty_templates", "no_placeholder"])
def test_cli_bad_inputs_exit_4_naming_the_file(tiny_model_dir, tmp_path, capsys, case):
    images, classes, templates = make_folder_set(tmp_path, extras=False)
    if case == "missing_key":
        (images / "purple").mkdir()
        (images / "purple" / "0.png").write_bytes(image_bytes())
        expect = "purple has no entry in the class list"
    elif case == "empty_folder":
        for f in (images / "blue").iterdir():
            f.unlink()
        expect = "blue has no images"
    elif case == "empty_templates":
        templates.write_text("# nothing here\n", encoding="utf-8")
        expect = "templates.txt: no templates"
    else:
        templates.write_text("一张{}的照片\n一张照片\n", encoding="utf-8")
        expect = "templates.txt:2: template '一张照片' has no {}"
    code = run_cli("--model", tiny_model_dir, "--classes", classes, "--images", images, "--templates", templates,
                   "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert code == EXIT_DATA and expect in err and "Traceback" not in err


def test_cli_needs_a_class_list_and_something_to_classify(tiny_model_dir, tmp_path, capsys):
    assert run_cli("--model", tiny_model_dir, "--images", tmp_path) == 2
    assert "no class list" in capsys.readouterr().err
    images, classes, _ = make_folder_set(tmp_path, extras=False)
    assert run_cli("--model", tiny_model_dir, "--classes", classes) == 2
    assert "nothing to classify" in capsys.readouterr().err
    assert run_cli("--model", tiny_model_dir, "--classes", classes, "--images", images, "--compare-base") == 2
    assert "--compare-base needs a run directory" in capsys.readouterr().err


def test_recipe_file_and_flags(tmp_path):
    parser = cnclip.commands.zeroshot.build_parser()
    cfg = load_run_config(parser.parse_args([str(REPO / "recipes" / "zeroshot" / "demo.yaml")]))
    assert cfg.model == "runs/demo" and cfg.compare_base and not cfg.single_template and cfg.top_k == 5
    cfg = load_run_config(parser.parse_args([str(REPO / "recipes" / "zeroshot" / "demo.yaml"), "--no-compare-base",
                                             "--top-k", "3", "--predict", "a.png", "b.png"]))
    assert not cfg.compare_base and cfg.top_k == 3 and cfg.predict == ["a.png", "b.png"]
    bad = write(tmp_path / "z.yaml", "model: m\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown zero-shot config key 'bogus'"):
        load_run_config(parser.parse_args([str(bad)]))


# ---------------------------------------------------------------- tracking during fine-tuning


def test_recipe_zeroshot_keys_are_validated(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    images, classes, templates = make_folder_set(tmp_path, extras=False)
    base = tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "run")

    def load(**keys):
        return load_recipe(DEMO_RECIPE, base + [f"zeroshot.{k}={v}" for k, v in keys.items()])

    with pytest.raises(ConfigError, match="'zeroshot.images' and 'zeroshot.classes' go together"):
        load(images=images)
    with pytest.raises(ConfigError, match="'zeroshot.images': folder not found"):
        load(images=tmp_path / "x", classes=classes)
    with pytest.raises(ConfigError, match="'zeroshot.classes': file not found"):
        load(images=images, classes=tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="'zeroshot.templates': file not found"):
        load(images=images, classes=classes, templates=tmp_path / "nope.txt")
    base.append("data.valid_split=null")  # no validation: tracking is off, and the log says so
    with caplog.at_level("WARNING", logger="cnclip.classifier"):
        assert cnclip.classifier.ZeroShotTracker.from_recipe(load(images=images, classes=classes),
                                                           None, None, None, None, SkipLog()) is None
    assert "does not track it" in caplog.text
    base.pop()
    recipe = load(images=images, classes=classes, templates=templates)  # all there: fine
    assert recipe.zeroshot.images == str(images)
    # A run directory's saved recipe is read without touching the data (check_data=False).
    assert load_recipe(DEMO_RECIPE, base + [f"zeroshot.images={tmp_path / 'gone'}", f"zeroshot.classes={classes}"],
                       check_data=False).zeroshot.images.endswith("gone")


def test_finetune_logs_zero_shot_accuracy_and_compare_base_agrees(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from cnclip.finetune import main as finetune_main

    images, classes, templates = make_folder_set(tmp_path / "zs")
    run_dir = tmp_path / "run"
    code = finetune_main([str(DEMO_RECIPE), *tiny_overrides(tiny_model_dir, tiny_data_dir, run_dir),
                          f"zeroshot.images={images}", f"zeroshot.classes={classes}", f"zeroshot.templates={templates}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("zero-shot top-1:") == 3 and "zero-shot top-1 before training:" in printed
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [e for e in log if "valid" in e]
    assert [e["epoch"] for e in evals] == [0, 1, 2]
    for e in evals:  # beside retrieval recall, in the same entry
        assert "mean_recall" in e["valid"]
        z = e["valid"]["zeroshot"]
        assert z["num_images"] == 12 and z["num_classes"] == 4
        assert z["top5"] == 100.0  # 4 classes: top-5 shrinks to top-4, which holds every class
        assert z["top1"] * 12 / 100 == pytest.approx(round(z["top1"] * 12 / 100))  # a count of the 12 images
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["skipped"]["by_reason"].get("undecodable image") == 1  # broken.jpg, counted

    # Base vs tuned in one command, with the run's own zero-shot folder, classes and templates. The base
    # model's accuracy is what training measured before its first step (LoRA starts as a no-op), and the
    # tuned model's is what it measured for the best checkpoint.
    assert run_cli("--model", run_dir, "--compare-base", "--workers", 0) == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "tuned" in printed and "change" in printed
    report = json.loads((run_dir / "zeroshot" / "zeroshot.json").read_text(encoding="utf-8"))
    assert set(report["results"]) == {"base", "tuned"}
    assert report["results"]["base"]["top1"] == pytest.approx(summary["before"]["zeroshot"]["top1"])
    best = json.loads((run_dir / "best" / "metrics.json").read_text(encoding="utf-8"))
    assert report["results"]["tuned"]["top1"] == pytest.approx(best["valid"]["zeroshot"]["top1"])


# ---------------------------------------------------------------- the demo's zero-shot set


def test_demo_zero_shot_set_is_complete_and_in_the_tiny_vocab(tmp_path):
    from transformers import AutoTokenizer

    from cnclip.demo_data import write_demo_zeroshot

    folder, classes_file = write_demo_zeroshot(tmp_path)
    classes = load_classes(classes_file)
    skips = SkipLog()
    assert len(ImageFolder(folder, classes, skips)) == 36 and skips.total == 0
    tokenizer = AutoTokenizer.from_pretrained(REPO / "recipes" / "models" / "tiny")
    texts, _ = build_prompts(load_templates(REPO / "recipes" / "zeroshot" / "demo_templates.txt"), classes)
    unknown = [t for t in texts if tokenizer.unk_token_id in tokenizer(t)["input_ids"]]
    assert not unknown
    recipe = load_recipe(DEMO_RECIPE, check_data=False)
    assert recipe.zeroshot.images.endswith("zeroshot") and recipe.zeroshot.classes.endswith("zeroshot_classes.txt")


def test_tied_similarities_go_to_the_lower_class_index():
    """Two classes with the same embedding (a duplicated name): every image ties between them, and the
    lower index wins, on any device, instead of whichever torch.topk's kernel meets first."""
    sims = torch.tensor([[0.2, 0.5, 0.5, 0.5], [0.9, 0.1, 0.9, 0.0], [0.3, 0.3, 0.3, 0.3]])
    r = score(sims, torch.tensor([1, 0, 0]), ["a", "b", "c", "d"], k=2)
    assert r["confusion"]["matrix"][1] == [0, 1, 0, 0] and r["confusion"]["matrix"][0] == [2, 0, 0, 0]
    assert r["top1"] == 100.0 and r["per_class"]["a"] == {"images": 2, "top1": 100.0, "top2": 100.0}
