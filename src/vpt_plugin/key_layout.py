"""VPT checkpoints keep Qwen2-VL's weight-key layout.

Qwen2-VL checkpoints on the Hub, and what ``save_pretrained`` writes, use the transformers-4
key layout (``model.layers.*``, ``visual.*``); transformers 5 renames those keys on load by
``model_type``, so each VPT ``model_type`` takes Qwen2-VL's renaming. Importing this module
registers it; exported model code (``vpt_plugin.export``) carries this module, so an exported
model loads its weights without vpt-plugin.
"""

from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_vpt import VPTQwen2VLConfig, VRTQwen2VLConfig


def register_qwen2_vl_key_layout() -> None:
    for config_class in (VPTQwen2VLConfig, VRTQwen2VLConfig):
        if get_checkpoint_conversion_mapping(config_class.model_type) is None:
            register_checkpoint_conversion_mapping(config_class.model_type, get_checkpoint_conversion_mapping("qwen2_vl"))


register_qwen2_vl_key_layout()
