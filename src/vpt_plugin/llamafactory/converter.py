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

import os
from dataclasses import dataclass

from llamafactory.data.converter import SharegptDatasetConverter

from ..dataset import (
    BOXES,
    MAIN_IMAGES,
    MASKS,
    VPTDataError,
    box_entry,
    image_columns,
    placeholders_in,
    row_boxes,
    row_masks,
    row_problems,
    split_crop,
)
from ..vocabulary import BOX_TOKEN

FORMATTING = "vpt_sharegpt"


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
        resolved = []
        for media in medias:
            try:
                file, _ = split_crop(media)
            except VPTDataError:
                file = media
            joined = os.path.join(self.data_args.media_dir, file)
            resolved.append(joined + media[len(file) :] if os.path.isfile(joined) else media)
        return resolved or None

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
        problems = row_problems(contents, images)
        box_column = getattr(self.dataset_attr, BOXES, None)
        box_problems, boxes = row_boxes(contents, example.get(box_column) if box_column else None,
                                        images[MAIN_IMAGES], getattr(self.dataset_attr, "box_units", "normalized"))
        problems += box_problems
        mask_column = getattr(self.dataset_attr, MASKS, None)
        masks = example.get(mask_column) if mask_column else None
        if masks is not None:
            masks = [None if path is None else (self._find_medias([path]) or [path])[0] for path in masks]
        if not box_problems:
            mask_problems, masks = row_masks(masks, len(boxes), images[MAIN_IMAGES])
            problems += mask_problems
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


def branch_columns_for(formatting: str, columns: dict, dataset_name: str) -> dict[str, str | None]:
    """Branch image columns and the box and mask columns a dataset_info.json entry maps (read by the DatasetAttr patch)."""
    branch_columns = {c: columns.get(c) for c in [*image_columns().values(), BOXES, MASKS] if c != MAIN_IMAGES}
    mapped = [column for column, key in branch_columns.items() if key]
    if mapped and formatting != FORMATTING:
        raise ValueError(
            f"dataset_info.json, dataset {dataset_name}: columns {mapped} need `\"formatting\": \"{FORMATTING}\"` "
            f"(found {formatting!r}); other formattings drop branch images"
        )
    return branch_columns
