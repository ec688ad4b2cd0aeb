"""The ``vpt`` command: ``vpt init``, ``vpt tiny``, ``vpt data``, ``vpt convert``, ``vpt export``, ``vpt infer``."""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .bases import BASES
from .branches import BRANCHES, get_branch
from .proposals import add_propose_parser
from .tiny import DEFAULT_BASE


def _encoder_config(branch_name: str, path: str):
    """A branch encoder's transformers config from a JSON file."""
    config_class = type(get_branch(branch_name).default_encoder_config())
    return config_class.from_dict(json.loads(Path(path).read_text()))


def _init(args) -> None:
    from .checkpoint import init_vpt_checkpoint

    branches = [name.strip() for name in args.branches.split(",") if name.strip()]
    encoder_configs, encoder_weights = {}, {}
    for name in _encoder_branches():
        if getattr(args, f"{name}_config"):
            encoder_configs[name] = _encoder_config(name, getattr(args, f"{name}_config"))
        if getattr(args, name):
            encoder_weights[name] = getattr(args, name)
    settings = dict(
        num_inner_forward_run=args.num_inner_forward_run,
        para_mask_id=args.para_mask_id,
        para_mask_ratio=args.para_mask_ratio,
        box_heads=args.box_heads,
        mask_decoder=args.mask_decoder,
        mask_decoder_size=args.mask_decoder_size,
        seed=args.seed,
    )
    if args.tiny:
        from .tiny import build_tiny_base, tiny_encoder_configs

        with tempfile.TemporaryDirectory() as base:
            build_tiny_base(base, seed=args.seed, base=args.tiny)
            out = init_vpt_checkpoint(
                base, args.output, branches, encoder_weights, {**tiny_encoder_configs(), **encoder_configs}, **settings
            )
    else:
        if not args.base:
            raise SystemExit("vpt init: give --base (a base model's hub id or directory) or --tiny")
        out = init_vpt_checkpoint(args.base, args.output, branches, encoder_weights, encoder_configs, **settings)
    print(f"VPT checkpoint with branches {branches} written to {out}")


def _encoder_branches() -> list[str]:
    """The branches with an encoder of their own: each gets ``vpt init --<name>`` and ``--<name>-config``."""
    return [name for name, branch in BRANCHES.items() if branch.has_encoder]


def _tiny(args) -> None:
    from .tiny import build_tiny_fixtures

    bases = sorted(BASES) if args.base == "all" else [name.strip() for name in args.base.split(",") if name.strip()]
    unknown = [name for name in bases if name not in BASES]
    if unknown:
        raise ValueError(f"--base: {unknown} are not supported bases; choose from {sorted(BASES)} or all")
    for what, path in build_tiny_fixtures(args.output, args.seed, tuple(bases)).items():
        print(f"tiny {what}: {path}")


def _data_convert(args) -> None:
    from .dataset_tools import convert_rows

    branches = [name.strip() for name in args.branches.split(",") if name.strip()]
    count = convert_rows(args.source, args.output, args.box_format, branches, args.media_dir, args.region_mode,
                         args.box_crop_margin, args.box_crop_grid)
    print(f"{count} VPT rows written to {args.output}")


def _data_validate(args) -> None:
    from .dataset import VPTDataError
    from .dataset_tools import (
        DatasetColumns,
        dataset_entry,
        default_media_dir,
        validate_file,
    )

    if (args.dataset is None) != (args.dataset_info is None):
        raise SystemExit("vpt data validate: give --dataset-info and --dataset together")
    if (args.file is None) == (args.dataset is None):
        raise SystemExit("vpt data validate: give a dataset FILE, or --dataset-info FILE --dataset NAME")
    if args.dataset:
        path, columns = dataset_entry(args.dataset_info, args.dataset)
        media_dir = args.media_dir or args.dataset_info.parent  # LLaMA-Factory's media_dir defaults to dataset_dir
    else:
        path, columns = args.file, DatasetColumns(box_units=args.box_units)
        media_dir = args.media_dir or default_media_dir(path)
    if not path.is_file():
        raise SystemExit(f"vpt data validate: {path}: no such file")
    print(f"{path}: image and mask paths resolve against {media_dir}")
    try:
        problems = validate_file(path, media_dir, columns)
    except (VPTDataError, json.JSONDecodeError) as error:
        raise SystemExit(f"vpt data validate: {path}: {error}") from error
    for problem in problems:
        print(f"{path}: {problem}")
    if problems:
        raise SystemExit(f"vpt data validate: {len(problems)} bad row(s) in {path}")
    print(f"{path}: no problems")


