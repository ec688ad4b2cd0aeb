"""What a base model's own ViT gives, and how per-layer ViT features reach the decoder.

Qwen3-VL feeds features of a few ViT layers into its first decoder layers at the visual
positions (deepstack); Qwen2-VL and Qwen2.5-VL do not. These two containers let the VPT
forward and generation carry those features for every image the model sees (its own images,
region crops, clip-branch images) without knowing which base it runs on.
"""

from dataclasses import dataclass

import torch


@dataclass
class VisionFeatures:
    """What the base model's own ViT gives for some images.

    ``per_image``: each image's tokens in the LLM hidden size. ``layers``: for bases that also
    feed ViT layers into the first decoder layers (Qwen3-VL's deepstack), one tensor per such
    decoder layer holding every image's tokens in order; None for bases without.
    """

    per_image: list[torch.Tensor]
    layers: list[torch.Tensor] | None = None

    def layers_per_image(self) -> list:
        """Each image's per-layer features (a list per image), or None per image for a base without."""
        if self.layers is None:
            return [None] * len(self.per_image)
        split = [layer.split([f.shape[0] for f in self.per_image]) for layer in self.layers]
        return [[layer[i] for layer in split] for i in range(len(self.per_image))]


@dataclass
class DecoderLayerFeatures:
    """Vision features the base adds to the hidden states after its first decoder layers
    (Qwen3-VL's deepstack): ``mask`` (batch, sequence) marks the positions, ``layers[k]`` holds
    their features after decoder layer ``k``, in the mask's (row-major) order."""

    mask: torch.Tensor
    layers: list[torch.Tensor]

    @classmethod
    def merge(cls, sources) -> "DecoderLayerFeatures | None":
        """One set from ``(mask, layers)`` pairs of disjoint positions (images, videos, branch images)."""
        sources = [(mask, layers) for mask, layers in sources if layers is not None]
        if not sources:
            return None
        if len(sources) == 1:
            return cls(*sources[0])
        mask = torch.stack([m for m, _ in sources]).any(dim=0)
        layers = []
        for k in range(len(sources[0][1])):
            joint = sources[0][1][k].new_zeros(int(mask.sum()), sources[0][1][k].shape[-1])
            for source_mask, source_layers in sources:
                joint[source_mask[mask]] = source_layers[k]
            layers.append(joint)
        return cls(mask, layers)

    @classmethod
    def of_images(cls, shape, images) -> "DecoderLayerFeatures | None":
        """From ``(row, first position, per-layer features or None)`` of images in a ``(batch, sequence)`` window."""
        images = sorted((row, start, layers) for row, start, layers in images if layers is not None)
        if not images:
            return None
        mask = torch.zeros(shape, dtype=torch.bool, device=images[0][2][0].device)
        for row, start, layers in images:
            mask[row, start : start + layers[0].shape[0]] = True
        return cls(mask, [torch.cat(per_layer) for per_layer in zip(*(layers for _, _, layers in images))])

    def window(self, start: int, end: int) -> "DecoderLayerFeatures | None":
        """The features of sequence positions ``start .. end`` (None if none falls there)."""
        order = self.mask.flatten().cumsum(0).view_as(self.mask) - 1
        inside = self.mask[:, start:end]
        if not inside.any():
            return None
        index = order[:, start:end][inside]
        return DecoderLayerFeatures(inside, [layer[index] for layer in self.layers])

    def language_model_inputs(self) -> dict:
        """The keyword arguments the base's language model takes them as."""
        return {"visual_pos_masks": self.mask, "deepstack_visual_embeds": self.layers}
