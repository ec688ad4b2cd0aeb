"""SAM branch ("sam"): the SAM ViT image encoder, 256x64x64 out (tokens ``<|seg_...|>``)."""

import re
from pathlib import Path

import torch
from torch import nn
from transformers import SamImageProcessor, SamVisionConfig, SamVisionModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.sam.modeling_sam import SamVisionEncoder

from ..vocabulary import BranchTokens
from . import register_branch
from .base import ControlProjector, VisionBranch

INPUT_SIZE = 1024  # SamImageProcessor pads every image to this square

# segment-anything's ImageEncoderViT key -> transformers SamVisionEncoder key.
_OFFICIAL_KEY_RENAMES = [
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.(\d+)\.norm(\d)\.", r"layers.\1.layer_norm\2."),
    (r"^blocks\.(\d+)\.", r"layers.\1."),
    (r"^neck\.0\.", "neck.conv1."),
    (r"^neck\.1\.", "neck.layer_norm1."),
    (r"^neck\.2\.", "neck.conv2."),
    (r"^neck\.3\.", "neck.layer_norm2."),
]


def official_sam_to_transformers(state_dict: dict) -> dict:
    """Image-encoder weights of an official ``sam_vit_*.pth`` in transformers' SamVisionEncoder layout."""
    prefix = "image_encoder."
    if not any(key.startswith(prefix) for key in state_dict):
        raise ValueError("not a segment-anything checkpoint: no 'image_encoder.*' keys")
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue  # prompt encoder and mask decoder: not part of the branch
        key = key[len(prefix) :]
        for pattern, replacement in _OFFICIAL_KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


class SamProjector(ControlProjector):
    """Layer norm over channels, then a 4x4 stride-4 conv: 256x64x64 -> hidden x 16x16 = 256 tokens."""

    def __init__(self, feature_channels: int, hidden_size: int, projector_scale: int = 1):
        super().__init__(hidden_size, projector_scale)
        self.layernorm_feature = nn.LayerNorm(feature_channels)
        self.conv_feature = nn.Conv2d(feature_channels, hidden_size, kernel_size=4, stride=4)

    def project_features(self, features):
        normed = self.layernorm_feature(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return list(self.conv_feature(normed).flatten(2).transpose(1, 2))


@register_branch
class SamBranch(VisionBranch):
    name = "sam"
    tokens = BranchTokens("seg")
    pixel_key = "seg_images"
    pretrained_id = "facebook/sam-vit-large"
    encoder_help = "SAM checkpoint: transformers (facebook/sam-vit-large) or official sam_vit_*.pth (with --sam-config)"
    tiny_folder = "sam"

    def default_encoder_config(self):
        # facebook/sam-vit-large, which the published models use.
        return SamVisionConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]
        )

    def tiny_encoder_config(self):
        # SAM keeps its real 1024x1024 input and 256x64x64 output.
        return SamVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
            global_attn_indexes=[1], window_size=8, output_channels=256, image_size=1024, patch_size=16,
        )

    def save_tiny_encoder(self, folder, seed=0):
        torch.manual_seed(seed)
        SamVisionModel(self.tiny_encoder_config()).save_pretrained(folder)
        return Path(folder)

    def build_encoder(self, vpt_config):
        return SamVisionEncoder(self.encoder_config(vpt_config))

    def pretrained_encoder(self, path, encoder_config=None):
        """A transformers SAM checkpoint, or an official segment-anything ``.pth`` (read as weights only)."""
        if str(path).endswith((".pth", ".pt")):
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            return encoder_config or self.default_encoder_config(), official_sam_to_transformers(state_dict)
        model = SamVisionModel.from_pretrained(path)
        return model.config, model.vision_encoder.state_dict()

    def build_projector(self, vpt_config):
        channels = self.encoder_config(vpt_config).output_channels
        return SamProjector(channels, vpt_config.text_config.hidden_size, vpt_config.projector_scale)

    def encode(self, model, inputs):
        encoder = getattr(model, self.encoder_attribute)
        pixels = inputs[self.pixel_key].to(encoder.dtype)
        if is_deepspeed_zero3_enabled():
            # ZeRO-3 gathers the encoder's weights on every call: each rank calls it once, whatever its image count.
            return encoder(pixel_values=pixels).last_hidden_state
        # One image per call: each global-attention layer holds a (heads, 4096, 4096) score and bias tensor per
        # image (1 GiB in fp32), so a batch multiplies that transient; on CPU 8 images ran 1.45x slower in one
        # call (docs/BENCHMARKS.md, measured with a global-attention layer only).
        return torch.cat([encoder(pixel_values=image[None]).last_hidden_state for image in pixels])  # (images, 256, 64, 64)

    def dummy_inputs(self, model, like):
        side = self.encoder_config(model.config).image_size  # SAM's position embedding fixes the input size
        return {self.pixel_key: like.new_zeros(1, 3, side, side)}

    def dummy_features(self, vpt_config, like):
        return like.new_zeros(1, self.encoder_config(vpt_config).output_channels, 4, 4)  # one 4x4 conv window

    def preprocess(self, images, processor, questions=None):
        # SAM's own preprocessing: long side 1024, ImageNet statistics, padded to 1024x1024.
        return {self.pixel_key: SamImageProcessor()(images=images, return_tensors="pt").pixel_values}

    def feature_tokens(self, vpt_config, images, processor):
        # Every image is padded to 1024x1024; the neck keeps the patch grid and the projector's
        # 4x4 stride-4 conv divides each side by 4.
        side = INPUT_SIZE // self.encoder_config(vpt_config).patch_size // 4
        return [side * side] * len(images)
