"""PerceptionGPT's continuous perception token: the heads that carry a box in one token (perceptiongpt.md).

The LLM writes ``<|perception_box|>`` (:data:`vpt_plugin.vocabulary.BOX_TOKEN`) for a box. The box
decoder reads the box from the hidden state just before the token (the one that predicts it);
the box encoder makes the token's input embedding from a box, wherever one is given (question,
teacher-forced answer) or was decoded (generation). Boxes are normalised ``(x0, y0, x1, y1)`` in
``[0, 1]`` of the image.

Losses: ``w_box * (L1 + GIoU)`` between decoded and target boxes, in sequence order, no matching;
with the mask decoder, ``w_mask * (BCE + Dice)`` where the data gives the box's mask.
"""

import math
from types import SimpleNamespace

import torch
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPositionalEmbedding


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for i, (size_in, size_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(size_in, size_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BoxHeads(nn.Module):
    """The box decoder (hidden -> 512 -> 512 -> 4, sigmoid) and the box encoder (4 -> 512 -> 512 -> hidden)."""

    def __init__(self, hidden_size: int, head_size: int = 512):
        super().__init__()
        self.decoder = _mlp([hidden_size, head_size, head_size, 4])
        self.encoder = _mlp([4, head_size, head_size, hidden_size])

    def reset_parameters(self) -> None:
        """Fresh heads: PyTorch's default Linear init, the decoder's last layer zero, so the first
        decoded box is the centre point (0.5, 0.5, 0.5, 0.5), as the published heads start."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def decode(self, states: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(n, hidden)`` -> boxes ``(n, 4)`` in [0, 1]."""
        return torch.sigmoid(self.decoder(states))

    def encode(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes ``(n, 4)`` -> input embeddings ``(n, hidden)``."""
        return self.encoder(boxes)


def ordered(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes with ``x0 <= x1`` and ``y0 <= y1`` (a decoder's four sigmoids need not be ordered)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1), torch.maximum(x0, x1), torch.maximum(y0, y1)], -1)


def box_losses(decoded: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean L1 (per coordinate) and mean GIoU loss of decoded boxes against targets, in order."""
    return {
        "box_l1": nn.functional.l1_loss(decoded, target),
        "box_giou": generalized_box_iou_loss(ordered(decoded), target, reduction="mean"),
    }


def paired_iou(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of each box with its own target (``(n, 4)`` each, any units)."""
    return box_iou(ordered(boxes), targets).diagonal()


def box_crop_pixels(box, width: int, height: int, margin: float = 0.0, grid: int = 0) -> tuple[int, int, int, int]:
    """Pixel crop ``(left, top, right, bottom)`` of a normalised box, widened by ``margin`` times its
    size on each side, clamped to the image and at least one pixel wide and high.

    ``grid`` > 0 snaps the crop to a grid of that many pixels: each side the nearest multiple of it (at
    least one, at most the image's largest multiple of it, or the whole side if shorter), starting at the
    multiple of it, or against the image's far edge, nearest to centring the box. With the base ViT's patch
    x merge size, a crop that reaches the ViT at its own size is not resampled, and a box a few pixels off
    usually gives the same crop; a side may lose up to three quarters of a grid step of the widened box
    (``margin`` gives room).
    """
    if grid < 0:
        raise ValueError(f"box crop grid must be 0 (off) or a number of pixels, got {grid}")
    x0, y0, x1, y1 = ordered(torch.as_tensor(box, dtype=torch.float64)).tolist()
    pad_x, pad_y = margin * (x1 - x0), margin * (y1 - y0)
    left = min(max(int(round((x0 - pad_x) * width)), 0), width - 1)
    top = min(max(int(round((y0 - pad_y) * height)), 0), height - 1)
    right = max(min(int(round((x1 + pad_x) * width)), width), left + 1)
    bottom = max(min(int(round((y1 + pad_y) * height)), height), top + 1)
    if grid:
        left, right = _snapped_span(left, right, width, grid)
        top, bottom = _snapped_span(top, bottom, height, grid)
    return left, top, right, bottom


def _snapped_span(low: int, high: int, size: int, grid: int) -> tuple[int, int]:
    span = min(max(grid, grid * math.floor((high - low) / grid + 0.5)), grid * (size // grid) or size)
    centred = (low + high) / 2 - span / 2
    start = min(max(grid * math.floor(centred / grid + 0.5), 0), size - span)
    if abs(size - span - centred) < abs(start - centred):  # the far edge is not on the grid unless size is
        start = size - span
    return start, start + span


class MaskDecoder(nn.Module):
    """PerceptionGPT's mask decoder: the state that decoded a box prompts a SAM-style decoder
    (transformers' ``SamMaskDecoder``: a depth-2 two-way transformer, conv upsampling x4 and a
    hypernetwork dot product) over the base ViT's features of the row's first image.

    Features are the image's tokens in the LLM hidden size on the ViT's merged grid; the masks come
    out at four times that grid, covering the whole image.
    """

    def __init__(self, hidden_size: int, size: int = 256):
        super().__init__()
        heads = 8 if size % 8 == 0 else 1
        config = SamMaskDecoderConfig(hidden_size=size, mlp_dim=8 * size, num_hidden_layers=2,
                                      num_attention_heads=heads, iou_head_hidden_dim=size)
        config._attn_implementation = "sdpa"
        self.prompt_proj = nn.Linear(hidden_size, size)
        self.feature_proj = nn.Sequential(nn.Linear(hidden_size, size), nn.LayerNorm(size))
        # SAM's random Fourier positions of the feature grid (scale 1, as SAM's prompt encoder).
        self.positions = SamPositionalEmbedding(SimpleNamespace(scale=1.0, num_pos_feats=size // 2))
        self.decoder = SamMaskDecoder(config)

    def reset_parameters(self) -> None:
        """Fresh weights: PyTorch's defaults for every layer, SAM's ``randn`` for the positions."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        # torch.nn.init, which transformers guards so that loaded weights are not re-drawn.
        nn.init.normal_(self.positions.positional_embedding)

    def forward(self, states: torch.Tensor, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """States ``(n, hidden)`` and each one's image features ``(height, width, hidden)`` -> mask
        logits ``(4 * height, 4 * width)`` per state."""
        masks = []
        for state, grid in zip(states, features):
            height, width = grid.shape[:2]
            image = self.feature_proj(grid.to(state.dtype)).permute(2, 0, 1)[None]
            ys = (torch.arange(height, device=grid.device, dtype=torch.float32) + 0.5) / height
            xs = (torch.arange(width, device=grid.device, dtype=torch.float32) + 0.5) / width
            centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None, None]
            positions = self.positions(centres)[0, 0].permute(2, 0, 1)[None].to(image.dtype)
            prompt = self.prompt_proj(state)[None, None, None]
            logits, _ = self.decoder(image, positions, prompt, torch.zeros_like(image), multimask_output=False)
            masks.append(logits[0, 0, 0])
        return masks


def mask_losses(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean per-pixel BCE-with-logits and mean Dice loss of masks against targets (bool, their
    own sizes; the logits are resized to each target bilinearly)."""
    bce, dice = [], []
    for mask_logits, target in zip(logits, targets):
        resized = nn.functional.interpolate(mask_logits[None, None].float(), size=tuple(target.shape),
                                            mode="bilinear", align_corners=False)[0, 0]
        target = target.to(resized)
        bce.append(nn.functional.binary_cross_entropy_with_logits(resized, target))
        probabilities = resized.sigmoid()
        dice.append(1 - (2 * (probabilities * target).sum() + 1) / (probabilities.sum() + target.sum() + 1))
    return {"mask_bce": torch.stack(bce).mean(), "mask_dice": torch.stack(dice).mean()}


def mask_from_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The bool mask ``(height, width) = size`` of mask logits (resized bilinearly, logit > 0)."""
    resized = nn.functional.interpolate(logits[None, None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0, 0] > 0


def mask_to_runs(mask: torch.Tensor) -> dict:
    """A bool mask ``(height, width)`` as run lengths (row-major, alternating off and on, off
    first), compact enough for JSON traces."""
    flat = mask.flatten().to(torch.int8)
    changes = (flat[1:] != flat[:-1]).nonzero().flatten() + 1
    edges = [0, *changes.tolist(), flat.numel()]
    runs = [b - a for a, b in zip(edges, edges[1:])]
    if flat.numel() and flat[0]:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def runs_to_mask(runs: dict) -> torch.Tensor:
    """The bool mask of :func:`mask_to_runs`."""
    values = torch.arange(len(runs["counts"])) % 2 == 1
    return values.repeat_interleave(torch.tensor(runs["counts"])).view(*runs["size"])
