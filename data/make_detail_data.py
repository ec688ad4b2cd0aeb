"""Write the "look again" task (data/detail/), where only a second look can answer, deterministically.

Each 256x256 image has one purple square, filling a 2x2 block of cells of the 8x8 grid (on even
cells; a tiny model learns to find one object in minutes, not to tell it among others). The
square carries a fine texture: horizontal
lines, vertical lines, a checkerboard (each one pixel wide, light and dark purple) or none. The
question asks which. At the base model's pixel budget in the demo (128x128, half the size) every
texture averages to the same purple: the first look finds the square but cannot tell its texture.
The second look can: the region crop is shown at full resolution, and the DINOv2 branch sees the
image at 224x224.

Files, sharegpt ``messages`` + ``images`` and the branch columns, as released:
- ``detail_region_{train,test}.json``: question + Region Selection prompt -> the square's cells
  -> the crop -> the answer. In ``train`` some rows answer directly instead, so the model also
  learns its best answer without a second look (what it says when perception is suppressed).
  Each row also has the square's pixel ``box``, which the evaluation checks crops against.
- ``detail_dino_{train,test}.json``: question + Vision Re-Encoding prompt -> the DINOv2 action
  -> the image through DINOv2 -> the answer; likewise with some direct answers in ``train``.
- ``detail_boxregion_{train,test}.json``: continuous Region Selection (PerceptionGPT's box token):
  question + Region Selection prompt -> ``<|region_token_start|><|perception_box|><|region_token_end|>``
  -> the crop of that box, widened by ``BOX_CROP_MARGIN`` of its size per side and snapped to
  ``BOX_CROP_GRID`` pixels as the recipe's ``box_crop_margin`` and ``box_crop_grid`` make generation crop
  it -> the answer; ``boxes`` holds the square's pixel box.
- ``detail_grounding_{train,test}.json``: "where is the purple square?" -> ``<|perception_box|>``,
  the box as the answer (referring expression comprehension); ``boxes`` as above, and ``masks`` the
  square's mask (``images/<image>_mask.png``), which the ``detail_grounding_masks_*`` entries of
  dataset_info.json map for PerceptionGPT's mask decoder (referring segmentation).
- ``detail_cells_train.json``: "which cells hold the purple square?" -> the grid tokens. A tiny random
  model learns where things are from this cross-entropy far sooner than from a box loss alone (a
  large model already knows); the box-token and the grid demo recipes both train on it.

Run from the repository root: ``python data/make_detail_data.py [--output data/detail]``; the
images are written next to the files, their paths relative to ``--output``'s parent (the
``dataset_dir`` of LLaMA-Factory, ``data/``).
"""

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from vpt_plugin.box_heads import box_crop_pixels
from vpt_plugin.branches import get_branch
from vpt_plugin.vocabulary import (
    BOX_TOKEN,
    GRID_SIZE,
    IMAGE_PLACEHOLDER,
    REENCODING_PROMPT,
    REGION_PROMPT,
    continuous_region_sequence,
    crop_pixels,
    region_sequence,
)

IMAGE_SIZE = 256
CELL = IMAGE_SIZE // GRID_SIZE
BLOCK = 2  # squares fill 2x2 cells, on even cells
MARGIN = 8  # background around the square inside its block: where it is shows in the colour there


