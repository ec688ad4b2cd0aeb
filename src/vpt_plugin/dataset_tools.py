"""``vpt data``: turn a user's VQA rows with boxes into VPT training rows, and check dataset files.

Input rows (JSON list or JSONL): ``{"image": path, "question": str, "answer": str, "box":
[x0, y0, x1, y1]}``, the box in pixels or normalised to 0..1 (``--box-format``); ``vpt data
propose`` makes such rows from rows without boxes. A row without a ``box`` (one the detector
found nothing for) becomes a plain row: the question and the answer, no second look. Each row
with a box becomes a Region Selection row (the box on the 8x8 grid, the crop as a second image with an
``_x0,y0,x1,y1`` suffix) and, per ``--branches``, a Vision Re-Encoding row, in the released
format (``messages``, ``images`` and the branch columns) that ``vpt_sharegpt`` reads. With
``--region-mode continuous`` the Region Selection row names the box with PerceptionGPT's
``<|perception_box|>`` instead (the ``boxes`` column holds it, normalised; the crop is the box
widened by ``--box-crop-margin`` of its size and snapped to ``--box-crop-grid`` pixels, as generation crops
it with ``box_crop_margin`` and ``box_crop_grid``).
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .box_heads import box_crop_pixels
from .branches import get_branch
from .dataset import (
    BOXES,
    MAIN_IMAGES,
    MASKS,
    VPTDataError,
    check_row,
    image_columns,
    resolve_media,
)
from .vocabulary import (
    GRID_SIZE,
    IMAGE_PLACEHOLDER,
    REENCODING_PROMPT,
    REGION_PROMPT,
    continuous_region_sequence,
    crop_pixels,
    region_sequence,
)

REGION_MODES = ("grid", "continuous")

REQUIRED_KEYS = ("image", "question", "answer")


def read_rows(path: Path) -> list:
    """The rows of a JSON list or JSONL file; a file that is not that raises naming it (and the line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise VPTDataError(f"{path}: cannot read it: {error}") from error
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise VPTDataError(f"{path}, line {number}: not JSON ({error})") from error
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise VPTDataError(f"{path}: not JSON ({error}); give a JSON list of rows or a .jsonl file") from error
    if not isinstance(rows, list):
        raise VPTDataError(f"{path}: expected a JSON list of rows, found a JSON {type(rows).__name__}")
    return rows


def grid_cells(box, width: int, height: int) -> tuple[list[int], list[int]]:
    """Grid indices of a pixel box's top-left and bottom-right corners."""
    x0, y0, x1, y1 = box

    def cell(value, size):
        return min(GRID_SIZE - 1, max(0, math.floor(value / size * GRID_SIZE)))

    # The far edge belongs to the cell it closes (a box ending exactly on a cell line stays left of it).
    return [cell(x0, width), cell(max(x0, x1 - 1e-6), width)], [cell(y0, height), cell(max(y0, y1 - 1e-6), height)]


def vpt_rows(row: dict, where: str, box_format: str, branches: list[str], media_dir: str | None,
             region_mode: str = "grid", box_crop_margin: float = 0.0, box_crop_grid: int = 0) -> list[dict]:
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise VPTDataError(f"{where}: missing keys {missing}")
    image_path = row["image"]
    file = os.path.join(media_dir, image_path) if media_dir else image_path
    if not os.path.isfile(file):
        raise VPTDataError(f"{where}, image: {image_path}: image file not found")
    question, answer = row["question"], row["answer"]
    if row.get("box") is None:
        return [{"messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}{question}"},
                              {"role": "assistant", "content": answer}], MAIN_IMAGES: [image_path]}]
    with Image.open(file) as image:
        width, height = image.size
    box = [float(v) for v in row["box"]]
    if len(box) != 4:
        raise VPTDataError(f"{where}, box: {row['box']} is not four numbers x0,y0,x1,y1")
    if box_format == "normalized":
        box = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
    if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        raise VPTDataError(f"{where}, box: {row['box']} is empty or outside the {width}x{height} image")
    extra = {}
    if region_mode == "continuous":
        normalised = [box[0] / width, box[1] / height, box[2] / width, box[3] / height]
        left, top, right, bottom = box_crop_pixels(normalised, width, height, box_crop_margin, box_crop_grid)
        region, extra = continuous_region_sequence(), {BOXES: [[round(v, 6) for v in normalised]]}
    else:
        xs, ys = grid_cells(box, width, height)
        left, top, right, bottom = crop_pixels((xs[0], ys[0], xs[1], ys[1]), width, height)
        region = region_sequence(xs, ys)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{question}\n{REGION_PROMPT}"},
                {"role": "assistant", "content": region},
                {"role": "user", "content": IMAGE_PLACEHOLDER},
                {"role": "assistant", "content": answer},
            ],
            MAIN_IMAGES: [image_path, f"{image_path}_{left},{top},{right},{bottom}"],
            **extra,
        }
    ]
    for name in branches:
        branch = get_branch(name)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{IMAGE_PLACEHOLDER}{question}\n{REENCODING_PROMPT}"},
                    {"role": "assistant", "content": branch.tokens.action_sequence},
                    {"role": "user", "content": branch.tokens.placeholder},
                    {"role": "assistant", "content": answer},
                ],
                MAIN_IMAGES: [image_path],
                branch.data_column: [image_path],
            }
        )
    return rows


