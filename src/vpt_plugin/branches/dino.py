"""DINOv2 branch ("dino"): patch tokens of a DINOv2 ViT, without CLS (tokens ``<|detection_...|>``)."""

from pathlib import Path

import torch
from torch import nn
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from ..vocabulary import BranchTokens
from . import register_branch
from .base import ControlProjector, VisionBranch

CROP_SIZE = 224  # DINOv2's preprocessing centre-crops every image to this square


class DinoProjector(ControlProjector):
    """Layer norm then linear from the DINOv2 width to the LLM hidden size."""

    def __init__(self, feature_size: int, hidden_size: int, projector_scale: int = 1):
        super().__init__(hidden_size, projector_scale)
        self.layernorm_feature = nn.LayerNorm(feature_size)
        self.linear_feature = nn.Linear(feature_size, hidden_size)

    def project_features(self, features):
        return list(self.linear_feature(self.layernorm_feature(features)))


@register_branch
class DinoBranch(VisionBranch):
    name = "dino"
    tokens = BranchTokens("detection")
    pixel_key = "detection_images"
    pretrained_id = "facebook/dinov2-large"
    encoder_help = "DINOv2 checkpoint (hub id or directory), e.g. facebook/dinov2-large"
    tiny_folder = "dinov2"

    def default_encoder_config(self):
        # facebook/dinov2-large, which the published models use.
        return Dinov2Config(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518, patch_size=14
        )

    def tiny_encoder_config(self):
        return Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=224, patch_size=14,
        )

    def save_tiny_encoder(self, folder, seed=0):
        torch.manual_seed(seed)
        Dinov2Model(self.tiny_encoder_config()).save_pretrained(folder)
        return Path(folder)

    def build_encoder(self, vpt_config):
        return Dinov2Model(self.encoder_config(vpt_config))

    def pretrained_encoder(self, path, encoder_config=None):
        encoder = Dinov2Model.from_pretrained(path)
        return encoder.config, encoder.state_dict()

    def build_projector(self, vpt_config):
        feature_size = self.encoder_config(vpt_config).hidden_size
        return DinoProjector(feature_size, vpt_config.text_config.hidden_size, vpt_config.projector_scale)

    def encode(self, model, inputs):
        encoder = getattr(model, self.encoder_attribute)
        pixels = inputs[self.pixel_key].to(encoder.dtype)
        return encoder(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS: 256 tokens at 224x224

    def dummy_inputs(self, model, like):
        side = 2 * self.encoder_config(model.config).patch_size  # DINOv2 interpolates its positions to any size
        return {self.pixel_key: like.new_zeros(1, 3, side, side)}

    def dummy_features(self, vpt_config, like):
        return like.new_zeros(1, 1, self.encoder_config(vpt_config).hidden_size)

    def preprocess(self, images, processor, questions=None):
        # DINOv2's own preprocessing: shortest side 256, centre crop 224, ImageNet statistics.
        dino_processor = BitImageProcessor(
            size={"shortest_edge": 256},
            crop_size={"height": CROP_SIZE, "width": CROP_SIZE},
            do_convert_rgb=True,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
        return {self.pixel_key: dino_processor(images=images, return_tensors="pt").pixel_values}

    def feature_tokens(self, vpt_config, images, processor):
        side = CROP_SIZE // self.encoder_config(vpt_config).patch_size  # every image is cropped to 224
        return [side * side] * len(images)
