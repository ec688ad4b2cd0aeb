import pytest

from vpt_plugin import vocabulary as vocab
from vpt_plugin.branches import BRANCHES


def test_token_strings_are_the_released_ones():
    assert vocab.region_tokens()[:3] == ["<|region_token_start|>", "<|region_token_end|>", "<|x_0|>"]
    assert vocab.region_tokens()[-1] == "<|y_7|>"
    dino = BRANCHES["dino"].tokens
    assert (dino.action_start, dino.action, dino.action_end, dino.image_pad, dino.placeholder) == (
        "<|detection_action_start|>", "<|detection_action|>", "<|detection_action_end|>",
        "<|detection_image_pad|>", "<detection_image>",
    )
    assert BRANCHES["sam"].tokens.image_pad == "<|seg_image_pad|>"
    assert BRANCHES["clip"].tokens.placeholder == "<clip_image>"
    assert BRANCHES["dino"].tokens.config_id_keys == {
        "detection_image_token_id": "<|detection_image_pad|>",
        "detection_action_id": "<|detection_action|>",
        "detection_action_start_id": "<|detection_action_start|>",
    }

def test_new_tokens_split_ordinary_and_special():
    ordinary, special = vocab.new_tokens(["clip"])
    # The order of the released CLIP recipe's new_tokens / new_special_tokens.
    assert ordinary == vocab.region_tokens() + ["<|clip_action_start|>", "<|clip_action|>", "<|clip_action_end|>"]
    assert special == ["<|clip_image_pad|>"]

def test_crop_matches_the_released_evaluation():
    # Box x 2..4, y 5..6 widened by one cell -> x 1..5, y 4..7 on a 640x480 image (cells 80x60).
    box = vocab.grid_box([2, 4], [5, 6])
    assert box == (2, 5, 4, 6)
    assert vocab.crop_pixels(box, 640, 480) == (80, 240, 480, 480)
    # Clamped at the border.
    assert vocab.crop_pixels((0, 0, 7, 7), 100, 100) == (0, 0, 100, 100)
    # Non-integral cell sizes truncate as int() does.
    assert vocab.crop_pixels((3, 3, 3, 3), 100, 100) == (25, 25, 62, 62)

def test_region_ids_round_trip(processor):

    ids = vocab.region_ids([2, 4], [5, 6], processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(ids)[0] == vocab.REGION_START
    assert vocab.grid_indices_from_ids(ids, processor.tokenizer) == ([2, 4], [5, 6])

def test_grid_index_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="grid x index 8"):
        vocab.region_sequence([8], [0])
    with pytest.raises(ValueError, match="at least one x"):
        vocab.grid_box([], [1])
