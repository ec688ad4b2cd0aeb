"""What a generated token sequence asks for, and the conversation turn that answers it.

Shared by the one-call generation loop and the two-round reference flow, so both read the
model's tokens and lay out the second round exactly alike (method.md section 4, as the
published evaluation does):
- region tokens: the round-1 text stays as the assistant turn; the next user turn holds
  the crop (``<image>``; with several regions one ``Region i: <image>`` line each). A region
  is six grid tokens, or one ``<|perception_box|>`` (continuous Region Selection, box_heads.py),
  whose decoded box is cropped;
- ``<|B_action_start|>``: the assistant turn becomes ``<|B_action_start|><|B_action|><|B_action_end|>``
  and the next user turn holds ``<B_image>`` of the same image.

Malformed sequences never raise; they end in a defined result (the round-1 text is the
answer) and say why in ``Perception.problem``:
- a region start without its end, a region holding anything but grid tokens, or a region
  with only x (or only y) indices is skipped; the other regions of the turn still count;
- two kinds at once (regions and an action, actions of two branches, grid and continuous
  regions) are not acted on;
- an action for a branch the model lacks (or an alignment-stage model) is not acted on.
An index outside the 8x8 grid cannot be written: only ``<|x_0|>``..``<|x_7|>`` are tokens.
"""

import re
from dataclasses import dataclass, field

from .box_heads import box_crop_pixels
from .branches import BRANCHES, get_branch
from .vocabulary import (
    REENCODING_PROMPT,
    REGION_END,
    REGION_PROMPT,
    REGION_START,
    TURN_END,
    TURN_START,
    VISION_END,
    VISION_START,
    X_TOKENS,
    Y_TOKENS,
    crop_pixels,
    grid_box,
)

REGION = "region"


@dataclass(frozen=True)
class PerceptionVocabulary:
    """Token ids the generation loop reads and writes, from the model config and its tokenizer."""

    region_start: int
    region_end: int
    grid_x: dict  # token id -> x index
    grid_y: dict  # token id -> y index
    action_start: dict  # token id -> branch name
    action: dict  # branch name -> id of <|B_action|>
    action_end: dict  # branch name -> id of <|B_action_end|>
    image_pad: int
    turn_end: int
    box: int | None = None  # <|perception_box|>, for a model with box heads

    @classmethod
    def from_model(cls, config, tokenizer) -> "PerceptionVocabulary":
        def token_id(token):
            found = tokenizer.convert_tokens_to_ids(token)
            return None if found is None or found == tokenizer.unk_token_id else found

        action_start, action, action_end = {}, {}, {}
        for name, branch in BRANCHES.items():
            ids = config.branch_ids(name)
            end = token_id(branch.tokens.action_end)
            if ids["action_start"] is not None and ids["action"] is not None and end is not None:
                action_start[ids["action_start"]] = name
                action[name] = ids["action"]
                action_end[name] = end
        return cls(
            region_start=token_id(REGION_START),
            region_end=token_id(REGION_END),
            grid_x={token_id(t): i for i, t in enumerate(X_TOKENS) if token_id(t) is not None},
            grid_y={token_id(t): i for i, t in enumerate(Y_TOKENS) if token_id(t) is not None},
            action_start=action_start,
            action=action,
            action_end=action_end,
            image_pad=config.image_token_id,
            turn_end=token_id(TURN_END),
            box=config.box_token_id if getattr(config, "box_heads", False) else None,
        )

    def perception_starts(self) -> list[int]:
        """Tokens that begin a request for perception (suppressed when perception is off)."""
        return [i for i in (self.region_start, *self.action_start) if i is not None]


@dataclass
class Perception:
    """What one assistant turn asks for.

    ``kind``: ``"region"``, a branch name, or None (the turn is the answer). ``grid_boxes``:
    the regions' grid boxes ``(x_min, y_min, x_max, y_max)``; ``boxes``: continuous regions'
    decoded boxes, normalised. ``problem``: why tokens the turn holds were not (all) acted on, or None.
    """

    kind: str | None
    grid_boxes: list = field(default_factory=list)
    problem: str | None = None
    boxes: list = field(default_factory=list)


