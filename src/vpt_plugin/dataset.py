"""Rows in the released VPT data format: their images, crops, placeholders and checks.

A row is sharegpt-style ``messages`` plus image lists: ``images`` for the base model's own
``<image>`` placeholders, and one column per branch (``detection_images``, ``seg_images``,
``clip_images``) for that branch's placeholder (``<detection_image>`` ...). An image path may
end in ``_x0,y0,x1,y1`` after its extension: the image is that pixel crop of the file.
"""

import os
import re

from PIL import Image

from .branches import BRANCHES
from .vocabulary import GRID_SIZE, GRID_TOKEN_PATTERN, IMAGE_PLACEHOLDER

MAIN_IMAGES = "images"  # column of the base model's own images
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
