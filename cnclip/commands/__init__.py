"""The commands: argument parsing, printing and exit status. Nothing in the library imports them.

`cnclip SUBCOMMAND ...` (the console script) dispatches to `cnclip.commands.<module>.main`;
`python -m cnclip.<subcommand>` runs the same `main` through a three-line module beside the library.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module under cnclip.commands, one line for `cnclip --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "finetune": ("finetune", "fine-tune a Chinese CLIP from a YAML recipe (LoRA text tower, cached image tower)"),
    "evaluate": ("evaluate", "retrieval Recall@1/5/10 and mean recall of a run or a model"),
    "zeroshot": ("zeroshot", "zero-shot classification with Chinese prompt templates"),
    "probe": ("probe", "linear probe and few-shot curves on frozen image embeddings, beside zero-shot"),
    "export": ("export", "merge a run's LoRA and write a model plain transformers loads; optionally upload it"),
    "publish": ("publish", "upload an exported model directory to ModelScope"),
    "convert": ("convert", "convert an original Chinese-CLIP checkpoint (cn_clip .pt, ModelScope layout) to transformers"),
    "search": ("search", "build a text/image search index over your images, and query it"),
    "serve": ("serve", "a web page to search an index with Chinese text or an image (loopback by default)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cnclip SUBCOMMAND [ARGS ...]   (cnclip SUBCOMMAND --help for its options)", "",
             "Adapt Chinese CLIP models to a domain.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "Data preparation is the separate `data_tools` command (data_tools --help)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"cnclip {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"cnclip: unknown subcommand {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    return module.main(argv[1:])
