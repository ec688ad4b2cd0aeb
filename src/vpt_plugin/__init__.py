"""vpt-plugin: Visual Perception Tokens for Qwen2-VL.

Importing the package registers the VPT config, model and processor with transformers' Auto
classes (``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoProcessor``) under
``qwen2_vl_vpt`` and, for the released CLIP model, ``vrt_qwen2_vl``, and gives those model types
Qwen2-VL's weight-key renaming (``key_layout``).
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from . import key_layout  # noqa: F401  (registers the weight-key renaming of the VPT model types)
from .branches import BRANCHES, VPTInputError, get_branch, register_branch
from .configuration_vpt import VPTQwen2VLConfig, VRTQwen2VLConfig
from .modeling_vpt import VPTQwen2VLForConditionalGeneration, VRTQwen2VLForConditionalGeneration
from .processing_vpt import VPTQwen2VLProcessor

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    for config_class, model_class in (
        (VPTQwen2VLConfig, VPTQwen2VLForConditionalGeneration),
        (VRTQwen2VLConfig, VRTQwen2VLForConditionalGeneration),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
        # Exported folders name VPTQwen2VLProcessor; registered, it also loads without remote code.
        AutoProcessor.register(config_class, VPTQwen2VLProcessor, exist_ok=True)


_register_with_transformers()

__all__ = [
    "BRANCHES",
    "VPTInputError",
    "VPTQwen2VLConfig",
    "VPTQwen2VLForConditionalGeneration",
    "VPTQwen2VLProcessor",
    "VRTQwen2VLConfig",
    "VRTQwen2VLForConditionalGeneration",
    "get_branch",
    "register_branch",
]
