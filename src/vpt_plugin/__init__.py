"""vpt-plugin: Visual Perception Tokens for Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Importing the package registers every supported base's VPT config, model and processor with
transformers' Auto classes (``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoProcessor``)
under the VPT model types (``qwen2_vl_vpt`` and, for the released CLIP model, ``vrt_qwen2_vl``;
``qwen2_5_vl_vpt``; ``qwen3_vl_vpt``; ``qwen3_vl_moe_vpt``), each with its base's weight-key layout.
"""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .bases import BASES, get_base
from .bases.qwen2_5_vl import VPTQwen2_5_VLConfig, VPTQwen2_5_VLForConditionalGeneration, VPTQwen2_5_VLProcessor
from .bases.qwen2_vl import (
    VPTQwen2VLConfig,
    VPTQwen2VLForConditionalGeneration,
    VPTQwen2VLProcessor,
    VRTQwen2VLConfig,
    VRTQwen2VLForConditionalGeneration,
)
from .bases.qwen3_vl import (
    VPTQwen3VLConfig,
    VPTQwen3VLForConditionalGeneration,
    VPTQwen3VLMoeConfig,
    VPTQwen3VLMoeForConditionalGeneration,
    VPTQwen3VLProcessor,
)
from .branches import BRANCHES, VPTInputError, get_branch, register_branch

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    for base in BASES.values():
        for model_class in base.model_classes:
            config_class = model_class.config_class
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
            # Exported folders name the VPT processor; registered, it also loads without remote code.
            AutoProcessor.register(config_class, base.processor_class, exist_ok=True)


_register_with_transformers()

__all__ = [
    "BASES",
    "BRANCHES",
    "VPTInputError",
    "VPTQwen2VLConfig",
    "VPTQwen2VLForConditionalGeneration",
    "VPTQwen2VLProcessor",
    "VPTQwen2_5_VLConfig",
    "VPTQwen2_5_VLForConditionalGeneration",
    "VPTQwen2_5_VLProcessor",
    "VPTQwen3VLConfig",
    "VPTQwen3VLForConditionalGeneration",
    "VPTQwen3VLMoeConfig",
    "VPTQwen3VLMoeForConditionalGeneration",
    "VPTQwen3VLProcessor",
    "VRTQwen2VLConfig",
    "VRTQwen2VLForConditionalGeneration",
    "get_base",
    "get_branch",
    "register_branch",
]
