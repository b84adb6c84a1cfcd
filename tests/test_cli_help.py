"""`--help` of every command: its exit statuses, a help text for every argument, defaults, and no torch import."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from cnclip.commands import COMMANDS
from cnclip.commands.base import ALWAYS_EXITS, exit_statuses
from cnclip.errors import EXIT_DATA, EXIT_MEANINGS, EXIT_MODEL, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent


def command_parsers() -> dict[str, tuple[argparse.ArgumentParser, tuple[int, ...]]]:
    """prog -> (parser, the exit statuses it declares), for every command and subcommand."""
    import data_tools.cli

    out = {}
    for name, (module_name, _) in COMMANDS.items():
        module = importlib.import_module(f"cnclip.commands.{module_name}")
        out[f"cnclip {name}"] = (module.build_parser(), module.EXITS)
    search = importlib.import_module("cnclip.commands.search")
    tools = data_tools.cli.build_parser()
    subparsers = {**_subparsers(out["cnclip search"][0]), **_subparsers(tools)}
    out["cnclip search index"] = (subparsers["index"], search.INDEX_EXITS)
    for action in ("query", "image"):
        out[f"cnclip search {action}"] = (subparsers[action], search.QUERY_EXITS)
    out["data_tools build-pairs"] = (subparsers["build-pairs"], data_tools.cli.BUILD_PAIRS_EXITS)
    out["data_tools from-hf"] = (subparsers["from-hf"], data_tools.cli.FROM_HF_EXITS)
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


PARSERS = command_parsers()


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_help_lists_every_exit_status_the_command_declares(prog):
    parser, declared = PARSERS[prog]
    text = " ".join(parser.format_help().split())  # wrapping aside
    assert "exit status:" in text
    for status in exit_statuses(declared):
        assert f"{status} {EXIT_MEANINGS[status]}" in text, (prog, status)
    for status in set(EXIT_MEANINGS) - set(exit_statuses(declared)):
        assert f" {status} {EXIT_MEANINGS[status]}" not in text, (prog, status)


def test_the_commands_that_read_data_and_models_declare_it():
    for prog in ("cnclip finetune", "cnclip evaluate", "cnclip zeroshot", "cnclip probe", "cnclip search index"):
        assert {EXIT_DATA, EXIT_MODEL} <= set(exit_statuses(PARSERS[prog][1])), prog
    for prog in PARSERS:  # argparse's own errors and a bad path are 2 everywhere (convert used to omit it)
        assert set(ALWAYS_EXITS) <= set(exit_statuses(PARSERS[prog][1])) and EXIT_USAGE in ALWAYS_EXITS


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_argument_has_a_help_text(prog):
    parser, _ = PARSERS[prog]
    missing = [action.dest for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
               and not (action.help or "").strip()]
    assert missing == []


def test_serve_and_search_show_their_defaults():
    assert "--port PORT port to listen on (default: 7860)" in " ".join(PARSERS["cnclip serve"][0].format_help().split())
    index_help = " ".join(PARSERS["cnclip search index"][0].format_help().split())
    assert "images per model batch (default: 64)" in index_help and "(default: None)" not in index_help


def test_values_written_out_for_help_match_the_library():
    """The constants the parsers show without importing torch are the library's own."""
    from cnclip import classifier, exporter, linear_probe, original_format, search_app, search_index
    from cnclip.commands import export, probe, search, serve, zeroshot
    from cnclip.recipe import ORIGINAL_ARCHS

    assert export.FORMATS == exporter.FORMATS
    assert zeroshot.TOP_K == classifier.TOP_K
    assert (probe.HELD_OUT, probe.MAX_ITER) == (linear_probe.HELD_OUT, linear_probe.MAX_ITER)
    assert (search.APPROXIMATE_FROM, search.KINDS) == (search_index.APPROXIMATE_FROM, search_index.KINDS)
    assert serve.DEFAULT_MAX_UPLOAD_MB == search_app.DEFAULT_MAX_UPLOAD_MB
    assert ORIGINAL_ARCHS == tuple(original_format.ARCHS)
    import data_tools.cli
    import data_tools.download
    import data_tools.engines

    assert data_tools.cli.ENGINES == data_tools.engines.ENGINES
    assert data_tools.download.DEFAULT_USER_AGENT.startswith("cnclip-data_tools/")
    assert data_tools.download.DEFAULT_USER_AGENT.endswith("; honours X-Robots-Tag noai)")


HELP_WITHOUT_TORCH = """
import contextlib, io, json, sys
from cnclip.commands import COMMANDS, main
from data_tools.cli import main as data_tools_main

runs = [[name, "--help"] for name in COMMANDS] + [["search", action, "--help"] for action in ("index", "query", "image")]
for argv in runs:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main(argv)
for argv in (["build-pairs", "--help"], ["from-hf", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        data_tools_main(argv)
print(json.dumps(sorted(m for m in ("torch", "transformers", "peft", "faiss", "pyarrow", "httpx", "sklearn") if m in sys.modules)))
"""


def test_help_does_not_import_torch_or_transformers():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_python_m_entry_modules_answer_help_without_torch(name):
    code = (f"import runpy, sys\nsys.argv = ['cnclip.{name}', '--help']\n"
            f"try:\n    runpy.run_module('cnclip.{name}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "exit status:" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "False False"


def test_attaching_lora_hides_only_the_gradient_checkpointing_warning(tmp_path, monkeypatch):
    from conftest import make_tiny_model

    from cnclip.models import attach_lora, load_clip
    from cnclip.recipe import ModelConfig

    clip = load_clip(str(make_tiny_model(tmp_path / "m")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        attach_lora(clip, ModelConfig())
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]

    import peft

    def noisy(model, config):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("some other future change", FutureWarning)
        return model

    monkeypatch.setattr(peft, "get_peft_model", noisy)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        attach_lora(load_clip(str(tmp_path / "m")), ModelConfig())
    assert [str(w.message) for w in seen if w.category is FutureWarning] == ["some other future change"]
