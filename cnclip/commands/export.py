"""`cnclip export RUN_DIR --to OUT_DIR [--upload owner/name]` (also `python -m cnclip.export`).

Merges the run's LoRA and writes a model directory (`cnclip.exporter`), then optionally publishes it
(`cnclip.modelscope_upload`); `--format onnx [--quantize int8 | --fp16]` writes ONNX encoders instead
(`cnclip.onnx_export`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import EXIT_DATA, EXIT_DISK_FULL, EXIT_MODEL, PublishError, UsageError
from ..modelscope_upload import check_repo_id, file_table, folder_files, format_size, publish
from .base import parser_options, run_command
from .publish import UPLOAD_EXITS, add_upload_flags, print_json

EXITS = tuple(sorted({*UPLOAD_EXITS, EXIT_DISK_FULL, EXIT_DATA, EXIT_MODEL}))
# cnclip.exporter.FORMATS, written out so that --help does not import torch (tests/test_cli_help.py compares them).
FORMATS = ("transformers", "modelscope", "cn_clip")
ONNX = "onnx"  # cnclip.onnx_export: encoders for onnxruntime rather than a weights layout


def _export_and_publish(args) -> dict:
    from ..exporter import export_run

    if args.upload:
        check_repo_id(args.upload, "--upload")
    elif args.private or args.overwrite:
        raise UsageError("--private and --overwrite go with --upload owner/name")
    precision = onnx_precision(args)
    if args.format == ONNX and args.upload:
        raise UsageError("--upload goes with the transformers, modelscope and cn_clip formats, which ModelScope's "
                         "loaders read; an ONNX export is not published")
    if args.alpha is not None and args.format == ONNX:
        raise UsageError("--alpha goes with the transformers, modelscope and cn_clip formats; --format onnx "
                         "exports the alpha the run picked")
    if args.format == ONNX:
        from ..exporter import check_run_dir_to_export, open_clip_image_of
        from ..onnx_export import export_onnx

        check_run_dir_to_export(Path(args.run_dir))
        open_clip_image_of(Path(args.run_dir), ONNX)  # an open_clip tower has no ONNX layout: refused by name

        report = export_onnx(args.run_dir, args.to, precision=precision)
    else:
        report = export_run(args.run_dir, args.to, repo_id=args.upload, dataset=args.dataset, license=args.license,
                            format=args.format, alpha=args.alpha)
    files = folder_files(args.to)
    print(f"exported {args.run_dir} -> {args.to} ({len(files)} files, {format_size(report['total_bytes'])}); "
          f"merged vs trained embeddings: max abs diff {report['merge_max_abs_diff']:.1e}")
    if args.format == ONNX:
        d = report["onnx_max_abs_diff"]
        print(f"{precision} ONNX vs PyTorch embeddings: max abs diff text {d['text']:.1e}, image {d['image']:.1e}")
    if not args.upload:
        print(file_table(files))
        if args.dry_run:
            print("dry run: no --upload given, nothing would be sent")
        return {"export": report}
    try:
        published = publish(args.to, args.upload, private=args.private, overwrite=args.overwrite,
                            dry_run=args.dry_run, repo_argument="--upload")
    except PublishError as exc:
        retry = f"cnclip publish {args.to} {args.upload}" + (" --private" if args.private else "")
        raise type(exc)(f"{exc}\nthe export in {args.to} is complete; retry only the upload with: {retry}") from None
    return {"export": report, "publish": published}


def onnx_precision(args) -> str:
    """fp32, or what --quantize int8 / --fp16 ask for (ONNX only)."""
    if args.quantize and args.fp16:
        raise UsageError("--quantize int8 and --fp16 are two precisions; choose one")
    precision = args.quantize or ("fp16" if args.fp16 else "fp32")
    if precision != "fp32" and args.format != ONNX:
        raise UsageError(f"--quantize and --fp16 go with --format onnx (got --format {args.format})")
    return precision


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnclip export", **parser_options(
        "Merge a fine-tuned run's LoRA into its base model and write a directory that plain transformers loads "
        "(plus the bare adapter, configuration.json and a model card); optionally publish it to ModelScope.",
        EXITS))
    parser.add_argument("run_dir", help="run directory written by python -m cnclip.finetune (its best checkpoint "
                                        "is exported)")
    parser.add_argument("--to", required=True, metavar="OUT_DIR", help="directory to write (new, empty, or an "
                                                                       "earlier export, which is replaced)")
    parser.add_argument("--format", choices=(*FORMATS, ONNX), default="transformers",
                        help="weights layout: transformers (default; ChineseCLIPModel.from_pretrained), modelscope "
                             "(the original layout ModelScope's pipeline(Tasks.multi_modal_embedding) loads), "
                             "cn_clip (a .pt for cn_clip's load_from_name), onnx (image_encoder.onnx and "
                             "text_encoder.onnx with normalised embeddings, tokenizer, preprocessing and a card; "
                             "needs pip install \"cnclip[onnx]\")")
    parser.add_argument("--alpha", type=float, metavar="A",
                        help="WiSE-FT: export the model at A between the base (0) and the fine-tuned weights (1) "
                             "instead of the alpha the run picked (runs with train.wise; any run otherwise)")
    parser.add_argument("--quantize", choices=("int8",), help="with --format onnx: int8 weights for MatMul/Gemm "
                                                              "(onnxruntime dynamic quantization)")
    parser.add_argument("--fp16", action="store_true", help="with --format onnx: fp16 weights and compute "
                                                             "(inputs and outputs stay float32)")
    parser.add_argument("--upload", metavar="OWNER/NAME", help="then publish OUT_DIR to this ModelScope model "
                                                              "repository (token: $MODELSCOPE_API_TOKEN or the "
                                                              "SDK's saved login)")
    add_upload_flags(parser)
    parser.add_argument("--dataset", help="data set name or ModelScope id for the card (default: the name of "
                                          "the run's data.root directory)")
    parser.add_argument("--license", default="apache-2.0", help="license for the card; it must agree with the "
                                                               "base model's (default: apache-2.0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: print_json(_export_and_publish(args)))

