"""``python -m vpt_plugin.demo --model DIR``: one VPT forward/backward on a small mixed batch.

The batch has a row per branch the model has (re-encoding with its action tokens) and a
Region Selection row, so every path of the two-pass forward runs once.
"""

import argparse
import time

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

import vpt_plugin  # noqa: F401  (registers the VPT model with the Auto classes)

from .branches import get_branch
from .conversation import collate, encode_conversation
from .vocabulary import GRID_SIZE, REENCODING_PROMPT, REGION_PROMPT, region_sequence


def shape_image(cell: tuple[int, int], colour: str, size: int = 224) -> Image.Image:
    """A grey image with a small coloured square in one cell of the 8x8 grid."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    step = size // GRID_SIZE
    x, y = cell
    ImageDraw.Draw(image).rectangle([x * step + 2, y * step + 2, (x + 1) * step - 3, (y + 1) * step - 3], fill=colour)
    return image


def demo_examples(processor, config) -> list[dict]:
    image = shape_image((5, 2), "red")
    question = "What colour is the small square? "
    examples = []
    for name in config.vision_encoder_ls:
        tokens = get_branch(name).tokens
        messages = [
            {"role": "user", "content": f"<image>{question}{REENCODING_PROMPT}"},
            {"role": "assistant", "content": tokens.action_sequence},
            {"role": "user", "content": tokens.placeholder},
            {"role": "assistant", "content": "red"},
        ]
        examples.append(
            encode_conversation(processor, config, messages, [image], {name: [image]}, where=f"{name} row")
        )
    region = [
        {"role": "user", "content": f"<image>{question}{REGION_PROMPT}"},
        {"role": "assistant", "content": region_sequence([5, 5], [2, 2])},
        {"role": "user", "content": "<image>"},
        {"role": "assistant", "content": "red"},
    ]
    crop = image.crop((4 * 28, 1 * 28, 7 * 28, 4 * 28))
    examples.append(encode_conversation(processor, config, region, [image, crop], where="region row"))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a VPT checkpoint directory (vpt init)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the para-mask draw")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model)
    model.train()
    config = model.config
    batch = collate(demo_examples(processor, config), processor.tokenizer.pad_token_id)
    print(f"model: {type(model).__name__}, branches {config.vision_encoder_ls}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    print(f"batch: {batch['input_ids'].shape[0]} rows x {batch['input_ids'].shape[1]} tokens "
          f"({', '.join(config.vision_encoder_ls)} re-encoding rows and a region-selection row)")

    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    print(f"two-pass forward/backward (num_inner_forward_run={config.num_inner_forward_run}, "
          f"para_mask_id={config.para_mask_id}): loss {loss.item():.4f} in {time.perf_counter() - start:.2f}s")
    for name in config.vision_encoder_ls:
        projector = model.branch_projector(name)
        norm = torch.norm(torch.stack([p.grad.norm() for p in projector.parameters() if p.grad is not None]))
        print(f"  {get_branch(name).projector_attribute}: gradient norm {norm:.4g}")
    print(f"  input embeddings: gradient norm {model.get_input_embeddings().weight.grad.norm():.4g}")


if __name__ == "__main__":
    main()
