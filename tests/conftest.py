"""Shared fixtures: one tiny VPT checkpoint per test session, built offline from a seed."""

import pytest
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

import vpt_plugin  # noqa: F401  (registers the Auto classes)
from vpt_plugin.branches import get_branch
from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.conversation import collate, encode_conversation
from vpt_plugin.tiny import build_tiny_base, tiny_encoder_configs
from vpt_plugin.vocabulary import GRID_SIZE, REENCODING_PROMPT, REGION_PROMPT, region_sequence


def shape_image(cell: tuple[int, int], colour: str, size: int = 224) -> Image.Image:
    """A grey image with a small coloured square in one cell of the 8x8 grid."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    step = size // GRID_SIZE
    x, y = cell
    ImageDraw.Draw(image).rectangle([x * step + 2, y * step + 2, (x + 1) * step - 3, (y + 1) * step - 3], fill=colour)
    return image


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"), seed=0)


@pytest.fixture(scope="session")
def tiny_vpt_dir(tiny_base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-vpt")
    return init_vpt_checkpoint(str(tiny_base_dir), out, ["dino", "sam", "clip"], encoder_configs=tiny_encoder_configs())


@pytest.fixture
def processor(tiny_vpt_dir):
    return AutoProcessor.from_pretrained(tiny_vpt_dir)


@pytest.fixture
def model(tiny_vpt_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vpt_dir).eval()
    model.config.para_mask_id = 0  # deterministic unless a test turns para masking on
    return model


def reencoding_example(processor, config, branch, colour="red", answer=None, cell=(5, 2), question="What colour is the square? "):
    image = shape_image(cell, colour)
    answer = answer or colour
    tokens = get_branch(branch).tokens
    messages = [
        {"role": "user", "content": f"<image>{question}{REENCODING_PROMPT}"},
        {"role": "assistant", "content": tokens.action_sequence},
        {"role": "user", "content": tokens.placeholder},
        {"role": "assistant", "content": answer},
    ]
    return encode_conversation(processor, config, messages, [image], {branch: [image]})


def region_example(processor, config, answer="blue"):
    image = shape_image((1, 6), answer)
    messages = [
        {"role": "user", "content": f"<image>Which colour? {REGION_PROMPT}"},
        {"role": "assistant", "content": region_sequence([1], [6])},
        {"role": "user", "content": "<image>"},
        {"role": "assistant", "content": answer},
    ]
    return encode_conversation(processor, config, messages, [image, image.crop((0, 140, 84, 224))])


def batch_of(processor, examples):
    return collate(examples, processor.tokenizer.pad_token_id)
