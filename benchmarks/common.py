"""Shared helpers of the VPT benchmarks (issue 5): models, inputs, timing, machine info, the report file.

Both ``bench_train.py`` and ``bench_generate.py`` import this module (run them from the repository
root, or from anywhere: they put this folder on ``sys.path`` themselves).

Models
    ``tiny``: the project's tiny random checkpoint, built offline in a temporary directory exactly as
    ``tests/conftest.py`` builds it (``build_tiny_base`` + ``init_vpt_checkpoint`` with the three
    branches and ``tiny_encoder_configs``), then loaded with ``from_pretrained``.
    ``2b``: a random model of Qwen2-VL-2B-Instruct's shapes with the repository's default branch
    encoders (DINOv2-large, SAM ViT-L, the model's own ViT for clip), built in memory on the target
    device. Its tokenizer is the tiny one (token ids < 1000 inside a 151,936-row vocabulary): the
    weights are random, so only shapes matter.
    ``proportional``: the ``2b`` model with every width kept (LLM 1536 and its MLP, heads and KV
    heads; Qwen ViT 1280; DINOv2-L and SAM ViT-L 1024, SAM at 1024 px) and every depth cut by one
    common factor (``--depth-factor``, default 28: LLM 28 -> 1 layer, ViT 32 -> 1, DINOv2 24 -> 1,
    SAM 24 -> 1; 14 gives two of each, twice the time), the vocabulary too (151,936 -> 5,426 rows),
    so that the output layer keeps its share of the LLM's work. It runs on a 2-core CPU and keeps the proportions a GPU run has
    between the LLM, its output layer and each branch encoder.

    The plain Qwen2-VL compared against is :func:`plain_twin`: a genuine
    ``Qwen2VLForConditionalGeneration`` whose ``model`` and ``lm_head`` are the VPT model's own modules,
    so both run with the very same weights (and one optimizer state), and only the forward differs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "docs" / "BENCHMARKS.md"
BRANCHES = ("clip", "dino", "sam")

# Dense bf16 tensor-core peaks (FLOP/s) of common GPUs, from the vendors' data sheets (without sparsity).
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
}

_WORDS = (
    "what which where colour shape square circle triangle red green blue yellow small large left right top "
    "bottom corner centre image picture region look again how many there object near far behind front"
).split()


# ---------------------------------------------------------------------------- devices and timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall seconds of ``fn()`` for each of ``repeats`` runs after ``warmup`` untimed runs (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def set_threads(args) -> None:
    """Torch intra-op threads: ``--threads``, else 1 on CPU (the GPU path leaves torch's default).

    On the 2-core CPU these benchmarks were developed on, shared with other work, two OpenMP
    threads made single steps vary from 0.13 s to 6 s (threads spinning on a busy core); one
    thread gave steps within a few percent of each other. The ratios are what these figures are
    for, and they hold at one thread.
    """
    threads = args.threads or (1 if args.device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
        args.threads = threads


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def parse_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def gpu_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak of the GPU in FLOP/s (``--peak-tflops`` overrides; None if unknown or on CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_BF16_PEAK.items():
        if key in name:
            return peak
    return None


# ---------------------------------------------------------------------------- machine and versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (no GPU in this run)",
    }
    try:  # read-only (no optional index refresh): the commit the figures belong to (plus whether the tree had local edits)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=False)
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip() + (" (with uncommitted edits)" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], REPO) if Path(sys.argv[0]).is_absolute() else sys.argv[0]
    return " ".join([".venv/bin/python", script, *sys.argv[1:]])


# ---------------------------------------------------------------------------- the report file


REPORT_HEADER = """# Benchmarks

Written by `benchmarks/bench_train.py`, `benchmarks/bench_generate.py` (issues 5 and 18) and
`benchmarks/bench_sam_batching.py` (issue 18). Each script rewrites only its own section (between its
`BEGIN`/`END` markers), so running one keeps the others' figures; the section between the generation
and SAM ones is written by hand. What each figure measures, and why the comparison is fair, is
described in each section and in the scripts' docstrings. The lines each script prints last
(`name: value`) are repeated at the end of its section.
"""


def write_section(name: str, markdown: str, path: Path = REPORT) -> None:
    """Replace (or append) the section ``name`` of the report, keeping everything else."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else REPORT_HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def info_lines(info: dict, extra: dict) -> str:
    return "\n".join(f"- {key}: {value}" for key, value in {**info, **extra}.items())


# ---------------------------------------------------------------------------- models


def build_tiny(workdir: str | Path, dtype: torch.dtype, device: torch.device):
    """The tests' tiny VPT checkpoint (three branches), built offline in ``workdir``; returns (model, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as transformers_logging

    import vpt_plugin  # noqa: F401  (registers the Auto classes)
    from vpt_plugin.checkpoint import init_vpt_checkpoint
    from vpt_plugin.tiny import build_tiny_base, tiny_encoder_configs

    workdir = Path(workdir)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        base = build_tiny_base(workdir / "tiny-base", seed=0)
        path = init_vpt_checkpoint(str(base), workdir / "tiny-vpt", list(BRANCHES),
                                   encoder_configs=tiny_encoder_configs())
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return model, AutoProcessor.from_pretrained(path)


def qwen2_vl_2b_config(tokenizer, num_layers: int | None = None, vision_depth: int | None = None,
                       vocab_size: int | None = None):
    """Qwen2-VL-2B-Instruct's config.json (hub, 2024-09) with this tokenizer's special-token ids.

    ``num_layers``/``vision_depth``/``vocab_size`` shrink the depths (and vocabulary) only, widths kept.
    """
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size or DEPTHS_2B["vocab"],
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=num_layers or 28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=vision_depth or 32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16,
                           in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


# Qwen2-VL-2B-Instruct's depths (LLM, ViT), vocabulary, and the branch encoders' depth (DINOv2-L, SAM ViT-L).
DEPTHS_2B = {"llm": 28, "vit": 32, "vocab": 151936, "encoders": 24}


def proportional_depths(factor: int) -> dict:
    """Every depth of the 2B model (and its vocabulary) divided by ``factor``, rounded, at least 1."""
    return {name: max(1, round(value / factor)) for name, value in DEPTHS_2B.items()}


def shallow_encoder_config(name: str, layers: int) -> dict:
    """The branch's default encoder config (a dict), ``layers`` deep: backbone stage names follow the depth;
    SAM's last layer is its global-attention one (ViT-L has 4 among 24, at every sixth)."""
    from vpt_plugin.branches import get_branch

    encoder_config = get_branch(name).default_encoder_config().to_dict()
    for key in ("out_features", "out_indices", "stage_names", "_out_features", "_out_indices"):
        encoder_config.pop(key, None)
    encoder_config["num_hidden_layers"] = layers
    if name == "sam":
        encoder_config["global_attn_indexes"] = [layers - 1]
    return encoder_config


def build_2b(dtype: torch.dtype, device: torch.device, num_layers: int | None = None,
             encoder_layers: int | None = None, vision_depth: int | None = None, vocab_size: int | None = None):
    """A random VPT model of Qwen2-VL-2B-Instruct's shapes, built directly on ``device``; returns (model, processor).

    Branch encoders: the repository's defaults (``branches/dino.py``: DINOv2-large, 24 layers, width
    1024; ``branches/sam.py``: SAM ViT-L, 24 layers, width 1024, 1024x1024 input). Image processor:
    Qwen2-VL's own pixel bounds (56^2 .. 28^2*1280). On the meta device nothing is allocated
    (``--build-only`` uses that as a cheap check of the shapes).
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from vpt_plugin.bases.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE, VPTQwen2VLConfig, VPTQwen2VLForConditionalGeneration
    from vpt_plugin.branches import get_branch
    from vpt_plugin.checkpoint import add_vpt_tokens, vpt_token_ids
    from vpt_plugin.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(0)
    add_vpt_tokens(tokenizer, list(BRANCHES))
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size=size),
                                 video_processor=Qwen2VLVideoProcessor(size=size), tokenizer=tokenizer,
                                 chat_template=QWEN2_VL_CHAT_TEMPLATE)
    base = qwen2_vl_2b_config(tokenizer, num_layers, vision_depth, vocab_size)
    encoder_configs = {}
    for name in BRANCHES:
        branch = get_branch(name)
        if branch.has_encoder:
            encoder_configs[name] = (shallow_encoder_config(name, encoder_layers) if encoder_layers
                                     else branch.default_encoder_config().to_dict())
    fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    config = VPTQwen2VLConfig(**fields, vision_encoder_ls=list(BRANCHES), branch_encoder_configs=encoder_configs,
                              num_inner_forward_run=2, para_mask_id=1, para_mask_ratio=0.5,
                              **vpt_token_ids(tokenizer, list(BRANCHES)))
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = VPTQwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def plain_twin(model):
    """A plain ``Qwen2VLForConditionalGeneration`` sharing ``model``'s base modules (same weights, same tensors).

    It is built on the meta device (nothing allocated) and then given the VPT model's ``model``
    (ViT, merger, language model) and ``lm_head``; its forward and ``generate`` are transformers'
    own Qwen2-VL ones. Branch encoders and projectors are not part of it.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = model.config
    base_config = Qwen2VLConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    with torch.device("meta"):
        plain = Qwen2VLForConditionalGeneration(base_config)
    plain.model = model.model
    plain.lm_head = model.lm_head
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.train(model.training)
    return plain


def build_models(shape: str, dtype: torch.dtype, device: torch.device, workdir: str, num_layers=None,
                 encoder_layers=None, depth_factor: int = 28):
    """(VPT model, plain twin, processor) for ``shape`` ``tiny``, ``2b`` or ``proportional``."""
    if shape == "tiny":
        model, processor = build_tiny(workdir, dtype, device)
    elif shape == "proportional":
        depths = proportional_depths(depth_factor)
        model, processor = build_2b(dtype, device, depths["llm"], depths["encoders"], depths["vit"], depths["vocab"])
    else:
        model, processor = build_2b(dtype, device, num_layers, encoder_layers)
    return model, plain_twin(model), processor


def shape_description(args) -> str:
    """What the report says the model was."""
    if args.shape == "tiny":
        return "tiny (tests/conftest.py tiny checkpoint)"
    if args.shape == "proportional":
        depths = proportional_depths(args.depth_factor)
        return (f"proportional (random; Qwen2-VL-2B-Instruct, DINOv2-L and SAM ViT-L widths, depths / {args.depth_factor}: "
                f"LLM {depths['llm']} layers, ViT {depths['vit']}, DINOv2 and SAM {depths['encoders']}, "
                f"vocabulary {depths['vocab']:,})")
    return "2b (random, Qwen2-VL-2B-Instruct shapes)"


def parameter_counts(model) -> dict:
    """Parameter counts: the language model without its input embedding table (plus lm_head), the ViT, branch parts.

    ``llm_flops_params`` is the N of the FLOP formulas (6N per trained token, 2N per decoded
    token): every matmul weight a token passes through in the LLM, i.e. the decoder layers and
    ``lm_head`` (the embedding lookup does no multiply-adds).
    """
    def count(module):
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    language = model.model.language_model
    counts = {
        "llm_flops_params": count(language) - language.embed_tokens.weight.numel() + model.lm_head.weight.numel(),
        "vit": count(model.model.visual),
        "total": count(model),
    }
    return counts


def format_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


# ---------------------------------------------------------------------------- inputs


def shape_image(seed: int, size: int) -> Image.Image:
    """A grey image with a small coloured square in one cell of the 8x8 grid (as the tests draw them)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    step = size // 8
    x, y = rng.randrange(8), rng.randrange(8)
    colour = rng.choice(["red", "green", "blue", "yellow", "white"])
    ImageDraw.Draw(image).rectangle([x * step + 2, y * step + 2, (x + 1) * step - 3, (y + 1) * step - 3], fill=colour)
    return image


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def set_image_side(processor, side: int) -> None:
    """Let the base image processor keep a ``side`` x ``side`` image at its size ((side/28)^2 image tokens)."""
    current = processor.image_processor.size
    longest = max(current["longest_edge"], side * side)
    processor.image_processor.size = {"shortest_edge": current["shortest_edge"], "longest_edge": longest}


def workdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmarks take (shape, device, dtype, threads, report); each script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (< 1 minute on CPU)")
    parser.add_argument("--shape", choices=["tiny", "2b", "proportional"], default="proportional",
                        help="proportional: 2B widths, depths cut by --depth-factor (default; what a GPU run will see "
                             "in proportion); 2b: Qwen2-VL-2B shapes (GPU); tiny: the tests' model")
    parser.add_argument("--depth-factor", type=int, default=28,
                        help="proportional shape: the common depth divisor (28: one layer each, ~15 min on 2 cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="parameter dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: steady figures on a shared CPU; see common.py)")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak (TFLOP/s) for MFU, if not recognised")
    parser.add_argument("--llm-layers", type=int, help="2b shape: fewer decoder layers (a cheap check only)")
    parser.add_argument("--encoder-layers", type=int, help="2b shape: fewer ViT/DINOv2/SAM layers (a cheap check only)")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                        help="write this script's section of docs/BENCHMARKS.md (default: yes, except with --quick)")
    return parser


def finish_arguments(args, presets: dict) -> None:
    """Fill options left unset from the script's preset (quick, default or 2b), and resolve device and dtype."""
    if args.quick:
        args.shape = "tiny"  # a smoke test: seconds, not proportions
    preset = presets["quick" if args.quick else args.shape if args.shape in presets else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.report is None:
        args.report = not args.quick
    args.device = torch.device(args.device)
    args.dtype = parse_dtype(args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))


def finish_run(section: str, text: str | None, elapsed: float, figures: dict[str, float], quick: bool = False) -> None:
    """Write the script's section of docs/BENCHMARKS.md (unless ``text`` is None), then print the
    figures last, one ``name: value`` per line, headlines at the end."""
    if text is not None:
        write_section(section, text)
        print(f"wrote the {section} section of {REPORT.relative_to(REPO)}")
    print(f"wall time {elapsed:.0f} s")
    if quick:
        print("--quick is a smoke test on the tiny model: its ratios say nothing about speed at real proportions")
    for key, value in figures.items():
        print(f"{key}: {value:.3f}")
