"""Rows in the released VPT data format: their images, crops, placeholders and checks.

A row is sharegpt-style ``messages`` plus image lists: ``images`` for the base model's own
``<image>`` placeholders, and one column per branch (``detection_images``, ``seg_images``,
``clip_images``) for that branch's placeholder (``<detection_image>`` ...). An image path may
end in ``_x0,y0,x1,y1`` after its extension: the image is that pixel crop of the file.

A ``boxes`` column gives one box ``[x0, y0, x1, y1]`` per ``<|perception_box|>`` in the messages,
in order (PerceptionGPT's continuous token, box_heads.py), normalised to the row's first image or,
when the dataset_info.json entry says ``"box_units": "pixels"``, in its pixels. A ``masks`` column
gives each of those boxes its mask (an image path, or null for a box without one): a mask image of
the row's first image's size, nonzero (or above 127 for 8-bit masks) inside.
"""

import os
import re

import numpy as np
import torch
from PIL import Image

from .branches import BRANCHES
from .vocabulary import BOX_TOKEN, GRID_SIZE, GRID_TOKEN_PATTERN, IMAGE_PLACEHOLDER

MAIN_IMAGES = "images"  # column of the base model's own images
BOXES = "boxes"  # column of the boxes of the <|perception_box|> tokens
MASKS = "masks"  # column of the mask image of each box (or null)
BOX_UNITS = ("normalized", "pixels")
# LLaMA-Factory carries one media list per row to its collator; a row's boxes ride in it as these
# strings, after its images, so no upstream data structure needs a new field.
_BOX_ENTRY = "vpt-box:"
_CROP_SUFFIX = re.compile(r"^(?P<file>.+\.[^._/\\]+)_(?P<box>[^_/\\]*)$")


class VPTDataError(ValueError):
    """A dataset row (or image) that cannot be used; the message names dataset, row and field."""


def image_columns() -> dict[str, str]:
    """Placeholder -> dataset column, for the base image and every registered branch."""
    columns = {IMAGE_PLACEHOLDER: MAIN_IMAGES}
    for branch in BRANCHES.values():
        columns[branch.tokens.placeholder] = branch.data_column
    return columns


def placeholder_pattern() -> re.Pattern:
    return re.compile("|".join(re.escape(p) for p in image_columns()))


def placeholders_in(text: str) -> list[str]:
    """Every image placeholder of ``text``, in order."""
    return placeholder_pattern().findall(text)


