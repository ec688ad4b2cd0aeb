"""vpt-plugin: Visual Perception Tokens for Qwen2-VL.

Importing the package registers the VPT config and model with transformers' Auto classes
(``AutoConfig``, ``AutoModelForImageTextToText``) under ``qwen2_vl_vpt`` and, for the released
CLIP model, ``vrt_qwen2_vl``.
"""

from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .branches import BRANCHES, VPTInputError, get_branch, register_branch
from .configuration_vpt import VPTQwen2VLConfig, VRTQwen2VLConfig
from .modeling_vpt import VPTQwen2VLForConditionalGeneration, VRTQwen2VLForConditionalGeneration

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    for config_class, model_class in (
        (VPTQwen2VLConfig, VPTQwen2VLForConditionalGeneration),
        (VRTQwen2VLConfig, VRTQwen2VLForConditionalGeneration),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
        # Hub Qwen2-VL checkpoints keep the transformers-4 key layout (model.layers.*, visual.*);
        # transformers renames those by model_type, so VPT models inherit Qwen2-VL's renaming.
        if get_checkpoint_conversion_mapping(config_class.model_type) is None:
            register_checkpoint_conversion_mapping(config_class.model_type, get_checkpoint_conversion_mapping("qwen2_vl"))


_register_with_transformers()

__all__ = [
    "BRANCHES",
    "VPTInputError",
    "VPTQwen2VLConfig",
    "VPTQwen2VLForConditionalGeneration",
    "VRTQwen2VLConfig",
    "VRTQwen2VLForConditionalGeneration",
    "get_branch",
    "register_branch",
]
