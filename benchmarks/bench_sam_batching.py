"""SAM branch: several images in one encoder call against one image per call, side by side (issue 18).

``branches/sam.py`` encodes one image per call: each global-attention layer of SAM ViT holds a
``(heads, 4096, 4096)`` score tensor and as large a relative-position bias per image (1 GiB each in
fp32 for ViT-L's 16 heads), so a batch multiplies that transient. This script measures both ways on
the same weights and images, at the proportional shape of ``bench_train.py`` / ``bench_generate.py``
(SAM ViT-L's width and 1024 px input, depth cut by ``--depth-factor``, the last layer global):

``one call``
    ``encoder(pixel_values=<all images>)``, what the branch did before.
``per image``
    ``SamBranch.encode``, the branch as it is (one image per call, outputs concatenated).

Both give the same features (checked). Figures: median wall seconds over ``--repeats`` round-robin
rounds after one warm-up call of each.

    .venv/bin/python benchmarks/bench_sam_batching.py --threads 2     # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per generate call (bench_generate's batch)")
    parser.add_argument("--depth-factor", type=int, default=28, help="SAM ViT-L's 24 layers divided by this, at least 1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                        help="write this script's section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    from vpt_plugin.branches import get_branch

    wall_start = time.perf_counter()
    branch = get_branch("sam")
    layers = common.proportional_depths(args.depth_factor)["encoders"]
    config = type(branch.default_encoder_config()).from_dict(common.shallow_encoder_config("sam", layers))
    torch.manual_seed(0)
    encoder = SamVisionEncoder(config).to(args.device).eval()
    model = torch.nn.Module()  # what SamBranch.encode reads: the encoder under its published attribute name
    model.add_module(branch.encoder_attribute, encoder)
    images = [common.shape_image(i, 448) for i in range(args.images)]
    inputs = {k: v.to(args.device) for k, v in branch.preprocess(images, processor=None).items()}
    ways = {
        "one call": lambda: encoder(pixel_values=inputs[branch.pixel_key]).last_hidden_state,
        "per image": lambda: branch.encode(model, inputs),
    }
    with torch.no_grad():
        outputs = {name: run() for name, run in ways.items()}  # the warm-up, and the check
        same = torch.allclose(outputs["one call"], outputs["per image"], atol=1e-4, rtol=1e-4)
        times = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, run in ways.items():
                times[name] += common.measure(run, 1, 0, args.device)
    medians = {name: common.median(values) for name, values in times.items()}
    rows = [[name, args.images, f"{medians[name]:.2f}", f"{min(times[name]):.2f}-{max(times[name]):.2f}",
             f"{medians[name] / medians['per image']:.2f}"] for name in ways]
    table = common.markdown_table(["SAM encoder", "images", "s per call (median)", "min-max s", "x per image"], rows)
    elapsed = time.perf_counter() - wall_start
    info = common.machine_info(args.device)
    extras = {
        "command": f"`{common.command_line()}`",
        "encoder": f"SAM ViT-L width (1024, 16 heads), {layers} layer(s), the last global; 1024x1024 input; float32",
        "timing": f"one warm-up call each, {args.repeats} round-robin rounds, median; torch threads "
                  f"{torch.get_num_threads()}; wall {elapsed:.0f} s",
        "check": "same features both ways" if same else "FEATURES DIFFER",
    }
    text = f"""## SAM branch: one encoder call per image (`benchmarks/bench_sam_batching.py`)

{common.info_lines(info, extras)}

{table}
"""
    print(table)
    figures = {"sam_one_call_over_per_image": medians["one call"] / medians["per image"]}
    text += "\n```\n" + "\n".join(f"{k}: {v:.3f}" for k, v in figures.items()) + "\n```\n"
    common.finish_run("sam-batching", text if args.report else None, elapsed, figures)


if __name__ == "__main__":
    main()
