"""CLIP branch ("clip"): the model's own ViT re-encodes the image (tokens ``<|clip_...|>``).

The ViT merger already outputs the LLM hidden size, so the projector only re-weights:
without a control state the features pass through unchanged. On a base whose ViT also feeds
the first decoder layers (Qwen3-VL's deepstack), the branch images get those features as the
base's own images do (:class:`VisionFeatures`).
"""

from ..vision_features import VisionFeatures
from ..vocabulary import BranchTokens
from . import register_branch
from .base import ControlProjector, VisionBranch, VPTInputError


class ClipProjector(ControlProjector):
    def project_features(self, features: VisionFeatures):
        return list(features.per_image)  # one (tokens_i, hidden) tensor per image, already in hidden size


@register_branch
class ClipBranch(VisionBranch):
    name = "clip"
    tokens = BranchTokens("clip")
    pixel_key = "clip_pixel_values"
    has_encoder = False

    def extra_inputs(self):
        return ("clip_images_grid_thw",)

    def build_projector(self, vpt_config):
        return ClipProjector(vpt_config.text_config.hidden_size, vpt_config.projector_scale)

    def encode(self, model, inputs):
        grid_thw = inputs.get("clip_images_grid_thw")
        if grid_thw is None:
            raise VPTInputError("clip_pixel_values given without clip_images_grid_thw")
        return model.encode_base_images(inputs[self.pixel_key], grid_thw)

    def dummy_inputs(self, model, like):
        pixel_values, grid_thw = model.dummy_base_image(like)
        return {self.pixel_key: pixel_values, "clip_images_grid_thw": grid_thw}

    def dummy_features(self, vpt_config, like):
        return VisionFeatures([like.new_zeros(1, vpt_config.text_config.hidden_size)])

    def preprocess(self, images, processor, questions=None):
        # The base model's own image processor, with its pixel bounds.
        out = processor.image_processor(images=images, return_tensors="pt")
        return {self.pixel_key: out.pixel_values, "clip_images_grid_thw": out.image_grid_thw}

    def feature_tokens(self, vpt_config, images, processor):
        merge = vpt_config.vision_config.spatial_merge_size
        grid_thw = self.preprocess(images, processor)["clip_images_grid_thw"]
        return (grid_thw.prod(-1) // merge**2).tolist()
