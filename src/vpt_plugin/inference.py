"""Ask a VPT model questions from Python: load, answer in batches, draw the regions it chose.

    from vpt_plugin.inference import load_vpt_model, answer_questions, draw_regions
    model, processor = load_vpt_model("outputs/demo/clip_vpt")
    [answer] = answer_questions(model, processor, [("photo.jpg", "What is on the sign?")])
    answer.text, answer.trace          # the final answer; the perception the model used
    draw_regions(answer.image, answer.trace).save("regions.png")
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from .box_heads import box_crop_pixels, runs_to_mask
from .conversation import collate_prompts, encode_conversation
from .dataset import open_image
from .generation import PerceptionInputs, rgb
from .vocabulary import IMAGE_PLACEHOLDER


@dataclass
class Answer:
    text: str
    trace: dict
    image: Image.Image | None


def load_vpt_model(path: str, device: str | None = None, dtype: torch.dtype | str = "auto"):
    """A VPT checkpoint (directory or hub id) and its processor, in eval mode."""
    import vpt_plugin  # noqa: F401  (registers the Auto classes)

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    if device:
        model = model.to(device)
    return model.eval(), AutoProcessor.from_pretrained(path)


# What ``answer_questions`` generates with unless told otherwise (the evaluation records these).
DEFAULT_GENERATION = {"do_sample": False, "max_new_tokens": 128, "max_perception_rounds": 1}


def limit_pixels(image: Image.Image, max_pixels: int | None = None, min_pixels: int | None = None) -> Image.Image:
    """Resize keeping the aspect ratio so ``min_pixels <= width * height <= max_pixels`` (LLaMA-Factory's rule)."""
    image = rgb(image)
    area = image.width * image.height
    if max_pixels and area > max_pixels:
        factor = math.sqrt(max_pixels / area)
    elif min_pixels and area < min_pixels:
        factor = math.sqrt(min_pixels / area)
    else:
        return image
    return image.resize((max(int(image.width * factor), 1), max(int(image.height * factor), 1)))


def answer_questions(model, processor, items, batch_size: int = 8, allow_perception: bool = True,
                     image_max_pixels: int | None = None, progress: bool = False, **generation) -> list[Answer]:
    """Answer ``(image, question)`` pairs (image: PIL, path, or None) with the one-call VPT loop.

    The question is the first user turn, as in the released test splits; an ``<image>`` in it
    marks where the image goes (default: before the question). A question with ``<|perception_box|>``
    tokens (box heads) comes as ``(image, question, boxes)``: one normalised ``[x0, y0, x1, y1]`` per
    token. ``generation``: settings for ``generate`` (``max_new_tokens``, ``do_sample``, ...); greedy by default.
    """
    prepare = partial(limit_pixels, max_pixels=image_max_pixels)
    perception = PerceptionInputs(processor, prepare_image=prepare)
    generation = {**DEFAULT_GENERATION, **generation}
    answers = []
    batches = range(0, len(items), batch_size)
    for start in tqdm(batches, desc="answering", disable=not progress):
        chunk = items[start : start + batch_size]
        images = [open_image(image) if isinstance(image, str) else image for image, *_ in chunk]
        boxes = [item[2] if len(item) > 2 else None for item in chunk]
        answers += _answer_batch(model, perception, images, [item[1] for item in chunk], boxes, allow_perception,
                                 generation)
    return answers


def _answer_batch(model, perception: PerceptionInputs, images, questions, boxes, allow_perception,
                  generation) -> list[Answer]:
    processor = perception.processor
    encoded = []
    for image, question, question_boxes in zip(images, questions, boxes):
        if image is not None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + question
        shown = [perception.prepare_image(image)] if image is not None else None
        messages = [{"role": "user", "content": question}]
        encoded.append(encode_conversation(processor, model.config, messages, images=shown, add_generation_prompt=True,
                                           boxes=question_boxes))
    inputs = collate_prompts(encoded, processor.tokenizer.pad_token_id)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, processor=perception, vpt_images=images, allow_perception=allow_perception,
                         return_dict_in_generate=True, **generation)
    texts = processor.tokenizer.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [Answer(text.strip(), trace, image) for text, trace, image in zip(texts, out.traces, images)]


def draw_regions(image: Image.Image, trace: dict, colour: str = "red") -> Image.Image:
    """A copy of ``image`` with every region the model chose (its crop, in pixels) and every box it
    answered with (``<|perception_box|>``, decoded) drawn, over each answer mask (mask decoder) shaded."""
    drawn = rgb(image).copy()
    for runs in trace.get("answer_masks", []):
        mask = Image.fromarray(runs_to_mask(runs).numpy().astype("uint8") * 96).resize(drawn.size)
        drawn.paste(Image.new("RGB", drawn.size, colour), (0, 0), mask)
    pen = ImageDraw.Draw(drawn)
    width = max(2, min(drawn.size) // 100)
    labelled = []
    for perception_round in trace.get("rounds", []):
        labelled += [(f"region {i}", box) for i, box in enumerate(perception_round.get("pixel_boxes", []))]
    for i, box in enumerate(trace.get("answer_boxes", [])):
        labelled.append((f"box {i}", box_crop_pixels(box, *drawn.size)))
    for label, box in labelled:
        pen.rectangle(box, outline=colour, width=width)
        pen.text((box[0] + width + 1, box[1] + width), label, fill=colour)
    return drawn