def background() -> Image.Image:
    """Red rises from left to right, blue from top to bottom: where the square is shows in the
    colour around it, which a tiny model learns to read in minutes (a big one has scenes for that)."""
    ramp = [30 + 200 * i // (IMAGE_SIZE - 1) for i in range(IMAGE_SIZE)]
    red, blue = Image.new("L", (IMAGE_SIZE, 1)), Image.new("L", (1, IMAGE_SIZE))
    red.putdata(ramp)
    blue.putdata(ramp)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    return Image.merge("RGB", (red.resize(size), Image.new("L", size, 150), blue.resize(size)))
# The texture's two tones, as far apart as a purple allows, and their mean, the colour of the square
# without texture: at half size every texture is this colour.
LIGHT, DARK = (255, 0, 255), (0, 0, 0)
PLAIN = tuple((light + dark) // 2 for light, dark in zip(LIGHT, DARK))
TEXTURES = ("horizontal", "vertical", "checked", "none")
QUESTION = "Which pattern does the purple square have?"
GROUNDING_QUESTION = "Where is the purple square?"
CELLS_QUESTION = "Which cells hold the purple square?"
SPLITS = {"train": 400, "test": 48}  # images per split
DIRECT_SHARE = 0.2  # training rows that answer without a second look
# Continuous crops: the square and a sixth of its size around it, i.e. its 2x2 block of cells (64 px, two
# of Qwen3-VL's 32 px tokens a side), so the one-pixel texture reaches the ViT without resampling.
BOX_CROP_MARGIN = 1 / 6
# Snapped to Qwen3-VL's 32 px tokens, as the recipe's box_crop_grid makes generation crop: the square's block
# already is, so the training crops are the block; a decoded box a few pixels off crops that block too.
BOX_CROP_GRID = 32


def texture_colour(texture: str, x: int, y: int) -> tuple[int, int, int]:
    if texture == "horizontal":
        return DARK if y % 2 else LIGHT
    if texture == "vertical":
        return DARK if x % 2 else LIGHT
    if texture == "checked":
        return DARK if (x + y) % 2 else LIGHT
    return PLAIN


def square_box(block: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box ``(left, top, right, bottom)`` of the square in a block of cells (right, bottom exclusive)."""
    size = BLOCK * CELL
    return block[0] * size + MARGIN, block[1] * size + MARGIN, (block[0] + 1) * size - MARGIN, (block[1] + 1) * size - MARGIN


def draw_image(rng: random.Random) -> tuple[Image.Image, dict]:
    image = background()
    block = rng.randrange(GRID_SIZE // BLOCK), rng.randrange(GRID_SIZE // BLOCK)
    texture = rng.choice(TEXTURES)
    box = square_box(block)
    pixels = image.load()
    for y in range(box[1], box[3]):
        for x in range(box[0], box[2]):
            pixels[x, y] = texture_colour(texture, x, y)
    x, y = block[0] * BLOCK, block[1] * BLOCK
    return image, {"cells": (x, y, x + BLOCK - 1, y + BLOCK - 1), "texture": texture, "box": box}


def direct_row(path: str, question: dict, facts: dict) -> dict:
    """The question answered at once, from the first look only."""
    return {"messages": [question, {"role": "assistant", "content": facts["texture"]}], "images": [path]}


def region_row(path: str, facts: dict, direct: bool) -> dict:
    x0, y0, x1, y1 = facts["cells"]
    question = {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{QUESTION}\n{REGION_PROMPT}"}
    if direct:
        return direct_row(path, question, facts)
    left, top, right, bottom = crop_pixels(facts["cells"], IMAGE_SIZE, IMAGE_SIZE)
    return {
        "messages": [
            question,
            {"role": "assistant", "content": region_sequence([x0, x1], [y0, y1])},
            {"role": "user", "content": IMAGE_PLACEHOLDER},
            {"role": "assistant", "content": facts["texture"]},
        ],
        "images": [path, f"{path}_{left},{top},{right},{bottom}"],
        "box": list(facts["box"]),
    }


def box_region_row(path: str, facts: dict, direct: bool, margin: float = BOX_CROP_MARGIN,
                   grid: int = BOX_CROP_GRID) -> dict:
    """Continuous Region Selection: the box token names the square; the crop is that box widened by ``margin``,
    snapped to ``grid`` pixels."""
    question = {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{QUESTION}\n{REGION_PROMPT}"}
    if direct:
        return direct_row(path, question, facts)
    box = facts["box"]
    left, top, right, bottom = box_crop_pixels([v / IMAGE_SIZE for v in box], IMAGE_SIZE, IMAGE_SIZE, margin, grid)
    return {
        "messages": [
            question,
            {"role": "assistant", "content": continuous_region_sequence()},
            {"role": "user", "content": IMAGE_PLACEHOLDER},
            {"role": "assistant", "content": facts["texture"]},
        ],
        "images": [path, f"{path}_{left},{top},{right},{bottom}"],
        "boxes": [list(box)],
        "box": list(box),
    }


def square_mask(box: tuple[int, int, int, int]) -> Image.Image:
    """The square's mask: 255 inside its pixel box, 0 elsewhere."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    mask.paste(255, box)
    return mask


def grounding_row(path: str, facts: dict, mask_path: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{GROUNDING_QUESTION}"},
            {"role": "assistant", "content": BOX_TOKEN},
        ],
        "images": [path],
        "boxes": [list(facts["box"])],
        "masks": [mask_path],
        "box": list(facts["box"]),
    }


def cells_row(path: str, facts: dict) -> dict:
    x0, y0, x1, y1 = facts["cells"]
    return {
        "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{CELLS_QUESTION}"},
            {"role": "assistant", "content": region_sequence([x0, x1], [y0, y1])},
        ],
        "images": [path],
    }


