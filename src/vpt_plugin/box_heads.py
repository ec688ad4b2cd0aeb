"""PerceptionGPT's continuous perception token: the heads that carry a box in one token (perceptiongpt.md).

The LLM writes ``<|perception_box|>`` (:data:`vpt_plugin.vocabulary.BOX_TOKEN`) for a box. The box
decoder reads the box from the hidden state just before the token (the one that predicts it);
the box encoder makes the token's input embedding from a box, wherever one is given (question,
teacher-forced answer) or was decoded (generation). Boxes are normalised ``(x0, y0, x1, y1)`` in
``[0, 1]`` of the image.

Losses: ``w_box * (L1 + GIoU)`` between decoded and target boxes, in sequence order, no matching.
"""

import torch
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss


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


def box_crop_pixels(box, width: int, height: int, margin: float = 0.0) -> tuple[int, int, int, int]:
    """Pixel crop ``(left, top, right, bottom)`` of a normalised box, widened by ``margin`` times its
    size on each side, clamped to the image and at least one pixel wide and high."""
    x0, y0, x1, y1 = ordered(torch.as_tensor(box, dtype=torch.float64)).tolist()
    pad_x, pad_y = margin * (x1 - x0), margin * (y1 - y0)
    left = min(max(int(round((x0 - pad_x) * width)), 0), width - 1)
    top = min(max(int(round((y0 - pad_y) * height)), 0), height - 1)
    right = max(min(int(round((x1 + pad_x) * width)), width), left + 1)
    bottom = max(min(int(round((y1 + pad_y) * height)), height), top + 1)
    return left, top, right, bottom
