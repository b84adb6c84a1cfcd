"""The dependency floors in pyproject.toml admit no release that lacks what the code calls."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def declared_floor(name: str) -> Version:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (spec,) = [d for d in dependencies if re.match(rf"{re.escape(name)}\b", d)]
    return Version(re.search(r">=\s*([\w.]+)", spec).group(1))


def test_numpy_floor_has_every_numpy_2_function_the_code_calls():
    sources = "".join(p.read_text(encoding="utf-8") for folder in ("cnclip", "data_tools") for p in (ROOT / folder).rglob("*.py"))
    numpy_2_only = [name for name in ("bitwise_count", "unstack", "matrix_transpose", "vecdot") if f"np.{name}(" in sources]
    assert numpy_2_only, "the code no longer needs numpy 2: this test (and the floor) can go back"
    assert declared_floor("numpy") >= Version("2.0"), numpy_2_only
    # Binary packages built against numpy 1 do not import beside numpy 2: their floors are their first numpy-2 builds.
    assert declared_floor("faiss-cpu") >= Version("1.9") and declared_floor("pyarrow") >= Version("16.0")
    assert declared_floor("matplotlib") >= Version("3.9")