def reencoding_row(path: str, facts: dict, branch_name: str, direct: bool) -> dict:
    tokens = get_branch(branch_name).tokens
    question = {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{QUESTION}\n{REENCODING_PROMPT}"}
    if direct:
        return direct_row(path, question, facts)
    return {
        "messages": [
            question,
            {"role": "assistant", "content": tokens.action_sequence},
            {"role": "user", "content": tokens.placeholder},
            {"role": "assistant", "content": facts["texture"]},
        ],
        "images": [path],
        get_branch(branch_name).data_column: [path],
    }


def make_detail_data(output: Path, seed: int = 0, images: dict[str, int] | None = None,
                     box_crop_margin: float = BOX_CROP_MARGIN, box_crop_grid: int = BOX_CROP_GRID) -> list[Path]:
    """Write every file under ``output`` (``images``: images per split, default :data:`SPLITS`); image
    paths are relative to its parent (LLaMA-Factory's ``media_dir``, which defaults to ``dataset_dir``)."""
    (output / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for offset, (split, count) in enumerate({**SPLITS, **(images or {})}.items()):
        rng = random.Random(seed * 1000 + offset)
        region_rows, dino_rows, box_region_rows, grounding_rows, cells_rows = [], [], [], [], []
        for i in range(count):
            image, facts = draw_image(rng)
            image_path = output / "images" / f"{split}_{i:03d}.png"
            image.save(image_path)
            path = image_path.relative_to(output.parent).as_posix()
            mask_path = image_path.with_name(f"{image_path.stem}_mask.png")
            square_mask(facts["box"]).save(mask_path)
            direct = split == "train" and rng.random() < DIRECT_SHARE
            region_rows.append(region_row(path, facts, direct))
            dino_rows.append(reencoding_row(path, facts, "dino", direct))
            box_region_rows.append(box_region_row(path, facts, direct, box_crop_margin, box_crop_grid))
            grounding_rows.append(grounding_row(path, facts, mask_path.relative_to(output.parent).as_posix()))
            cells_rows.append(cells_row(path, facts))
        files = {"region": region_rows, "dino": dino_rows, "boxregion": box_region_rows, "grounding": grounding_rows}
        if split == "train":
            files["cells"] = cells_rows
        for name, rows in files.items():
            file = output / f"detail_{name}_{split}.json"
            file.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            written.append(file)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("data/detail"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=SPLITS["train"])
    parser.add_argument("--test-images", type=int, default=SPLITS["test"])
    parser.add_argument("--box-crop-margin", type=float, default=BOX_CROP_MARGIN,
                        help="continuous crops: the box widened by this share of its size (the recipe's box_crop_margin)")
    parser.add_argument("--box-crop-grid", type=int, default=BOX_CROP_GRID,
                        help="continuous crops: snapped to this many pixels (the recipe's box_crop_grid; 0: off)")
    args = parser.parse_args()
    sizes = {"train": args.train_images, "test": args.test_images}
    for path in make_detail_data(args.output, args.seed, sizes, args.box_crop_margin, args.box_crop_grid):
        print(path)


if __name__ == "__main__":
    main()