def read_perception(token_ids: list[int], vocab: PerceptionVocabulary, branches: list[str], two_pass: bool,
                    decoded_boxes: list | None = None) -> Perception:
    """Parse one generated assistant turn (token ids) into the perception it asks for.

    ``branches``: the model's branches; ``two_pass``: whether it can re-encode with control
    (``num_inner_forward_run == 2``); ``decoded_boxes``: the box decoded for each
    ``<|perception_box|>`` of the turn, in order.
    """
    box_positions = [i for i, t in enumerate(token_ids) if vocab.box is not None and t == vocab.box]
    box_of = dict(zip(box_positions, decoded_boxes or []))
    boxes, continuous, problems = [], [], []
    position, number = 0, 0
    while position < len(token_ids):
        if token_ids[position] != vocab.region_start:
            position += 1
            continue
        try:
            end = token_ids.index(vocab.region_end, position + 1)
        except ValueError:
            problems.append(f"region {number} starts but never ends")
            break
        inside = token_ids[position + 1 : end]
        if vocab.box is not None and inside == [vocab.box] and position + 1 in box_of:
            continuous.append(box_of[position + 1])
            number += 1
            position = end + 1
            continue
        xs = [vocab.grid_x[t] for t in inside if t in vocab.grid_x]
        ys = [vocab.grid_y[t] for t in inside if t in vocab.grid_y]
        if len(xs) + len(ys) != len(inside):
            problems.append(f"region {number} holds tokens other than grid indices")
        elif not xs or not ys:
            problems.append(f"region {number} has no {'x' if not xs else 'y'} index")
        else:
            boxes.append(grid_box(xs, ys))
        number += 1
        position = end + 1

    actions = list(dict.fromkeys(vocab.action_start[t] for t in token_ids if t in vocab.action_start))
    if boxes and continuous:
        problems.append("grid and continuous regions at once; the turn is the answer")
        return Perception(None, problem="; ".join(problems))
    kinds = ([REGION] if boxes or continuous else []) + actions
    if len(kinds) > 1:
        problems.append(f"two kinds of perception at once ({', '.join(kinds)}); the turn is the answer")
        return Perception(None, problem="; ".join(problems))
    if actions:
        name = actions[0]
        if name not in branches:
            problems.append(f"asks for branch {name!r}, which this model lacks ({branches})")
        elif not two_pass:
            problems.append(f"asks for branch {name!r}, but the model is alignment-stage (one pass)")
        else:
            return Perception(name, problem="; ".join(problems) or None)
        return Perception(None, problem="; ".join(problems))
    if boxes or continuous:
        return Perception(REGION, boxes, problem="; ".join(problems) or None, boxes=continuous)
    return Perception(None, problem="; ".join(problems) or None)


def crop_boxes(perception: Perception, width: int, height: int, margin: float = 0.0,
               grid: int = 0) -> list[tuple[int, int, int, int]]:
    """Pixel crops ``(left, top, right, bottom)`` of a region perception's boxes (grid boxes widened
    by a cell, as published; continuous boxes widened by ``margin`` times their size, snapped to ``grid``)."""
    if perception.boxes:
        return [box_crop_pixels(box, width, height, margin, grid) for box in perception.boxes]
    return [crop_pixels(box, width, height) for box in perception.grid_boxes]


def vision_span(pad_token: str, count: int) -> str:
    return VISION_START + pad_token * count + VISION_END


# The published instructions that ask for perception; a question read by a branch leaves them out.
_INSTRUCTIONS = re.compile("|".join(re.escape(prompt) + r"\.?" for prompt in (REGION_PROMPT, REENCODING_PROMPT)))


def question_before(token_ids: list[int], position: int, tokenizer) -> str:
    """The question a text-conditioned branch reads for an image at ``position`` of ``token_ids``.

    The text of the nearest user turn starting before ``position`` that has words once its images
    and the perception instructions are left out: in a released-style row the branch image's own
    turn holds only the image, so this is the question that asked for it; in an alignment row,
    the instruction beside the image. Empty if no user turn has words.
    """
    turn_start, turn_end, vision_start, vision_end = tokenizer.convert_tokens_to_ids(
        [TURN_START, TURN_END, VISION_START, VISION_END])
    starts = [i for i, token in enumerate(token_ids[:position]) if token == turn_start]
    for start in reversed(starts):
        end = next((i for i in range(start + 1, len(token_ids)) if token_ids[i] == turn_end), len(token_ids))
        kept, in_image = [], False
        for token in token_ids[start + 1 : end]:
            in_image = (in_image or token == vision_start) and token != vision_end
            if not in_image and token != vision_end:
                kept.append(token)
        role, _, content = tokenizer.decode(kept, skip_special_tokens=False).partition("\n")
        content = " ".join(_INSTRUCTIONS.sub(" ", content).split())
        if role == "user" and content:
            return content
    return ""


def questions_for_images(token_ids: list[int], pad_token: str, tokenizer) -> list[str]:
    """:func:`question_before` each image whose pad tokens are ``pad_token``, in order."""
    vision_start, pad = tokenizer.convert_tokens_to_ids([VISION_START, pad_token])
    return [question_before(token_ids, i, tokenizer) for i in range(len(token_ids) - 1)
            if token_ids[i] == vision_start and token_ids[i + 1] == pad]


def region_turn_content(pad_counts: list[int]) -> str:
    """The user turn that shows the crops: ``<image>``, or ``Region i: <image>`` lines (published layout)."""
    if len(pad_counts) == 1:
        return vision_span("<|image_pad|>", pad_counts[0])
    return "".join(f"Region {i}: {vision_span('<|image_pad|>', n)}\n" for i, n in enumerate(pad_counts))


def branch_turn_content(name: str, pad_count: int) -> str:
    """The user turn that shows the branch's re-encoding of the image (``<B_image>``)."""
    return vision_span(get_branch(name).tokens.image_pad, pad_count)


def assistant_turn_text(perception: Perception, round_text: str) -> str:
    """The assistant turn round 2 replays: the round-1 text for regions, the action sequence for a branch."""
    if perception.kind == REGION:
        return round_text
    return get_branch(perception.kind).tokens.action_sequence


def next_turn_ids(tokenizer, assistant_text: str, user_content: str) -> list[int]:
    """Ids of ``assistant_text<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``.

    Each turn is one string to the tokenizer, as LLaMA-Factory's Qwen2-VL template encodes it.
    """
    assistant = tokenizer.encode(f"{assistant_text}{TURN_END}\n", add_special_tokens=False)
    user = tokenizer.encode(
        f"{TURN_START}user\n{user_content}{TURN_END}\n{TURN_START}assistant\n", add_special_tokens=False
    )
    return assistant + user
