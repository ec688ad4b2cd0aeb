"""LLaMA-Factory multimodal plugins of the VPT templates: each base's plugin with VPT's branch images.

``vpt_<plugin>`` is the upstream plugin of a base's template (``qwen2_vl``, ``qwen3_vl``) with
:class:`VPTPluginMixin` in front. A row's images arrive as one list in placeholder order (the
``vpt_sharegpt`` converter merges the branch columns into it). The base's own ``<image>`` and
``<video>`` placeholders are expanded by the upstream plugin; each branch placeholder expands, as
the published data pipeline expands it, to ``<|vision_start|>`` + one pad token per feature token +
``<|vision_end|>`` with that branch's ``<|B_image_pad|>``. In a batch, the token ids say which
image is which. A row's boxes (for ``<|perception_box|>`` tokens) follow its images in the list as box
entries; they become the ``boxes`` model input, one per box token of the batch's ids.
"""

import numpy as np
import torch
from llamafactory.data.mm_plugin import PLUGINS

from ..branches import BRANCHES, get_branch
from ..dataset import MAIN_IMAGES, VPTDataError, image_columns, is_box_entry, load_mask, open_image, parse_box_entry, placeholders_in
from ..perception import question_before


def vpt_template_name(template: str) -> str:
    """The VPT twin of a LLaMA-Factory template (``qwen2_vl`` -> ``vpt_qwen2_vl``)."""
    return f"vpt_{template}"


def vpt_plugin_name(plugin: str) -> str:
    """The VPT twin of a LLaMA-Factory multimodal plugin (``qwen3_vl`` -> ``vpt_qwen3_vl``)."""
    return f"vpt_{plugin}"


def vpt_plugin_class(plugin: str) -> type:
    """The upstream multimodal plugin ``plugin`` with :class:`VPTPluginMixin` in front."""
    upstream = PLUGINS[plugin]
    return type(f"VPT{upstream.__name__}", (VPTPluginMixin, upstream), {"__module__": __name__})


def vpt_config_of(processor):
    """The VPT config the model loader attached to the processor (it sets the branch token counts)."""
    config = getattr(processor, "vpt_config", None)
    if config is None:
        raise ValueError(
            "a VPT template (vpt_...) needs a VPT model: `model_name_or_path` is a VPT checkpoint, "
            "or a plain base with `customize_model_class: vpt` and `vision_encoder_ls`"
        )
    return config


