"""``formatting: vpt_sharegpt``: the released VPT data format in LLaMA-Factory.

Sharegpt rows plus branch image columns (``detection_images``, ``seg_images``,
``clip_images``, mapped in dataset_info.json like ``images``). Each row is checked first
(placeholders against images, image files, crop suffixes, grid tokens); a bad row stops
the run before training with the dataset, row index and field. The branch images are then
merged into LLaMA-Factory's one image list, in placeholder order, which is the order the
VPT templates' plugins read them in. A ``boxes`` column (one box per ``<|perception_box|>``, checked
and normalised) follows the images in that list as box entries (``vpt_plugin.dataset.box_entry``),
each carrying its mask's path from a ``masks`` column.
"""

import functools
import logging
from dataclasses import dataclass

from llamafactory.data.converter import SharegptDatasetConverter

from ..dataset import (
    BOXES,
    MAIN_IMAGES,
    MASKS,
    VPTDataError,
    box_entry,
    check_row,
    image_columns,
    placeholders_in,
    resolve_media,
)
from ..vocabulary import BOX_TOKEN

FORMATTING = "vpt_sharegpt"
logger = logging.getLogger(__name__)


@dataclass
class VPTSharegptDatasetConverter(SharegptDatasetConverter):
    # With predict_with_generate a row becomes its question and final answer (the model runs
    # its own perception turns), as the published evaluation's first round; set by the loader patch.
    question_only: bool = False

    def __post_init__(self):
        # Only a VPT template's plugin expands branch placeholders; another one fails later, unclearly.
        from llamafactory.data.template import TEMPLATES

        from .mm_plugin import VPTPluginMixin

        template = TEMPLATES.get(self.data_args.template)
        if template is None or not isinstance(template.mm_plugin, VPTPluginMixin):
            vpt_templates = sorted(name for name, t in TEMPLATES.items() if isinstance(t.mm_plugin, VPTPluginMixin))
            raise VPTDataError(
                f"dataset {self.dataset_attr.dataset_name} (formatting {FORMATTING}): template "
                f"{self.data_args.template!r} cannot lay out VPT rows; use the VPT twin of the base's template, "
                f"one of {vpt_templates}"
            )

    def _find_medias(self, medias):
        # Upstream joins media_dir when the joined path is a file (and warns otherwise); a crop
        # suffix must be split off for that test. Bad suffixes are reported with their row below.
        if self.dataset_attr.load_from not in ("script", "file") or not isinstance(medias, list) or not all(
            isinstance(media, str) for media in medias
        ):
            return super()._find_medias(medias)
        return [resolve_media(media, self.data_args.media_dir) for media in medias] or None

    def __call__(self, example, index=None):
        where = f"dataset {self.dataset_attr.dataset_name}, row {index}"
        columns = {column: getattr(self.dataset_attr, column, None) for column in image_columns().values()}
        # The released files map every image column, but a file may lack some (alignment data has
        # no `images`): a missing column is an empty one.
        example = dict(example)
        for key in [*columns.values(), self.dataset_attr.videos, self.dataset_attr.audios]:
            if key:
                example.setdefault(key, None)
        images = {column: self._find_medias(example[key]) if key else None for column, key in columns.items()}
        messages = example[self.dataset_attr.messages] or []
        contents = [str(message.get(self.dataset_attr.content_tag, "")) for message in messages]
        box_column, mask_column = getattr(self.dataset_attr, BOXES, None), getattr(self.dataset_attr, MASKS, None)
        masks = example.get(mask_column) if mask_column else None
        if isinstance(masks, list):
            masks = [resolve_media(path, self.data_args.media_dir) for path in masks]
        problems, boxes, masks = check_row(contents, images, example.get(box_column) if box_column else None, masks,
                                           getattr(self.dataset_attr, "box_units", "normalized"))
        if problems:
            raise VPTDataError(f"{where}: " + "; ".join(problems))

        if self.question_only:
            kept = self._question_and_answer_boxes(messages, list(zip(boxes, masks)))
            boxes, masks = [box for box, _ in kept], [mask for _, mask in kept]
            example, images = self._question_and_answer(example, images, columns)
        aligned = super().__call__(example)
        queues = {column: list(images[column] or []) for column in images}
        merged = []
        for message in aligned["_prompt"] + aligned["_response"]:
            for placeholder in placeholders_in(message["content"]):
                merged.append(queues[image_columns()[placeholder]].pop(0))
        merged += [box_entry(box, mask) for box, mask in zip(boxes, masks)]
        aligned["_images"] = merged or None
        return aligned

    def _question_and_answer_boxes(self, messages, boxes):
        """The boxes of the first user turn and the final answer (what ``_question_and_answer`` keeps)."""
        tag, content = self.dataset_attr.role_tag, self.dataset_attr.content_tag
        first = next(i for i, m in enumerate(messages) if m[tag] == self.dataset_attr.user_tag)
        counts = [str(m[content]).count(BOX_TOKEN) for m in messages]
        if len(messages) - first <= 2:
            return boxes
        question, answer = sum(counts[: first + 1]), counts[-1]
        return boxes[:question] + (boxes[len(boxes) - answer :] if answer else [])


    def _question_and_answer(self, example, images, columns):
        """The row cut to its first user turn and final answer, with the first turn's images only."""
        messages = example[self.dataset_attr.messages]
        tag, content = self.dataset_attr.role_tag, self.dataset_attr.content_tag
        first = next(i for i, m in enumerate(messages) if m[tag] == self.dataset_attr.user_tag)
        if len(messages) - first <= 2:
            return example, images
        kept = [*messages[: first + 1], messages[-1]]
        used = {column: 0 for column in images}
        for placeholder in placeholders_in(str(messages[first][content])):
            used[image_columns()[placeholder]] += 1
        images = {column: (found or [])[: used[column]] or None for column, found in images.items()}
        example = {**example, self.dataset_attr.messages: kept}
        for column, key in columns.items():
            if key:
                example[key] = (example[key] or [])[: used[column]] or None
        return example, images


def vpt_columns_of(columns: dict) -> dict[str, str | None]:
    """The branch image, box and mask columns a dataset_info.json entry's ``columns`` maps."""
    return {c: columns.get(c) for c in [*image_columns().values(), BOXES, MASKS] if c != MAIN_IMAGES}


def vpt_formatting(formatting: str, vpt_columns: dict[str, str | None], dataset: str) -> str:
    """The formatting to read dataset ``dataset`` (its dataset_info.json key) with.

    The released entries say ``"formatting": "sharegpt"`` and map branch image columns: they are VPT
    data, read as ``vpt_sharegpt`` (with a notice). Any other formatting would drop those columns.
    """
    mapped = [column for column, key in vpt_columns.items() if key]
    if not mapped or formatting == FORMATTING:
        return formatting
    if formatting == "sharegpt":
        _notice_read_as_vpt(dataset, tuple(mapped))
        return FORMATTING
    raise VPTDataError(
        f"dataset_info.json, dataset {dataset}: columns {mapped} need `\"formatting\": \"{FORMATTING}\"` "
        f"(found {formatting!r}), which would drop them"
    )


@functools.cache  # once per entry and run: the loader parses dataset and eval_dataset separately
def _notice_read_as_vpt(dataset: str, mapped: tuple) -> None:
    logger.warning("dataset_info.json, dataset %s: maps %s, so it is read as %s (VPT data)", dataset, list(mapped),
                   FORMATTING)
