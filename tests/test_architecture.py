"""The layout keeps its promises: no import cycles, the library never imports a command, and an
installed wheel works from any directory (templates and class lists ship inside the package)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sysconfig
from pathlib import Path

import pytest

from cnclip.commands import COMMANDS

from conftest import REPO, make_tiny_model, wheel_in_new_venv
from doc_pages import doc_section

PACKAGES = ("cnclip", "data_tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at any depth of its code (lazy imports in functions count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` -> the deepest project module named
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def is_command(name: str) -> bool:
    """Command modules: cnclip.commands.*, the `python -m` entry modules, and data_tools' command line."""
    return (name == "cnclip.commands" or name.startswith("cnclip.commands.") or name == "cnclip.__main__"
            or name.removeprefix("cnclip.") in COMMANDS or name in ("data_tools.cli", "data_tools.__main__"))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read_correctly():
    graph = import_graph()
    assert "cnclip.errors" in graph["cnclip.commands.base"]  # from ..errors import ...
    assert "cnclip.commands.base" in graph["cnclip.commands.finetune"]  # from .base import ...
    assert "cnclip.atomic" in graph["data_tools.files"]  # from cnclip.atomic import ...
    assert "cnclip.distributed" in graph["cnclip.trainer"]  # from . import distributed
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_no_library_module_imports_a_command():
    graph = import_graph()
    offenders = sorted(f"{lib} imports {cmd}" for lib, targets in graph.items() if not is_command(lib)
                       for cmd in targets if is_command(cmd))
    assert offenders == []


def test_every_subcommand_has_its_python_m_module():
    for name, (module, _) in COMMANDS.items():
        assert (REPO / "cnclip" / "commands" / f"{module}.py").is_file()
        entry = (REPO / "cnclip" / f"{name}.py").read_text(encoding="utf-8")
        assert f"from cnclip.commands.{module} import main" in entry


def test_the_module_map_in_readme_names_every_module():
    layout = doc_section("docs/layout.md", "Layout")  # the module map README links to
    missing = [str(p.relative_to(REPO)) for name, p in all_modules().items()
               if p.name != "__init__.py" or name == "cnclip.commands"
               if f"`{p.relative_to(REPO)}`" not in layout]
    assert missing == []


# ---------------------------------------------------------------- the installed wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of this checkout installed into a new virtual environment; returns its python.

    The dependencies (torch, transformers, ...) are taken from the environment running the tests
    through a .pth line, so the check costs seconds; the new environment's site-packages holds only
    the wheel, and the checkout is never on its path.
    """
    return wheel_in_new_venv(tmp_path_factory.mktemp("wheel"), Path(sysconfig.get_paths()["purelib"]))


def run_installed(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_wheel_works_from_any_directory(installed, tmp_path):
    bin_dir = installed.parent
    where = run_installed(installed, [str(installed), "-c", "import cnclip, json; print(json.dumps(cnclip.__file__))"],
                          tmp_path)
    assert where.returncode == 0, where.stderr
    assert not json.loads(where.stdout).startswith(str(REPO))  # the wheel, not the checkout

    top = run_installed(installed, [str(bin_dir / "cnclip"), "--help"], tmp_path)
    assert top.returncode == 0, top.stderr
    for name in COMMANDS:
        assert f"  {name} " in top.stdout

    help_ = run_installed(installed, [str(installed), "-m", "cnclip.finetune", "--help"], tmp_path)
    assert help_.returncode == 0 and "recipe" in help_.stdout, help_.stderr

    data_help = run_installed(installed, [str(bin_dir / "data_tools"), "build-pairs", "--help"], tmp_path)
    assert data_help.returncode == 0 and "exit status:" in data_help.stdout, data_help.stderr


def test_installed_wheel_runs_zero_shot_with_the_shipped_templates(installed, tmp_path):
    from PIL import Image

    model_dir = make_tiny_model(tmp_path / "tiny")
    classes = tmp_path / "classes.txt"
    classes.write_text("red: 红色\nblue: 蓝色\n", encoding="utf-8")
    for key, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "images" / key).mkdir(parents=True)
        Image.new("RGB", (32, 32), rgb).save(tmp_path / "images" / key / "0.png")
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = run_installed(installed, [str(installed.parent / "cnclip"), "zeroshot", "--model", str(model_dir),
                                     "--classes", str(classes), "--images", str(tmp_path / "images"),
                                     "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                                     "--workers", "0", "--device", "cpu"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "zeroshot.json").read_text(encoding="utf-8"))
    assert len(report["templates"]) == 23 and report["templates"][0] == "一张{}的照片"  # the shipped default
    assert report["results"]["model"]["num_images"] == 2
