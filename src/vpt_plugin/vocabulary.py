"""The Visual Perception Token vocabulary: the one module that spells a VPT token.

The strings are exactly those of the released checkpoints and data
(``shared/design/method.md`` section 1). Everything else, the model included, reads
token ids from the config or asks this module for strings.
"""

import re
from dataclasses import dataclass

GRID_SIZE = 8  # Region Selection boxes live on a fixed 8x8 grid over the image.

REGION_START = "<|region_token_start|>"
REGION_END = "<|region_token_end|>"
X_TOKENS = tuple(f"<|x_{i}|>" for i in range(GRID_SIZE))
Y_TOKENS = tuple(f"<|y_{i}|>" for i in range(GRID_SIZE))
# A grid token in text, any index (the data checks name indices outside the grid).
GRID_TOKEN_PATTERN = re.compile(r"<\|([xy])_(\d+)\|>")

# Chat-turn delimiters of the Qwen2-VL template; para masking counts turns by them.
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
# Around every image's pad tokens, the base's and each branch's.
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# PerceptionGPT's continuous perception token (box_heads.py): its hidden state carries one box. Inside a
# region (REGION_START, BOX_TOKEN, REGION_END) it is a continuous Region Selection; elsewhere a box
# given in the question or written as an answer.
BOX_TOKEN = "<|perception_box|>"

# Dataset placeholder of the base model's own image input.
IMAGE_PLACEHOLDER = "<image>"

# The published prompts that ask for a kind of token (method.md section 4).
REGION_PROMPT = "Identify the region that can help you answer the question, and then answer the question"
REENCODING_PROMPT = "Require additional perception features, and then answer the question"


@dataclass(frozen=True)
class BranchTokens:
    """The tokens, placeholder and config keys of one Vision Re-Encoding branch.

    ``prefix`` is the name the released tokens and config fields use for the branch
    (``detection`` for DINOv2, ``seg`` for SAM, ``clip`` for the model's own ViT).
    """

    prefix: str

    @property
    def action_start(self) -> str:
        return f"<|{self.prefix}_action_start|>"

    @property
    def action(self) -> str:
        return f"<|{self.prefix}_action|>"

    @property
    def action_end(self) -> str:
        return f"<|{self.prefix}_action_end|>"

    @property
    def image_pad(self) -> str:
        return f"<|{self.prefix}_image_pad|>"

    @property
    def placeholder(self) -> str:
        return f"<{self.prefix}_image>"

    @property
    def action_sequence(self) -> str:
        """What the model writes to ask this branch for a second look."""
        return self.action_start + self.action + self.action_end

    # Config fields holding the token ids, as the released config.json files name them.
    @property
    def image_token_id_key(self) -> str:
        return f"{self.prefix}_image_token_id"

    @property
    def action_id_key(self) -> str:
        return f"{self.prefix}_action_id"

    @property
    def action_start_id_key(self) -> str:
        return f"{self.prefix}_action_start_id"

    @property
    def config_id_keys(self) -> dict[str, str]:
        """Config field -> token string, for every id the model reads."""
        return {
            self.image_token_id_key: self.image_pad,
            self.action_id_key: self.action,
            self.action_start_id_key: self.action_start,
        }


def region_tokens() -> list[str]:
    """Region Selection tokens, in the order the released recipes add them."""
    return [REGION_START, REGION_END, *X_TOKENS, *Y_TOKENS]


def new_tokens(prefixes: list[str], box_token: bool = False) -> tuple[list[str], list[str]]:
    """Tokens a VPT checkpoint adds for the given branch prefixes (and the perception box token).

    Returns ``(ordinary, special)``: region, action and box tokens are ordinary added
    tokens; the branch image pads are added special tokens (as released).
    """
    ordinary = region_tokens() + ([BOX_TOKEN] if box_token else [])
    special = []
    for prefix in prefixes:
        tokens = BranchTokens(prefix)
        ordinary += [tokens.action_start, tokens.action, tokens.action_end]
        special.append(tokens.image_pad)
    return ordinary, special


def region_sequence(x_indices: list[int], y_indices: list[int]) -> str:
    """The token text of a region, e.g. ``<|region_token_start|><|x_2|><|y_5|>...``."""
    for axis, indices in (("x", x_indices), ("y", y_indices)):
        bad = [i for i in indices if not 0 <= i < GRID_SIZE]
        if bad:
            raise ValueError(f"grid {axis} index {bad[0]} is outside 0..{GRID_SIZE - 1}")
    body = "".join(X_TOKENS[x] + Y_TOKENS[y] for x, y in zip(x_indices, y_indices))
    return REGION_START + body + REGION_END


def continuous_region_sequence(count: int = 1) -> str:
    """The token text of ``count`` continuous regions: each one box token between the region delimiters."""
    return (REGION_START + BOX_TOKEN + REGION_END) * count


def grid_box(x_indices: list[int], y_indices: list[int]) -> tuple[int, int, int, int]:
    """The grid box ``(x_min, y_min, x_max, y_max)`` spanned by the indices found."""
    if not x_indices or not y_indices:
        raise ValueError("a region needs at least one x and one y index")
    return min(x_indices), min(y_indices), max(x_indices), max(y_indices)


def crop_pixels(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel crop ``(left, top, right, bottom)`` of a grid box, as the released evaluation cuts it.

    The box is widened by one cell on each side (clamped to the grid), then runs from
    ``min * W / 8`` to ``(max + 1) * W / 8`` (likewise for y), truncated to integers.
    """
    x_min, y_min, x_max, y_max = box
    x_min, y_min = max(x_min - 1, 0), max(y_min - 1, 0)
    x_max, y_max = min(x_max + 1, GRID_SIZE - 1), min(y_max + 1, GRID_SIZE - 1)
    cell_w, cell_h = width / GRID_SIZE, height / GRID_SIZE
    return int(x_min * cell_w), int(y_min * cell_h), int((x_max + 1) * cell_w), int((y_max + 1) * cell_h)


def grid_indices_in_text(text: str) -> tuple[list[int], list[int]]:
    """The x and y grid indices written in ``text`` (e.g. a region's token text), in order."""
    found = GRID_TOKEN_PATTERN.findall(text)
    return [int(i) for axis, i in found if axis == "x"], [int(i) for axis, i in found if axis == "y"]


def grid_indices_from_ids(token_ids: list[int], tokenizer) -> tuple[list[int], list[int]]:
    """The x and y grid indices among ``token_ids`` (ids of one region, start/end excluded)."""
    x_ids = {tokenizer.convert_tokens_to_ids(t): i for i, t in enumerate(X_TOKENS)}
    y_ids = {tokenizer.convert_tokens_to_ids(t): i for i, t in enumerate(Y_TOKENS)}
    xs = [x_ids[t] for t in token_ids if t in x_ids]
    ys = [y_ids[t] for t in token_ids if t in y_ids]
    return xs, ys


def region_ids(x_indices: list[int], y_indices: list[int], tokenizer) -> list[int]:
    """Token ids of a region written on the grid (the inverse of :func:`grid_indices_from_ids`)."""
    return tokenizer.convert_tokens_to_ids(_split_tokens(region_sequence(x_indices, y_indices)))


def _split_tokens(sequence: str) -> list[str]:
    return [part + "|>" for part in sequence.split("|>") if part]