def convert_rows(source: Path, output: Path, box_format: str, branches: list[str], media_dir: str | None,
                 region_mode: str = "grid", box_crop_margin: float = 0.0, box_crop_grid: int = 0) -> int:
    """Write the VPT rows of every source row; raises naming every bad source row."""
    if region_mode not in REGION_MODES:
        raise VPTDataError(f"region mode {region_mode!r} is not one of {REGION_MODES}")
    converted, problems = [], []
    for index, row in enumerate(read_rows(source)):
        try:
            converted += vpt_rows(row, f"{source}, row {index}", box_format, branches, media_dir, region_mode,
                                  box_crop_margin, box_crop_grid)
        except VPTDataError as error:
            problems.append(str(error))
    if problems:
        raise VPTDataError(f"{len(problems)} bad row(s), nothing written:\n" + "\n".join(problems))
    Path(output).write_text(json.dumps(converted, indent=1) + "\n", encoding="utf-8")
    return len(converted)


def default_media_dir(path: Path) -> Path:
    """Where LLaMA-Factory will look for a dataset file's images: its ``dataset_dir`` (the nearest
    folder at or above the file holding a dataset_info.json), else the file's own folder."""
    folder = Path(path).resolve().parent
    for candidate in (folder, *folder.parents):
        if (candidate / "dataset_info.json").is_file():
            return candidate
    return folder


@dataclass
class DatasetColumns:
    """How a dataset file's rows are read: its dataset_info.json entry's columns and tags."""

    messages: str = "messages"
    content_tag: str = "content"
    box_units: str = "normalized"
    images: dict = field(default_factory=lambda: {column: column for column in image_columns().values()})
    boxes: str | None = BOXES
    masks: str | None = MASKS


def dataset_entry(dataset_info: Path, name: str) -> tuple[Path, DatasetColumns]:
    """The file and columns a recipe's ``dataset: name`` reads from ``dataset_info`` (LLaMA-Factory's
    own parser, with the plugin's columns)."""
    from llamafactory.data.parser import get_dataset_list

    try:
        info = json.loads(Path(dataset_info).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise VPTDataError(f"{dataset_info}: cannot read it as dataset_info.json: {error}") from error
    if name not in info:
        raise VPTDataError(f"{dataset_info}: no dataset {name!r} (it has {sorted(info)})")
    (attr,) = get_dataset_list([name], info)
    if attr.load_from != "file":
        raise VPTDataError(f"{dataset_info}, dataset {name}: loads from {attr.load_from}, not a local file")
    columns = DatasetColumns(
        messages=attr.messages, content_tag=attr.content_tag, box_units=attr.box_units,
        images={column: getattr(attr, column, None) for column in image_columns().values()},
        boxes=getattr(attr, BOXES, None), masks=getattr(attr, MASKS, None))
    return Path(dataset_info).parent / attr.dataset_name, columns


def validate_file(path: Path, media_dir: str | None = None, columns: DatasetColumns | None = None) -> list[str]:
    """One line per bad row of a dataset file, ``"row i: field: problem; ..."``; image and mask
    paths resolve as LLaMA-Factory resolves them (``media_dir``, default :func:`default_media_dir`)."""
    columns = columns or DatasetColumns()
    media_dir = str(media_dir or default_media_dir(path))
    report = []
    for index, row in enumerate(read_rows(path)):
        if not isinstance(row, dict):
            report.append(f"row {index}: not a JSON object")
            continue
        messages = row.get(columns.messages) or []
        contents = [str(message.get(columns.content_tag, "")) if isinstance(message, dict) else "" for message in messages]
        images = {}
        for column, key in columns.images.items():
            value = row.get(key) if key else None
            value = [value] if isinstance(value, str) else value  # one path, as LLaMA-Factory reads it
            images[column] = [resolve_media(v, media_dir) for v in value] if isinstance(value, list) else value
        masks = row.get(columns.masks) if columns.masks else None
        if isinstance(masks, list):
            masks = [resolve_media(v, media_dir) for v in masks]
        problems = check_row(contents, images, row.get(columns.boxes) if columns.boxes else None, masks,
                             columns.box_units)[0]
        if problems:
            report.append(f"row {index}: " + "; ".join(problems))
    return report