def _convert(args) -> None:
    from .convert import convert_published_checkpoint

    out = convert_published_checkpoint(
        args.src,
        args.dst,
        detection_config=_encoder_config("dino", args.detection_config) if args.detection_config else None,
        seg_config=_encoder_config("sam", args.seg_config) if args.seg_config else None,
        tokenizer=args.tokenizer,
    )
    print(f"converted {args.src} -> {out}")


def _export(args) -> None:
    from .export import export_checkpoint

    out = export_checkpoint(args.src, args.dst, base_model=args.base_model, hub_model_id=args.push_to_hub)
    print(f"Hub-ready VPT model written to {out}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))


def _infer(args) -> None:
    from .inference import answer_questions, draw_regions, load_vpt_model

    model, processor = load_vpt_model(args.model, device=args.device)
    boxes = [_normalised_box(text) for text in args.box] or None
    [answer] = answer_questions(model, processor, [(str(args.image), args.question, boxes)], max_new_tokens=args.max_new_tokens,
                                allow_perception=not args.no_perception, image_max_pixels=args.image_max_pixels)
    for number, perception in enumerate(answer.trace["rounds"]):
        boxes = f" boxes (pixels) {perception['pixel_boxes']}" if "pixel_boxes" in perception else ""
        print(f"perception {number}: {perception['kind']} {perception['tokens']}{boxes}")
    if answer.trace["problem"]:
        print(f"note: {answer.trace['problem']}")
    for number, box in enumerate(answer.trace.get("answer_boxes", [])):
        print(f"answer box {number}: {box} (normalised x0, y0, x1, y1)")
    if any("pixel_boxes" in p for p in answer.trace["rounds"]) or answer.trace.get("answer_boxes"):
        out = args.regions_image or args.image.with_name(f"{args.image.stem}_regions.png")
        draw_regions(answer.image, answer.trace).save(out)
        print(f"regions drawn on {out}")
    print(answer.text)


def _normalised_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(0 <= v <= 1 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        raise SystemExit(f"--box {text!r}: give x0,y0,x1,y1 normalised to [0, 1], with x0 < x1 and y0 < y1")
    return box


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vpt", description="Visual Perception Token tools")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="make a trainable VPT checkpoint from a base model")
    init.add_argument("--base", help="base model: hub id (e.g. Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct, "
                      "Qwen/Qwen3-VL-4B-Instruct) or directory; its model_type picks the VPT class")
    init.add_argument("--tiny", nargs="?", const=DEFAULT_BASE, choices=sorted(BASES), metavar="BASE",
                      help=f"build a tiny random base offline instead of --base (default {DEFAULT_BASE}; {', '.join(sorted(BASES))})")
    init.add_argument("--output", required=True, help="directory to write the checkpoint to")
    init.add_argument("--branches", default="dino,sam,clip", help=f"comma-separated: {', '.join(sorted(BRANCHES))}")
    for name in _encoder_branches():
        branch = get_branch(name)
        config_class = type(branch.default_encoder_config()).__name__
        init.add_argument(f"--{name}", help=branch.encoder_help)
        init.add_argument(f"--{name}-config", help=f"{config_class} JSON: the shape of a random encoder, or of a .pth checkpoint's")
    init.add_argument("--num-inner-forward-run", type=int, default=2, choices=(1, 2))
    init.add_argument("--para-mask-id", type=int, default=1, choices=(0, 1, 2))
    init.add_argument("--para-mask-ratio", type=float, default=0.5)
    init.add_argument("--box-heads", action="store_true",
                      help="add PerceptionGPT's <|perception_box|> token and its box heads (fresh)")
    init.add_argument("--mask-decoder", action="store_true",
                      help="with --box-heads: add PerceptionGPT's mask decoder (fresh)")
    init.add_argument("--mask-decoder-size", type=int, default=256, help="the mask decoder's width (default 256)")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=_init)

    tiny = commands.add_parser(
        "tiny", help="write tiny random bases and branch encoders (offline fixtures for demos and tests)"
    )
    folders = ", ".join(f"{branch.tiny_folder}/" for branch in BRANCHES.values() if branch.has_encoder)
    tiny.add_argument("--output", required=True, help=f"directory to write the bases (qwen2-vl/, ...) and encoders ({folders}) to")
    tiny.add_argument("--base", default=DEFAULT_BASE,
                      help=f"bases to write, comma-separated, or all ({', '.join(sorted(BASES))}; default {DEFAULT_BASE})")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny)

    data = commands.add_parser("data", help="make VPT training rows from your VQA rows; check dataset files")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_convert = data_commands.add_parser("convert", help="VQA rows with a box -> VPT training rows")
    data_convert.add_argument("source", type=Path, help="JSON list or JSONL of {image, question, answer, box}")
    data_convert.add_argument("--output", type=Path, required=True, help="released-format JSON to write")
    data_convert.add_argument("--box-format", choices=("pixels", "normalized"), default="pixels")
    data_convert.add_argument("--branches", default="dino,sam,clip", help="re-encoding rows to add, comma-separated ('' for none)")
    data_convert.add_argument("--media-dir", help="directory image paths are relative to (LLaMA-Factory's media_dir)")
    data_convert.add_argument("--region-mode", choices=("grid", "continuous"), default="grid",
                              help="continuous: the region is one <|perception_box|> with a `boxes` column (box_heads: true)")
    data_convert.add_argument("--box-crop-margin", type=float, default=0.0,
                              help="continuous regions: crop the box widened by this share of its size (the recipe's box_crop_margin)")
    data_convert.add_argument("--box-crop-grid", type=int, default=0,
                              help="continuous regions: snap the crop to this many pixels, the ViT's patch x merge size "
                                   "(the recipe's box_crop_grid; 0: off)")
    data_convert.set_defaults(run=_data_convert)
    data_validate = data_commands.add_parser(
        "validate", help="report every bad row of a released-format file, or of what a recipe's `dataset: NAME` reads")
    data_validate.add_argument("file", type=Path, nargs="?", help="a dataset file (messages, images, branch columns)")
    data_validate.add_argument("--dataset-info", type=Path,
                               help="a dataset_info.json: check its entry --dataset with that entry's columns and box_units")
    data_validate.add_argument("--dataset", help="the entry's key (what a recipe's `dataset:` names)")
    data_validate.add_argument("--media-dir", type=Path,
                               help="folder image paths are relative to (LLaMA-Factory's media_dir; default: the "
                                    "dataset_dir, i.e. the folder of the dataset_info.json at or above the file)")
    data_validate.add_argument("--box-units", choices=("normalized", "pixels"), default="normalized",
                               help="units of a FILE's `boxes` column (with --dataset, the entry's box_units)")
    data_validate.set_defaults(run=_data_validate)
    add_propose_parser(data_commands)

    convert = commands.add_parser("convert", help="convert a checkpoint saved by the published VPT code")
    convert.add_argument("src", help="published checkpoint directory (config.json, pytorch_model*.bin)")
    convert.add_argument("dst", help="directory to write the converted checkpoint to")
    convert.add_argument("--detection-config", help="Dinov2Config JSON (default: dinov2-large)")
    convert.add_argument("--seg-config", help="SamVisionConfig JSON (default: sam-vit-large)")
    convert.add_argument("--tokenizer", help="the tokenizer's folder or hub id, where src has no tokenizer files")
    convert.set_defaults(run=_convert)

    export = commands.add_parser(
        "export", help="write a VPT checkpoint as a Hub-ready folder that loads without vpt-plugin (trust_remote_code)"
    )
    export.add_argument("src", help="VPT checkpoint: directory (vpt init, vpt convert, a training output) or hub id")
    export.add_argument("dst", help="directory to write the Hub-ready folder to")
    export.add_argument("--base-model", help="Hub id the model derives from, for the model card (e.g. Qwen/Qwen2-VL-2B-Instruct)")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="also push the folder to this Hub repository")
    export.set_defaults(run=_export)

    infer = commands.add_parser("infer", help="answer one question about one image with a VPT model")
    infer.add_argument("question")
    infer.add_argument("--model", required=True, help="VPT checkpoint directory or hub id")
    infer.add_argument("--image", type=Path, required=True)
    infer.add_argument("--box", action="append", default=[],
                       help="x0,y0,x1,y1 (normalised) for each <|perception_box|> in the question, in order (box heads)")
    infer.add_argument("--max-new-tokens", type=int, default=128)
    infer.add_argument("--image-max-pixels", type=int, default=512 * 512, help="resize larger images (published: 512^2)")
    infer.add_argument("--no-perception", action="store_true", help="answer without Visual Perception Tokens")
    infer.add_argument("--regions-image", type=Path, help="where to draw the chosen regions (default: IMAGE_regions.png)")
    infer.add_argument("--device", help="e.g. cuda, cpu (default: cpu)")
    infer.set_defaults(run=_infer)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"vpt {args.command}: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
