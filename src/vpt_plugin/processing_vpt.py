"""The processor of a VPT model: Qwen2-VL's, under the VPT model's own class name.

A VPT model needs nothing from its processor beyond Qwen2-VL's (the tokenizer holds the VPT
tokens; generation crops regions and preprocesses branch images itself, each branch with its
encoder's fixed settings). The subclass is what exported models name in ``auto_map``, so
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` loads it without vpt-plugin;
``vpt_plugin`` registers it with ``AutoProcessor`` so the same folder loads here too.
"""

from transformers import Qwen2VLProcessor


class VPTQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for a VPT model: give it to ``model.generate(..., processor=processor)``."""