def split_crop(path: str) -> tuple[str, tuple[int, int, int, int] | None]:
    """``"a.jpg_10,20,110,220"`` -> ``("a.jpg", (10, 20, 110, 220))``; a plain path -> ``(path, None)``.

    A suffix after the extension that is not four integers raises :class:`VPTDataError`.
    """
    match = _CROP_SUFFIX.match(path)
    if match is None or os.path.isfile(path):
        return path, None
    parts = match["box"].split(",")
    try:
        box = tuple(int(part) for part in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise VPTDataError(f"{path}: crop suffix {match['box']!r} is not four integers x0,y0,x1,y1")
    return match["file"], box


def check_crop(box: tuple[int, int, int, int], size: tuple[int, int], path: str) -> None:
    x0, y0, x1, y1 = box
    width, height = size
    if x1 <= x0 or y1 <= y0:
        raise VPTDataError(f"{path}: crop {box} has no area (need x0 < x1 and y0 < y1)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise VPTDataError(f"{path}: crop {box} is outside the {width}x{height} image")


def _open_checked(path: str) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """The file of an image path, opened lazily (header only), and its crop box, checked."""
    file, box = split_crop(path)
    if not os.path.isfile(file):
        raise VPTDataError(f"{path}: image file not found")
    image = Image.open(file)
    if box is not None:
        check_crop(box, image.size, path)
    return image, box


def open_image(path: str) -> Image.Image:
    """Open an image path, applying its crop suffix (checked against the image size)."""
    image, box = _open_checked(path)
    return image if box is None else image.crop(box)


def check_image_path(path: str) -> None:
    """:func:`open_image`'s checks, reading only the file header."""
    _open_checked(path)[0].close()


def row_problems(contents: list[str], images: dict[str, list]) -> list[str]:
    """Everything wrong with one row, each as ``"field: problem"``.

    Args:
        contents: the text of each message, in order.
        images: dataset column (``images``, ``detection_images``, ...) -> its list for this row.
    """
    problems = []
    columns = image_columns()
    found = {column: 0 for column in columns.values()}
    for k, text in enumerate(contents):
        for placeholder in placeholders_in(text):
            found[columns[placeholder]] += 1
        for axis, index in GRID_TOKEN_PATTERN.findall(text):
            if int(index) >= GRID_SIZE:
                problems.append(
                    f"messages[{k}].content: grid token <|{axis}_{index}|> is outside 0..{GRID_SIZE - 1}"
                )
    placeholder_of = {column: placeholder for placeholder, column in columns.items()}
    for column, count in found.items():
        given = images.get(column) or []
        if len(given) != count:
            problems.append(
                f"{column}: {count} {placeholder_of[column]} placeholder(s) in the messages but {len(given)} image(s)"
            )
        for i, image in enumerate(given):
            if isinstance(image, str):
                try:
                    check_image_path(image)
                except VPTDataError as error:
                    problems.append(f"{column}[{i}]: {error}")
    return problems


def row_boxes(contents: list[str], boxes, images: list | None, units: str = "normalized") -> tuple[list[str], list]:
    """Check a row's ``boxes`` against its box tokens and first image; return ``(problems, normalised boxes)``.

    Problems name the field: a count that does not match the tokens, a box that is not four
    numbers, a box with no area, a box outside the image.
    """
    if units not in BOX_UNITS:
        return [f"box_units: {units!r} is not one of {BOX_UNITS}"], []
    wanted = sum(text.count(BOX_TOKEN) for text in contents)
    boxes = list(boxes or [])
    if len(boxes) != wanted:
        return [f"{BOXES}: {wanted} {BOX_TOKEN} token(s) in the messages but {len(boxes)} box(es)"], []
    if not boxes:
        return [], []
    width = height = 1.0
    if units == "pixels":  # pixels of the row's first image
        if not images:
            return [f"{BOXES}: pixel boxes refer to the row's first image, but the row has none"], []
        try:
            image = open_image(images[0]) if isinstance(images[0], str) else images[0]
            width, height = image.size
        except (VPTDataError, OSError) as error:
            return [f"{MAIN_IMAGES}[0]: {error}"], []
    problems, normalised = [], []
    for i, box in enumerate(boxes):
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            problems.append(f"{BOXES}[{i}]: {box!r} is not four numbers x0, y0, x1, y1")
            continue
        if x1 <= x0 or y1 <= y0:
            problems.append(f"{BOXES}[{i}]: {list(box)} has no area (need x0 < x1 and y0 < y1)")
        elif x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            frame = "[0, 1] (normalised; set \"box_units\": \"pixels\" for pixel boxes)" if units == "normalized" \
                else f"the {int(width)}x{int(height)} image"
            problems.append(f"{BOXES}[{i}]: {list(box)} is outside {frame}")
        else:
            normalised.append([x0 / width, y0 / height, x1 / width, y1 / height])
    return problems, normalised


def row_masks(masks, box_count: int, images: list | None) -> tuple[list[str], list]:
    """Check a row's ``masks`` (one path or null per box); return ``(problems, masks)``.

    Problems name the field: a count that does not match the boxes, an entry that is not a path,
    an unreadable mask, a mask whose size is not the row's first image's.
    """
    if masks is None:
        return [], [None] * box_count
    masks = list(masks)
    if len(masks) != box_count:
        return [f"{MASKS}: {box_count} box(es) but {len(masks)} mask(s); give null for a box without a mask"], []
    size = None
    if images and isinstance(images[0], str):
        try:
            size = open_image(images[0]).size
        except (VPTDataError, OSError):
            pass  # the image's own check names it
    problems = []
    for i, path in enumerate(masks):
        if path is None:
            continue
        if not isinstance(path, str):
            problems.append(f"{MASKS}[{i}]: {path!r} is not a mask image path (or null)")
            continue
        try:
            with Image.open(path) as mask:
                mask_size = mask.size
        except (OSError, ValueError) as error:
            problems.append(f"{MASKS}[{i}]: cannot read mask {path}: {error}")
            continue
        if size is not None and mask_size != size:
            problems.append(f"{MASKS}[{i}]: mask {path} is {mask_size[0]}x{mask_size[1]} but the row's image is "
                            f"{size[0]}x{size[1]}")
    return problems, masks


def resolve_media(path: str, media_dir: str | None) -> str:
    """An image or mask path as LLaMA-Factory's converter resolves it: joined to ``media_dir`` (the
    dataset_dir by default) when that names a file, else as written; a crop suffix stays on."""
    if not media_dir or not isinstance(path, str):
        return path
    try:
        file, _ = split_crop(path)
    except VPTDataError:
        file = path  # the row's own check reports the bad suffix
    joined = os.path.join(media_dir, file)
    return joined + path[len(file) :] if os.path.isfile(joined) else path


def check_row(contents: list[str], images: dict[str, list], boxes, masks, box_units: str = "normalized"
              ) -> tuple[list[str], list, list]:
    """Every check of one row (images, placeholders, grid tokens, boxes, masks); returns
    ``(problems, normalised boxes, masks)``, the paths in ``images`` and ``masks`` already resolved."""
    problems = row_problems(contents, images)
    box_problems, boxes = row_boxes(contents, boxes, images.get(MAIN_IMAGES), box_units)
    problems += [problem for problem in box_problems if problem not in problems]  # (pixel boxes re-open the first image)
    if box_problems:
        return problems, [], []
    mask_problems, masks = row_masks(masks, len(boxes), images.get(MAIN_IMAGES))
    return problems + mask_problems, boxes, masks


def load_mask(path: str) -> torch.Tensor:
    """A mask image as a bool tensor ``(height, width)``: nonzero inside, or above 127 for masks
    drawn in 0..255."""
    with Image.open(path) as image:
        values = np.asarray(image.convert("L"))
    return torch.from_numpy(values > (0 if values.max() <= 1 else 127))


def box_entry(box, mask: str | None = None) -> str:
    """A normalised box (and its mask's path) as an entry of LLaMA-Factory's per-row media list."""
    entry = _BOX_ENTRY + ",".join(repr(float(v)) for v in box)
    return entry if mask is None else f"{entry}|{mask}"


def is_box_entry(entry) -> bool:
    return isinstance(entry, str) and entry.startswith(_BOX_ENTRY)


def parse_box_entry(entry: str) -> tuple[list[float], str | None]:
    """The box and the mask path (or None) of :func:`box_entry`."""
    box, _, mask = entry[len(_BOX_ENTRY):].partition("|")
    return [float(v) for v in box.split(",")], mask or None
