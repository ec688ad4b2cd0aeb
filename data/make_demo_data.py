"""Write the demo dataset (data/demo/) in the released VPT format, deterministically.

Each image is a grey canvas with grey clutter and one small coloured shape in one cell of
the 8x8 grid: at the base model's low resolution the shape is a few pixels, so its colour
and form call for a second look. Files (sharegpt ``messages`` + ``images`` and the branch
columns, as released):
- ``vpt_demo_<branch>_{train,test}.json`` for branch clip / detection / seg: region-selection
  rows (the crop as a second ``<image>`` with an ``_x0,y0,x1,y1`` path suffix), re-encoding
  rows for the branch, and plain rows that need no second look.
- ``alignment_demo_<branch>_train.json`` for detection / seg: branch image + question ->
  answer, for the one-pass alignment stage.

Run from the repository root: ``python data/make_demo_data.py [--output data/demo]``.
"""

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vpt_plugin.branches import get_branch
from vpt_plugin.vocabulary import (
    GRID_SIZE,
    IMAGE_PLACEHOLDER,
    REENCODING_PROMPT,
    REGION_PROMPT,
    crop_pixels,
    region_sequence,
)

IMAGE_SIZE = 224
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("square", "circle", "triangle")
BACKGROUNDS = {"light": (200, 200, 200), "dark": (70, 70, 70)}
REENCODING_BRANCHES = ("clip", "dino", "sam")
ALIGNMENT_BRANCHES = ("dino", "sam")
SPLITS = {"train": (64, 0), "test": (16, 1)}  # images per branch file, seed offset


def draw_image(rng: random.Random) -> tuple[Image.Image, dict]:
    background = rng.choice(sorted(BACKGROUNDS))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # grey clutter, so the shape is not the only thing in view
        x, y, size = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE), rng.randrange(4, 12)
        grey = rng.randrange(90, 180)
        draw.rectangle((x, y, x + size, y + size), fill=(grey, grey, grey))
    cell = IMAGE_SIZE // GRID_SIZE
    gx, gy = rng.randrange(GRID_SIZE), rng.randrange(GRID_SIZE)
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    box = (gx * cell + 5, gy * cell + 5, gx * cell + cell - 5, gy * cell + cell - 5)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    return image, {"cell": (gx, gy), "colour": colour, "shape": shape, "background": background}


def question(rng: random.Random, facts: dict) -> tuple[str, str]:
    if rng.random() < 0.5:
        return "What colour is the small shape?", facts["colour"]
    return "What shape is the small coloured object?", facts["shape"]


def region_row(path: str, facts: dict, q: str, answer: str) -> dict:
    gx, gy = facts["cell"]
    left, top, right, bottom = crop_pixels((gx, gy, gx, gy), IMAGE_SIZE, IMAGE_SIZE)
    return {
        "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{q}\n{REGION_PROMPT}"},
            {"role": "assistant", "content": region_sequence([gx, gx], [gy, gy])},  # corners of the box
            {"role": "user", "content": IMAGE_PLACEHOLDER},
            {"role": "assistant", "content": answer},
        ],
        "images": [path, f"{path}_{left},{top},{right},{bottom}"],
    }


def reencoding_row(path: str, branch_name: str, q: str, answer: str) -> dict:
    tokens = get_branch(branch_name).tokens
    return {
        "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{q}\n{REENCODING_PROMPT}"},
            {"role": "assistant", "content": tokens.action_sequence},
            {"role": "user", "content": tokens.placeholder},
            {"role": "assistant", "content": answer},
        ],
        "images": [path],
        get_branch(branch_name).data_column: [path],
    }


def plain_row(path: str, facts: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}Is the background light or dark?"},
            {"role": "assistant", "content": facts["background"]},
        ],
        "images": [path],
    }


def alignment_row(path: str, branch_name: str, q: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{get_branch(branch_name).tokens.placeholder}{q}"},
            {"role": "assistant", "content": answer},
        ],
        get_branch(branch_name).data_column: [path],
    }


def write_json(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def make_demo_data(output: Path, seed: int = 0) -> list[Path]:
    """Write every demo file under ``output``; image paths are relative to its parent (LLaMA-Factory's
    ``media_dir``, which defaults to ``dataset_dir``)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "images").mkdir(exist_ok=True)
    written = []
    for split, (count, offset) in SPLITS.items():
        for branch_index, branch_name in enumerate(REENCODING_BRANCHES):
            rng = random.Random(seed * 1000 + offset * 100 + branch_index)
            vpt_rows, alignment_rows = [], []
            prefix = get_branch(branch_name).tokens.prefix
            for i in range(count):
                image, facts = draw_image(rng)
                image_path = output / "images" / f"{split}_{prefix}_{i:03d}.png"
                image.save(image_path)
                path = image_path.relative_to(output.parent).as_posix()  # relative to media_dir (data/)
                q, answer = question(rng, facts)
                kind = i % 3
                if kind == 0:
                    vpt_rows.append(region_row(path, facts, q, answer))
                elif kind == 1:
                    vpt_rows.append(reencoding_row(path, branch_name, q, answer))
                else:
                    vpt_rows.append(plain_row(path, facts))
                alignment_rows.append(alignment_row(path, branch_name, q, answer))
            vpt_file = output / f"vpt_demo_{prefix}_{split}.json"
            write_json(vpt_file, vpt_rows)
            written.append(vpt_file)
            if split == "train" and branch_name in ALIGNMENT_BRANCHES:
                alignment_file = output / f"alignment_demo_{prefix}_train.json"
                write_json(alignment_file, alignment_rows)
                written.append(alignment_file)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("data/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in make_demo_data(args.output, args.seed):
        print(path)


if __name__ == "__main__":
    main()
