"""Upload an exported model directory to ModelScope.

`publish(folder, owner/name)` is what `cnclip publish` and `cnclip export --upload` run. Run it
again after a failed upload: files already committed are skipped.

The token comes from MODELSCOPE_API_TOKEN or the ModelScope SDK's saved login; it is handed to the
SDK and never printed, logged or written by this module. The SDK (modelscope-hub, shipped with
modelscope >= 1.40) is imported only when something is really uploaded.

Order of calls, and why:
1. whoami: tells a rejected token apart from every later failure, without saving credentials.
2. create_repo with the visibility asked for: the SDK's upload_folder would otherwise create a
   missing repository as public.
3. when the name is taken: the repository must be empty or hold this same model (see
   `compare_remote`), and must not be public when --private was asked for.
4. upload_folder (resumable; it keeps its state in OUT_DIR/.ms_upload_cache), then list the
   remote files again to check that every file arrived with the right size and hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from .errors import (HubUnreachable, NoToken, PublishError, RepoConflict, TokenRejected,
                     UsageError)

log = logging.getLogger(__name__)

TOKEN_ENV = "MODELSCOPE_API_TOKEN"
TOKEN_PAGE = "https://modelscope.cn/my/myaccesstoken"
# Files the SDK keeps inside the uploaded folder for resuming, and folders it never uploads.
SDK_STATE_FILES = frozenset({".ms_upload_cache", ".ms_upload_progress"})
SDK_IGNORED_DIRS = frozenset({".git", ".cache"})
# Remote files that do not make a repository "hold a different model": git bookkeeping, and the
# card and configuration, which ModelScope may put in a new repository and which we replace.
REMOTE_IGNORED = frozenset({".gitattributes"})
REPLACEABLE = frozenset({"README.md", "configuration.json"})
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_repo_id(repo_id: str, argument: str = "repo_id") -> str:
    """`repo_id` itself, or a UsageError naming `argument`: the option or argument the user gave it as."""
    if not REPO_ID.match(repo_id or ""):
        raise UsageError(f"{argument} '{repo_id}': expected owner/name (letters, digits, '-', '_', '.'), "
                         "e.g. alice/chinese-clip-muge")
    return repo_id


@dataclass(frozen=True)
class LocalFile:
    path: str  # relative, '/'-separated: the path in the repository
    size: int
    source: Path

    def sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.source, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()


def folder_files(folder: str | Path) -> list[LocalFile]:
    """Files an upload of `folder` sends, in repository order (the SDK's resume state left out)."""
    folder = Path(folder)
    files = []
    for p in sorted(folder.rglob("*")):
        rel = PurePosixPath(p.relative_to(folder).as_posix())
        if not p.is_file() or rel.name in SDK_STATE_FILES or SDK_IGNORED_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append(LocalFile(str(rel), p.stat().st_size, p))
    return files


def format_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def file_table(files: list[LocalFile]) -> str:
    return "\n".join(f"  {format_size(f.size):>10}  {f.path}" for f in files)


def compare_remote(local: dict[str, tuple[int, str]], remote: list) -> list[str]:
    """Why a repository that already exists does not hold this model; empty when it does (or is empty).

    Every remote file other than .gitattributes, README.md and configuration.json must be one of
    ours with the same size and SHA-256 (the size alone when the listing gives no hash). A repository
    holding a subset of our files is an earlier, interrupted upload of this model: not a conflict.
    """
    problems = []
    for item in remote:
        path = item.path
        if item.type == "tree" or path in REMOTE_IGNORED or path in REPLACEABLE:
            continue
        if path not in local:
            problems.append(f"{path} (only on ModelScope)")
            continue
        size, sha = local[path]
        if item.size != size or (item.sha256 and item.sha256 != sha):
            problems.append(f"{path} (different content)")
    return problems


def _up_to_date(local: dict[str, tuple[int, str]], remote: list) -> bool:
    have = {f.path: (f.size, f.sha256) for f in remote if f.type != "tree" and f.path not in REMOTE_IGNORED}
    return set(have) == set(local) and all(
        have[p][0] == size and (not have[p][1] or have[p][1] == sha) for p, (size, sha) in local.items())


def _token_config():
    """The SDK's configuration with a token resolved as the SDK does (env var, then saved login)."""
    try:
        from modelscope_hub.config import HubConfig
    except ImportError as exc:
        raise PublishError("uploading needs the ModelScope SDK with modelscope-hub: pip install -U 'modelscope>=1.40'") from exc
    config = HubConfig()
    if not (config.token or "").strip():
        raise NoToken(
            f"no ModelScope token: set {TOKEN_ENV} (create a token at {TOKEN_PAGE}) "
            "or log in once with `modelscope login --token ...`")
    source = f"${TOKEN_ENV}" if os.environ.get(TOKEN_ENV, "").strip() else "the saved ModelScope login"
    return config, source


def _token_status() -> str:
    """Whether a real upload would find a token (never the token itself), for --dry-run."""
    try:
        _, source = _token_config()
    except PublishError as exc:
        return f"a real upload would stop here: {exc}"
    return f"a real upload would use the token from {source}"


def _hub_failure(exc: Exception, what: str, source: str, endpoint: str) -> PublishError:
    """One clear line per kind of failure; the SDK's message is kept, the token never appears in it."""
    from modelscope_hub.errors import (AuthenticationError, HubError, NetworkError, PermissionDeniedError,
                                       StorageError)

    detail = getattr(exc, "message", None) or str(exc).splitlines()[0]
    if isinstance(exc, AuthenticationError):
        return TokenRejected(f"ModelScope rejected the token from {source} ({detail}); check it at {TOKEN_PAGE}")
    if isinstance(exc, PermissionDeniedError):
        return TokenRejected(f"the token from {source} is not allowed to do this while {what} ({detail}); "
                            "it needs write permission for that owner")
    if isinstance(exc, (NetworkError, ConnectionError, TimeoutError)):
        errno = re.search(r"\[Errno -?\d+\][^\"')]*", detail)  # "[Errno 111] Connection refused", not the urllib3 chain
        detail = errno.group(0).strip() if errno else detail[:300]
        return HubUnreachable(f"could not reach ModelScope at {endpoint} while {what}: {detail}. "
                            "Check the network (and MODELSCOPE_ENDPOINT), then run the command again")
    if isinstance(exc, StorageError):
        return PublishError(f"upload failed while {what}: {detail}. Run the same command again to resume; "
                            "files already committed are skipped")
    if isinstance(exc, HubError):
        return PublishError(f"ModelScope refused the request while {what}: {detail}")
    raise exc


def _is_public(info) -> bool | None:
    vis = getattr(info, "visibility", None)
    try:
        return int(vis) == 5  # Visibility.PUBLIC on the wire
    except (TypeError, ValueError):
        return None


def publish(folder: str | Path, repo_id: str, *, private: bool = False, overwrite: bool = False,
            dry_run: bool = False, echo: Callable[[str], None] = print, repo_argument: str = "repo_id") -> dict:
    """Upload `folder` to the ModelScope model repository `repo_id`; returns a JSON-able report.
    `repo_argument` is how the caller's user gave `repo_id` (`--upload`), for the error message."""
    folder = Path(folder)
    check_repo_id(repo_id, repo_argument)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a directory")
    files = folder_files(folder)
    if not (folder / "configuration.json").is_file():
        raise UsageError(f"{folder} has no configuration.json: is it a directory written by cnclip.export?")
    total = sum(f.size for f in files)
    visibility = "private" if private else "public"
    report = {"repo_id": repo_id, "visibility": visibility, "folder": str(folder),
              "files": [{"path": f.path, "size": f.size} for f in files], "total_bytes": total}
    if dry_run:
        echo(f"dry run: would upload {len(files)} files ({format_size(total)}) from {folder} "
             f"to ModelScope model {repo_id} ({visibility}):\n{file_table(files)}")
        echo(f"dry run: nothing was sent; {_token_status()}")
        return {**report, "dry_run": True, "uploaded": False}

    config, source = _token_config()
    from modelscope_hub import HubApi
    from modelscope_hub.errors import AlreadyExistsError, HubError

    logging.getLogger("modelscope_hub").setLevel(logging.WARNING)  # its INFO chatter drowns our output
    api = HubApi(config=config)
    endpoint = config.endpoint
    step = "checking the token"
    try:
        api.whoami()
        step = f"creating {repo_id}"
        try:
            api.create_repo(repo_id, "model", visibility=visibility)
            created = True
            echo(f"created {visibility} model repository {repo_id}")
        except AlreadyExistsError:
            created = False
        local = {f.path: (f.size, f.sha256()) for f in files}  # what "the same model" means, file by file
        if not created:
            step = f"reading the existing repository {repo_id}"
            remote_public = _is_public(api.get_repo(repo_id, "model"))
            if private and remote_public:
                raise RepoConflict(f"{repo_id} already exists and is public, but --private was asked for: "
                                   "nothing was uploaded; make it private on ModelScope first, or pick another "
                                   "name")
            remote = api.list_repo_files(repo_id, "model")
            problems = compare_remote(local, remote)
            if problems and not overwrite:
                shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                raise RepoConflict(f"{repo_id} already exists with different contents: {shown}. Nothing was "
                                   "uploaded; pick another name, or pass --overwrite to replace its files")
            if not problems and _up_to_date(local, remote):
                echo(f"{repo_id} already holds these {len(files)} files: nothing to upload")
                return {**report, "created": False, "uploaded": False, "verified_files": len(files)}
            echo(f"{repo_id} exists{' (private)' if remote_public is False else ''}; "
                 f"{'replacing its files' if problems else 'uploading into it'}")
        step = f"uploading {len(files)} files to {repo_id}"
        echo(f"uploading {len(files)} files ({format_size(total)}) to {repo_id} ...")
        api.upload_folder(repo_id, "model", folder, commit_message="Upload model exported by cnclip",
                          disable_tqdm=not sys.stderr.isatty())
        step = f"checking the uploaded files of {repo_id}"
        remote = {f.path: f for f in api.list_repo_files(repo_id, "model")}
    except HubError as exc:
        raise _hub_failure(exc, step, source, endpoint) from None
    missing = [p for p, (size, sha) in local.items()
               if p not in remote or remote[p].size != size or (remote[p].sha256 and remote[p].sha256 != sha)]
    if missing:
        raise PublishError(f"upload finished but ModelScope does not list these files as sent: "
                           f"{', '.join(missing[:5])}; run the same command again")
    echo(f"published {len(files)} files to {endpoint}/models/{repo_id} ({visibility if created else 'existing'} "
         "repository); all sizes and hashes match")
    return {**report, "created": created, "uploaded": True, "verified_files": len(files),
            "url": f"{endpoint}/models/{repo_id}"}
