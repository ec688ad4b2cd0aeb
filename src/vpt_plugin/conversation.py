"""Turn a VPT conversation (released data format) into model inputs, without LLaMA-Factory.

Placeholders expand as the published data pipeline expands them: ``<image>`` and each
branch placeholder become ``<|vision_start|>`` + one pad token per feature token +
``<|vision_end|>``. Turns are laid out as the base's LLaMA-Factory template lays them out
(with its default system turn, if it has one). Only assistant turns carry labels.
"""

import torch

from .bases import get_base
from .branches import BRANCHES, VPTInputError
from .modeling_vpt import IGNORE_INDEX
from .perception import questions_for_images
from .vocabulary import BOX_TOKEN, IMAGE_PLACEHOLDER, TURN_END, TURN_START, VISION_END, VISION_START


def expand_placeholders(text: str, placeholder: str, pad_token: str, counts: list[int], where: str) -> tuple[str, int]:
    """Replace each ``placeholder`` in ``text`` by its pad tokens; returns the text and images used."""
    used = 0
    while placeholder in text:
        if used >= len(counts):
            raise VPTInputError(f"{where}: more {placeholder} placeholders than images left for them ({len(counts)})")
        text = text.replace(placeholder, VISION_START + pad_token * counts[used] + VISION_END, 1)
        used += 1
    return text, used


def encode_conversation(processor, config, messages: list[dict], images=None, branch_images=None, where="example",
                        add_generation_prompt=False, boxes=None):
    """One conversation -> ``input_ids``, ``labels`` and the visual inputs of its images.

    ``branch_images`` maps a branch name to its PIL images (``clip_images`` etc. in the data).
    ``boxes``: one normalised ``(x0, y0, x1, y1)`` per ``<|perception_box|>`` in the messages, in order.
    ``add_generation_prompt``: end with ``<|im_start|>assistant\n``, for generation.
    """
    tokenizer = processor.tokenizer
    placements = []  # (placeholder, pad token, counts)
    visual_inputs = {}
    if images:
        out = processor.image_processor(images=images, return_tensors="pt")
        merge = config.vision_config.spatial_merge_size
        visual_inputs.update(pixel_values=out.pixel_values, image_grid_thw=out.image_grid_thw)
        placements.append((IMAGE_PLACEHOLDER, "<|image_pad|>", (out.image_grid_thw.prod(-1) // merge**2).tolist()))
    for name, branch_list in (branch_images or {}).items():
        if not branch_list:
            continue
        branch = BRANCHES[name]
        if not branch.text_conditioned:  # those read their questions from the ids, below
            visual_inputs.update(branch.preprocess(branch_list, processor))
        counts = branch.feature_tokens(config, branch_list, processor)
        placements.append((branch.tokens.placeholder, branch.tokens.image_pad, counts))

    default_system = get_base(config.model_type).default_system
    if messages[0]["role"] != "system" and default_system is not None:
        messages = [{"role": "system", "content": default_system}, *messages]
    input_ids, labels = [], []
    used = {placeholder: 0 for placeholder, _, _ in placements}
    for turn, message in enumerate(messages):
        content = message["content"]
        for placeholder, pad, counts in placements:
            content, n = expand_placeholders(content, placeholder, pad, counts[used[placeholder]:], f"{where}, turn {turn}")
            used[placeholder] += n
        head = tokenizer.encode(f"{TURN_START}{message['role']}\n", add_special_tokens=False)
        body = tokenizer.encode(f"{content}{TURN_END}", add_special_tokens=False)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        input_ids += head + body + newline
        target = body if message["role"] == "assistant" else [IGNORE_INDEX] * len(body)
        labels += [IGNORE_INDEX] * len(head) + target + [IGNORE_INDEX] * len(newline)
    if add_generation_prompt:
        header = tokenizer.encode(f"{TURN_START}assistant\n", add_special_tokens=False)
        input_ids += header
        labels += [IGNORE_INDEX] * len(header)
    for placeholder, _, counts in placements:
        if used[placeholder] != len(counts):
            raise VPTInputError(f"{where}: {len(counts)} images for {placeholder} but {used[placeholder]} placeholders")
    for name, branch_list in (branch_images or {}).items():
        branch = BRANCHES[name]
        if branch_list and branch.text_conditioned:
            questions = questions_for_images(input_ids, branch.tokens.image_pad, tokenizer)
            visual_inputs.update(branch.preprocess(branch_list, processor, questions))
    box_tokens = sum(str(message["content"]).count(BOX_TOKEN) for message in messages)
    if box_tokens != len(boxes or []):
        raise VPTInputError(f"{where}: {box_tokens} {BOX_TOKEN} tokens but {len(boxes or [])} boxes")
    if boxes:
        visual_inputs["boxes"] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"input_ids": input_ids, "labels": labels, **visual_inputs}


def collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad token sequences and concatenate each visual input across examples."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.tensor([e["input_ids"] + [pad_token_id] * (length - len(e["input_ids"])) for e in examples]),
        "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * (length - len(e["labels"])) for e in examples]),
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in examples]),
    }
    visual_keys = {key for e in examples for key in e if key not in batch}
    for key in sorted(visual_keys):
        batch[key] = torch.cat([e[key] for e in examples if key in e])
    return batch


def collate_prompts(prompts: list[dict], pad_token_id: int) -> dict:
    """Left-pad generation prompts (``encode_conversation(..., add_generation_prompt=True)``) into a batch."""
    length = max(len(p["input_ids"]) for p in prompts)
    batch = {
        "input_ids": torch.tensor([[pad_token_id] * (length - len(p["input_ids"])) + p["input_ids"] for p in prompts]),
        "attention_mask": torch.tensor([[0] * (length - len(p["input_ids"])) + [1] * len(p["input_ids"]) for p in prompts]),
    }
    with_image = [p for p in prompts if "pixel_values" in p]
    if with_image:
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in with_image])
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_image])
    with_boxes = [p["boxes"] for p in prompts if "boxes" in p]
    if with_boxes:
        batch["boxes"] = torch.cat(with_boxes)  # row-major, as the prompts' box tokens are
    return batch
