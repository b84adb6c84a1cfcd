"""Local path or Hub id is decided before anything is loaded: a mistyped path fails at once with exit 2,
and a Hub id that cannot be fetched fails with one line and exit 5 (cnclip/model_reference.py)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cnclip.errors import EXIT_MODEL, EXIT_USAGE, ConfigError, ModelLoadError, UsageError
from cnclip.model_reference import HUB_ETAG_TIMEOUT_S, ModelReference, hub_access, parse_model_reference

REPO = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on: any Hub request sent there is refused (and logged)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cnclip(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "cnclip", *args], cwd=cwd, capture_output=True, text=True,
                          env={**base, **env}, timeout=300)


@pytest.mark.parametrize("spec", ["./model", "/abs/model", "~/model", "a/b/c", "runs/demoo"])
def test_paths_are_local_and_must_exist(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError, match=f"--model: no such file or directory: {spec}"):
        parse_model_reference(spec, "--model")


def test_hub_ids_and_modelscope_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_model_reference("OFA-Sys/chinese-clip-vit-base-patch16") == ModelReference(
        "hub", "OFA-Sys/chinese-clip-vit-base-patch16")
    assert parse_model_reference("bert-base-chinese") == ModelReference("hub", "bert-base-chinese")
    assert parse_model_reference("modelscope:damo/x") == ModelReference("modelscope", "damo/x")
    (tmp_path / "OFA-Sys").mkdir()  # the same text, now that a folder of that name is here: a local path
    with pytest.raises(UsageError, match="its folder OFA-Sys/ exists"):
        parse_model_reference("OFA-Sys/chinese-clip-vit-base-patch16")
    (tmp_path / "OFA-Sys" / "chinese-clip-vit-base-patch16").mkdir()
    assert parse_model_reference("OFA-Sys/chinese-clip-vit-base-patch16").kind == "local"


@pytest.mark.parametrize("args", [
    ["evaluate", "runs/nope", "--data", "data"],
    ["zeroshot", "--model", "runs/demoo", "--classes", "cifar10", "--predict", "a.jpg"],
    ["search", "index", ".", "--model", "runs/demoo", "--out", "idx"],
])
def test_a_mistyped_local_path_exits_2_without_touching_the_network(tmp_path, args):
    """With the Hub pointed at a closed port and offline mode off, a Hub attempt would end in exit 5."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"")
    proc = cnclip(args, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    missing = next(a for a in args if a.startswith("runs/"))
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert f"no such file or directory: {missing}" in proc.stderr
    assert "thrown while requesting" not in proc.stderr and "Traceback" not in proc.stderr


def test_build_pairs_refuses_a_missing_model_path_before_any_stage(tmp_path):
    from data_tools.cli import main

    dump = tmp_path / "dump.jsonl"
    dump.write_text("", encoding="utf-8")
    assert main(["build-pairs", str(dump), "--out", str(tmp_path / "out"), "--no-progress",
                 "--model", str(tmp_path / "no-such-model")]) == EXIT_USAGE
    assert not (tmp_path / "out" / ".work").exists()


def test_a_recipe_names_its_missing_model_base(tmp_path):
    from cnclip.recipe import load_recipe

    with pytest.raises(ConfigError, match=f"recipe key 'model.base': no such file or directory: {tmp_path}/nope"):
        load_recipe(None, ["data.root=x", "data.generate=demo", f"model.base={tmp_path}/nope"])


def test_an_unreachable_hub_id_offline_fails_with_one_line_and_exit_5(tmp_path):
    proc = cnclip(["evaluate", "nobody/no-such-model", "--data", "data"], tmp_path, HF_HUB_OFFLINE="1",
                  HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == EXIT_MODEL, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [errors[-1]] and errors[-1].startswith("error: could not load 'nobody/no-such-model' from the "
                                                            "Hugging Face Hub (HF_HUB_OFFLINE is set"), proc.stderr


def test_hub_retry_warnings_collapse_to_one_line_per_request(caplog):
    http_log = logging.getLogger("huggingface_hub.utils._http")
    with caplog.at_level(logging.WARNING):
        with hub_access(ModelReference("hub", "o/n")):
            for url in ("HEAD http://h/o/n/config.json", "HEAD http://h/o/n/config.json", "HEAD http://h/o/x"):
                http_log.warning("'refused' thrown while requesting %s", url)
                http_log.warning("Retrying in 1s [Retry 1/5].")
        http_log.warning("Retrying in 2s [Retry 2/5].")  # outside a Hub load nothing is filtered
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Hugging Face Hub request failed, retrying quietly: 'refused' thrown while requesting "
                        "HEAD http://h/o/n/config.json",
                        "Hugging Face Hub request failed, retrying quietly: 'refused' thrown while requesting "
                        "HEAD http://h/o/x",
                        "Retrying in 2s [Retry 2/5]."]


def test_hub_metadata_timeout_is_short_unless_the_user_chose_one(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    before = constants.HF_HUB_ETAG_TIMEOUT
    with hub_access(ModelReference("hub", "o/n")):
        assert constants.HF_HUB_ETAG_TIMEOUT == HUB_ETAG_TIMEOUT_S
    assert constants.HF_HUB_ETAG_TIMEOUT == before
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "33")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 33)
    with hub_access(ModelReference("hub", "o/n")):
        assert constants.HF_HUB_ETAG_TIMEOUT == 33


def test_a_failure_that_is_not_a_download_is_left_as_it_is():
    with pytest.raises(ModelLoadError, match="^wrong kind of model$"):
        with hub_access(ModelReference("hub", "o/n")):
            raise ModelLoadError("wrong kind of model")