class VPTPluginMixin:
    def _regularize_images(self, images, **kwargs):
        # Paths may carry a crop suffix (`a.jpg_x0,y0,x1,y1`); everything else as upstream.
        return super()._regularize_images([open_image(i) if isinstance(i, str) else i for i in images], **kwargs)

    def _clip_resolution(self, processor) -> dict:
        # The clip branch re-encodes with the model's own ViT, at the recipe's image resolution.
        return {
            "image_max_pixels": getattr(processor, "image_max_pixels", 768 * 768),
            "image_min_pixels": getattr(processor, "image_min_pixels", 32 * 32),
        }

    def _branch_images(self, name, images, processor):
        if get_branch(name).has_encoder:
            # Branch encoders resize with their own processors (DINOv2: 224 crop, SAM: 1024 long
            # side), so only the crop and RGB conversion happen here.
            return self._regularize_images(images, image_max_pixels=float("inf"), image_min_pixels=0)["images"]
        return self._regularize_images(images, **self._clip_resolution(processor))["images"]

    def _check_branches(self, kinds, config):
        for kind in set(kinds) - {None}:
            if kind not in config.vision_encoder_ls:
                raise VPTDataError(
                    f"{get_branch(kind).tokens.placeholder} in the data, but the model has no {kind!r} branch "
                    f"(vision_encoder_ls={config.vision_encoder_ls})"
                )

    def process_messages(self, messages, images, videos, audios, processor):
        images = [image for image in images if not is_box_entry(image)]  # box tokens stay as they are
        self._validate_input(processor, images, videos, audios)
        placeholders = [p for message in messages for p in placeholders_in(message["content"])]
        if len(placeholders) != len(images):
            raise VPTDataError(
                f"{len(placeholders)} image placeholder(s) {placeholders} but {len(images)} image(s) in the row"
            )
        kind_of = {placeholder: _branch_of(column) for placeholder, column in image_columns().items()}
        kinds = [kind_of[p] for p in placeholders]
        config = vpt_config_of(processor)
        self._check_branches(kinds, config)

        # The base plugin's own handling of <image> and <video> placeholders, on the base images only.
        base_images = [image for image, kind in zip(images, kinds) if kind is None]
        messages = super().process_messages(messages, base_images, videos, audios, processor)

        counts = {}
        for name in set(kinds) - {None}:
            branch_images = [image for image, kind in zip(images, kinds) if kind == name]
            counts[name] = iter(
                get_branch(name).feature_tokens(config, self._branch_images(name, branch_images, processor), processor)
            )
        for message in messages:
            content = message["content"]
            for name, remaining in counts.items():
                tokens = get_branch(name).tokens
                while tokens.placeholder in content:
                    pads = tokens.image_pad * (next(remaining) if self.expand_mm_tokens else 1)
                    content = content.replace(
                        tokens.placeholder, f"{self.vision_bos_token}{pads}{self.vision_eos_token}", 1
                    )
            message["content"] = content
        return messages

    def get_mm_inputs(self, images, videos, audios, imglens, vidlens, audlens, batch_ids, processor):
        config = vpt_config_of(processor)
        generating = getattr(processor, "vpt_generation", False)
        images, imglens, boxes, masks = self._split_boxes(images, imglens, batch_ids, config, generating)
        self._validate_input(processor, images, videos, audios)
        places = self._image_places(batch_ids, processor, config)
        kinds = [kind for kind, _, _ in places]
        if len(kinds) != len(images):
            raise VPTDataError(f"the batch's token ids hold {len(kinds)} images but {len(images)} were given")
        base_images = [image for image, kind in zip(images, kinds) if kind is None]
        mm_inputs = self._get_mm_inputs(base_images, videos, audios, processor)
        for name in dict.fromkeys(kind for kind in kinds if kind is not None):
            branch = get_branch(name)
            branch_images = [image for image, kind in zip(images, kinds) if kind == name]
            questions = None
            if branch.text_conditioned:
                questions = [question_before(list(batch_ids[row]), position, processor.tokenizer)
                             for kind, row, position in places if kind == name]
            mm_inputs.update(branch.preprocess(self._branch_images(name, branch_images, processor), processor, questions))
        if getattr(processor, "vpt_generation", False):
            mm_inputs.update(self._source_images(images, kinds, imglens))
        if boxes is not None:
            mm_inputs["boxes"] = boxes
        if any(mask is not None for mask in masks):
            mm_inputs["masks"] = [None if path is None else load_mask(path) for path in masks]
        return mm_inputs

    @staticmethod
    def _split_boxes(images, imglens, batch_ids, config, generating: bool):
        """Each row's media list without its box entries, the boxes of the box tokens in ``batch_ids``,
        and each box's mask path (or None).

        A row's first boxes go to its box tokens in order; when generating, the prompt holds only
        the question's box tokens and the answer's boxes are left out. Otherwise every box must have
        its token: a truncation that cut one would shift the others onto the wrong tokens.
        """
        kept, kept_lens, boxes, masks, start = [], [], [], [], 0
        box_token_id = config.box_token_id if config.box_heads else None
        for count, ids in zip(imglens, batch_ids):
            row = images[start : start + count]
            start += count
            media = [image for image in row if not is_box_entry(image)]
            row_boxes, row_masks = [], []
            for entry in filter(is_box_entry, row):
                box, mask = parse_box_entry(entry)
                row_boxes.append(box)
                row_masks.append(mask)
            if any(row_masks) and not config.mask_decoder:
                raise VPTDataError("the data has masks (a `masks` column) but the model has no mask decoder; "
                                   "set the recipe key `mask_decoder: true`")
            if row_boxes and box_token_id is None:
                raise VPTDataError("the data has boxes (a `boxes` column) but the model has no box heads; "
                                   "set the recipe key `box_heads: true`")
            tokens = int(np.sum(np.asarray(ids) == box_token_id)) if box_token_id is not None else 0
            if tokens > len(row_boxes) or (tokens < len(row_boxes) and not generating):
                raise VPTDataError(
                    f"a row holds {tokens} <|perception_box|> tokens but {len(row_boxes)} boxes; if `cutoff_len` "
                    "truncated it, raise cutoff_len"
                )
            kept += media
            kept_lens.append(len(media))
            boxes += row_boxes[:tokens]
            masks += row_masks[:tokens]
        return kept, kept_lens, torch.tensor(boxes, dtype=torch.float32) if boxes else None, masks

    def _source_images(self, images, kinds, imglens) -> dict:
        """Each row's first base image at full resolution, for the crops and branches generation runs.

        As one uint8 tensor ``(rows, H, W, 3)`` (zero-padded) and each row's ``(height, width)``:
        LLaMA-Factory's chat engine turns every model input into a tensor.
        """
        sources, start = [], 0
        for count in imglens:
            row = [image for image, kind in zip(images[start : start + count], kinds[start : start + count]) if kind is None]
            start += count
            found = self._regularize_images(row[:1], image_max_pixels=float("inf"), image_min_pixels=0)["images"]
            sources.append(np.asarray(found[0].convert("RGB")) if found else np.zeros((0, 0, 3), dtype=np.uint8))
        height = max(1, *(s.shape[0] for s in sources))
        width = max(1, *(s.shape[1] for s in sources))
        pixels = np.zeros((len(sources), height, width, 3), dtype=np.uint8)
        for row, source in enumerate(sources):
            pixels[row, : source.shape[0], : source.shape[1]] = source
        sizes = [[s.shape[0], s.shape[1]] for s in sources]
        return {"vpt_images": torch.from_numpy(pixels), "vpt_image_sizes": torch.tensor(sizes)}

    def prepare_for_generation(self, processor):
        """How generation prepares crops and clip images: with this template's resolution options."""
        limits = self._clip_resolution(processor)

        def prepare(image):
            return self._regularize_images([image], **limits)["images"][0]

        return prepare

    def _image_places(self, batch_ids, processor, config) -> list[tuple[str | None, int, int]]:
        """Each image's branch (None: a base image), read from the pad token after each vision start,
        with its row in the batch and the vision start's position."""
        tokenizer = processor.tokenizer
        vision_start = tokenizer.convert_tokens_to_ids(self.vision_bos_token)
        kind_of_pad = {tokenizer.convert_tokens_to_ids(self.image_token): None}
        for name in config.vision_encoder_ls:
            kind_of_pad[config.branch_ids(name)["image"]] = name
        places = []
        for row, ids in enumerate(batch_ids):
            ids = np.asarray(ids)
            starts = np.nonzero(ids[:-1] == vision_start)[0]
            places += [(kind_of_pad[pad], row, int(start)) for start, pad in zip(starts, ids[starts + 1].tolist())
                       if pad in kind_of_pad]
        return places


def _branch_of(column: str) -> str | None:
    if column == MAIN_IMAGES:
        return None
    return next(name for name, branch in BRANCHES.items() if branch.data_column == column)
