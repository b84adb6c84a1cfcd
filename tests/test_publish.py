"""`python -m cnclip.publish` against a stand-in ModelScope API on 127.0.0.1 (tests/fake_modelscope.py).

Each case runs the real command in a subprocess with its own MODELSCOPE_ENDPOINT, MODELSCOPE_HOME and
HOME, checks the exit code and message, the requests that reached the hub, and that the token shows up
in no output and no file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_modelscope import PRIVATE, PUBLIC, FakeModelScope

from cnclip.errors import (EXIT_HUB_FAILED, EXIT_HUB_UNREACHABLE, EXIT_NO_TOKEN, EXIT_REPO_CONFLICT,
                           EXIT_TOKEN_REJECTED)
from cnclip.modelscope_upload import compare_remote, folder_files

TOKEN = "ms-test-token-5f2c9a0e7d"
REPO = "alice/cnclip-test"


def make_model_folder(folder: Path) -> dict[str, bytes]:
    """The shape of an export (inline JSON/markdown, LFS safetensors, a subfolder); contents are stand-ins."""
    files = {
        "README.md": "---\ntasks:\n- multi-modal-embedding\n---\n# 模型\n".encode(),
        "configuration.json": json.dumps({"framework": "pytorch", "task": "multi-modal-embedding"}).encode(),
        "config.json": b'{"model_type": "chinese_clip"}',
        "model.safetensors": os.urandom(150_000),
        "adapter/adapter_model.safetensors": os.urandom(20_000),
        "adapter/adapter_config.json": b'{"peft_type": "LORA"}',
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


@pytest.fixture()
def folder(tmp_path) -> Path:
    out = tmp_path / "out"
    make_model_folder(out)
    return out


def run_publish(tmp_path: Path, endpoint: str, *args: str, token: str | None = TOKEN,
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MODELSCOPE") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(MODELSCOPE_ENDPOINT=endpoint, MODELSCOPE_HOME=str(tmp_path / "ms_home"),
               MODELSCOPE_CACHE=str(tmp_path / "ms_cache"), HOME=str(tmp_path / "home"),
               MODELSCOPE_API_MAX_RETRIES="1", NO_PROXY="127.0.0.1,localhost")
    if token is not None:
        env["MODELSCOPE_API_TOKEN"] = token
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "cnclip.publish", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def assert_token_nowhere(proc: subprocess.CompletedProcess, root: Path, skip: Path | None = None) -> None:
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    written = [p for p in root.rglob("*") if p.is_file() and (skip is None or skip not in p.parents)]
    assert written, "expected files under the test directory"
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


def remote_bytes(hub: FakeModelScope, repo_id: str) -> dict[str, bytes]:
    return dict(hub.repos[repo_id].files)


def test_private_upload_creates_private_repo_and_sends_every_file(tmp_path, folder):
    local = {f.path: f.source.read_bytes() for f in folder_files(folder)}
    with FakeModelScope(TOKEN) as hub:
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, "--private")
        assert proc.returncode == 0, proc.stderr
        # token check, then create with the visibility asked for
        assert hub.requests[0].method == "GET" and hub.requests[0].path == "/openapi/v1/users/me"
        creates = hub.calls("POST", "/api/v1/models")
        assert creates[0].json == {"Path": "alice", "Name": "cnclip-test", "Visibility": PRIVATE,
                                   "License": "Apache-2.0"}
        # the SDK's upload_folder asks to create the repo again as public: the hub refuses (it exists)
        assert all(c.json["Visibility"] == PUBLIC for c in creates[1:])
        assert hub.repos[REPO].visibility == PRIVATE
        # LFS: one batch naming both safetensors blobs, one PUT each with exactly their bytes
        (batch,) = hub.calls("POST", f"/api/v1/repos/models/{REPO}/info/lfs/objects/batch")
        lfs = {hashlib.sha256(local[p]).hexdigest() for p in local if p.endswith(".safetensors")}
        assert {o["oid"] for o in batch.json["objects"]} == lfs
        puts = hub.calls("PUT", r"/lfs-upload/[0-9a-f]{64}")
        assert {p.path.rsplit("/", 1)[1] for p in puts} == lfs
        (commit,) = hub.calls("POST", f"/api/v1/repos/models/{REPO}/commit/master")
        assert sorted(a["path"] for a in commit.json["actions"]) == sorted(local)
        assert all(r.authorized for r in hub.requests)
        assert remote_bytes(hub, REPO) == local
    assert (folder / ".ms_upload_cache").exists() and ".ms_upload_cache" not in local
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["uploaded"] and report["created"] and report["visibility"] == "private"
    assert report["verified_files"] == len(local)
    assert_token_nowhere(proc, tmp_path)


def test_public_by_default_and_rerun_is_a_no_op(tmp_path, folder):
    with FakeModelScope(TOKEN) as hub:
        assert run_publish(tmp_path, hub.endpoint, str(folder), REPO).returncode == 0
        assert hub.calls("POST", "/api/v1/models")[0].json["Visibility"] == PUBLIC
        commits = len(hub.calls("POST", r"/api/v1/repos/models/.*/commit/master"))
        again = run_publish(tmp_path, hub.endpoint, str(folder), REPO)
        assert again.returncode == 0, again.stderr
        assert "nothing to upload" in again.stdout
        assert len(hub.calls("POST", r"/api/v1/repos/models/.*/commit/master")) == commits


def test_missing_token_exits_8_before_any_request(tmp_path, folder):
    with FakeModelScope(TOKEN) as hub:
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, token=None)
        assert proc.returncode == EXIT_NO_TOKEN
        assert "no ModelScope token" in proc.stderr and "MODELSCOPE_API_TOKEN" in proc.stderr
        assert hub.requests == []


def test_rejected_token_exits_9_and_creates_nothing(tmp_path, folder):
    bad = "ms-wrong-token-000"
    with FakeModelScope(TOKEN) as hub:
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, token=bad)
        assert proc.returncode == EXIT_TOKEN_REJECTED, proc.stderr
        assert "rejected the token" in proc.stderr and bad not in proc.stderr + proc.stdout
        assert [(r.method, r.path) for r in hub.requests] == [("GET", "/openapi/v1/users/me")]
        assert hub.repos == {}


def test_connection_refused_exits_10(tmp_path, folder):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_publish(tmp_path, f"http://127.0.0.1:{port}", str(folder), REPO)
    assert proc.returncode == EXIT_HUB_UNREACHABLE
    assert "could not reach ModelScope" in proc.stderr and "Connection refused" in proc.stderr
    assert_token_nowhere(proc, tmp_path)


def test_existing_repo_with_other_model_exits_11_unless_overwrite(tmp_path, folder):
    theirs = {"model.safetensors": b"someone else's weights", "README.md": b"# theirs", ".gitattributes": b"*"}
    with FakeModelScope(TOKEN) as hub:
        hub.add_repo(REPO, theirs)
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO)
        assert proc.returncode == EXIT_REPO_CONFLICT
        assert "already exists with different contents" in proc.stderr and "model.safetensors" in proc.stderr
        assert "README.md" not in proc.stderr  # the card is ours to replace, not a conflict
        assert not hub.calls("PUT", ".*") and not hub.calls("POST", r".*/commit/.*")
        assert remote_bytes(hub, REPO) == theirs

        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, "--overwrite")
        assert proc.returncode == 0, proc.stderr
        assert hub.repos[REPO].files["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_hub_failure_mid_upload_exits_12_and_the_rerun_completes(tmp_path, folder):
    with FakeModelScope(TOKEN) as hub:
        hub.fail_commits = True
        no_retries = {"MODELSCOPE_UPLOAD_COMMIT_MAX_ATTEMPTS": "1", "MODELSCOPE_UPLOAD_FAILED_FILE_MAX_RETRY_ROUNDS": "0",
                      "MODELSCOPE_UPLOAD_RECOVERY_ENABLED": "0"}  # the SDK would otherwise back off for a minute
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, extra_env=no_retries)
        assert proc.returncode == EXIT_HUB_FAILED, proc.stderr
        assert "error: " in proc.stderr and "Traceback" not in proc.stderr
        assert remote_bytes(hub, REPO) == {}
        hub.fail_commits = False
        again = run_publish(tmp_path, hub.endpoint, str(folder), REPO)
        assert again.returncode == 0, again.stderr
        assert set(remote_bytes(hub, REPO)) == {str(p.relative_to(folder)) for p in folder.rglob("*")
                                                if p.is_file() and ".ms_upload" not in p.name}


def test_existing_repo_holding_part_of_this_model_is_resumed(tmp_path, folder):
    partial = {"model.safetensors": (folder / "model.safetensors").read_bytes(), "README.md": b"template"}
    with FakeModelScope(TOKEN) as hub:
        hub.add_repo(REPO, partial, visibility=PRIVATE)
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, "--private")
        assert proc.returncode == 0, proc.stderr
        assert remote_bytes(hub, REPO) == {f.path: f.source.read_bytes() for f in folder_files(folder)}
        assert hub.repos[REPO].visibility == PRIVATE


def test_private_asked_but_existing_repo_is_public_exits_11(tmp_path, folder):
    with FakeModelScope(TOKEN) as hub:
        hub.add_repo(REPO, {}, visibility=PUBLIC)
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, "--private")
        assert proc.returncode == EXIT_REPO_CONFLICT
        assert "is public" in proc.stderr
        assert not hub.calls("POST", r".*/commit/.*") and hub.repos[REPO].files == {}


def test_token_from_sdk_login(tmp_path, folder):
    from modelscope_hub.config import HubConfig

    home = tmp_path / "ms_home"
    HubConfig(config_dir=home, endpoint="http://127.0.0.1").save_token(TOKEN)  # what `modelscope login` leaves
    with FakeModelScope(TOKEN) as hub:
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, token=None)
        assert proc.returncode == 0, proc.stderr
        assert all(r.authorized for r in hub.requests) and REPO in hub.repos
    assert_token_nowhere(proc, tmp_path, skip=home / "credentials")


def test_dry_run_lists_files_and_sends_nothing(tmp_path, folder):
    with FakeModelScope(TOKEN) as hub:
        proc = run_publish(tmp_path, hub.endpoint, str(folder), REPO, "--private", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert hub.requests == []
    assert "would upload 6 files" in proc.stdout and "(private)" in proc.stdout
    assert "150.0 kB  model.safetensors" in proc.stdout
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["dry_run"] and {f["path"]: f["size"] for f in report["files"]}["model.safetensors"] == 150_000
    assert not (folder / ".ms_upload_cache").exists()


@pytest.mark.parametrize("args, message", [
    (["not-a-repo-id"], "expected owner/name"),
    (["alice/x y"], "expected owner/name"),
])
def test_bad_repo_id_is_a_usage_error(tmp_path, folder, args, message):
    proc = run_publish(tmp_path, "http://127.0.0.1:9", str(folder), *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_compare_remote_rules(folder):
    from modelscope_hub.types import FileInfo

    local = {f.path: (f.size, f.sha256()) for f in folder_files(folder)}
    size, sha = local["model.safetensors"]
    same = [FileInfo(path="model.safetensors", size=size, sha256=sha), FileInfo(path=".gitattributes", size=3),
            FileInfo(path="README.md", size=1, sha256="0" * 64), FileInfo(path="adapter", type="tree")]
    assert compare_remote(local, same) == []
    assert compare_remote(local, [FileInfo(path="model.safetensors", size=size, sha256="f" * 64)]) == [
        "model.safetensors (different content)"]
    assert compare_remote(local, [FileInfo(path="model.safetensors", size=size + 1)]) == [
        "model.safetensors (different content)"]
    assert compare_remote(local, [FileInfo(path="pytorch_model.bin", size=5)]) == [
        "pytorch_model.bin (only on ModelScope)"]
