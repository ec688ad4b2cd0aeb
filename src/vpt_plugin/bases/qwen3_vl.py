"""Qwen3-VL, dense and MoE: ``VPTQwen3VLForConditionalGeneration`` (``qwen3_vl_vpt``) and
``VPTQwen3VLMoeForConditionalGeneration`` (``qwen3_vl_moe_vpt``).

ViT patch 16, 2x2 merge: 32 px per LLM token. Deepstack: features of a few ViT layers are
added to the hidden states after the first decoder layers at visual positions; the VPT
forward and generation give them to every image the ViT encodes (the base's own images,
region crops, clip-branch images), in both passes (``vpt_plugin.vision_features``).
Interleaved M-RoPE. LLaMA-Factory templates ``qwen3_vl_nothink`` (the Instruct models) with
VPT twin ``vpt_qwen3_vl_nothink``; the template writes no default system turn. The thinking
template (``qwen3_vl``) is not offered: it puts a thought block before every assistant turn,
and VPT's perception turns are laid out as the published ones, without.
"""

from huggingface_hub.dataclasses import strict
from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from ..configuration_vpt import VPTConfigMixin
from ..modeling_vpt import VPTModelMixin
from . import register_base
from .base import BaseModel
from .qwen2_vl import TINY_HIDDEN, tiny_text_config, tiny_token_ids


@strict
class VPTQwen3VLConfig(VPTConfigMixin, Qwen3VLConfig):
    """Qwen3-VL config plus the VPT fields (:class:`VPTConfigMixin`)."""

    model_type = "qwen3_vl_vpt"


@strict
class VPTQwen3VLMoeConfig(VPTConfigMixin, Qwen3VLMoeConfig):
    """Qwen3-VL-MoE config plus the VPT fields (:class:`VPTConfigMixin`)."""

    model_type = "qwen3_vl_moe_vpt"


class VPTQwen3VLForConditionalGeneration(VPTModelMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose vision branches (``config.vision_encoder_ls``) re-encode on request."""

    config_class = VPTQwen3VLConfig


class VPTQwen3VLMoeForConditionalGeneration(VPTModelMixin, Qwen3VLMoeForConditionalGeneration):
    """Qwen3-VL-MoE whose vision branches re-encode on request (the router's auxiliary loss is not added)."""

    config_class = VPTQwen3VLMoeConfig


class VPTQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor for a VPT model: give it to ``model.generate(..., processor=processor)``."""


# Qwen3-VL Instruct's chat format: no default system turn; images as <|vision_start|><|image_pad|><|vision_end|>.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pixel bounds that give 16 image tokens for a 224x224 image (64^2 .. 128^2 pixels at 32 px per token).
QWEN3_VL_TINY_PIXELS = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}


def tiny_qwen3_vl_processor(tokenizer) -> Qwen3VLProcessor:
    """The plain base's processor at tiny pixel bounds."""
    image_processor = Qwen2VLImageProcessor(
        size=QWEN3_VL_TINY_PIXELS, patch_size=16, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        video_processor=Qwen3VLVideoProcessor(size=QWEN3_VL_TINY_PIXELS, patch_size=16, merge_size=2),
        tokenizer=tokenizer,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def _tiny_qwen3_vl_vision_config() -> dict:
    # Deepstack from both ViT layers into both decoder layers, so every decoder layer takes them.
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY_HIDDEN,
                patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])


def _tiny_qwen3_vl_rope() -> dict:
    # head_dim 32: the three M-RoPE sections interleave over its 16 frequencies.
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                                "mrope_interleaved": True}, "head_dim": 32}


def tiny_qwen3_vl_config(tokenizer) -> Qwen3VLConfig:
    return Qwen3VLConfig(
        text_config=tiny_text_config(tokenizer, **_tiny_qwen3_vl_rope()),
        vision_config=_tiny_qwen3_vl_vision_config(),
        tie_word_embeddings=False,
        **tiny_token_ids(tokenizer),
    )


def tiny_qwen3_vl_moe_config(tokenizer) -> Qwen3VLMoeConfig:
    text = tiny_text_config(tokenizer, **_tiny_qwen3_vl_rope(), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    return Qwen3VLMoeConfig(
        text_config=text, vision_config=_tiny_qwen3_vl_vision_config(), tie_word_embeddings=False, **tiny_token_ids(tokenizer)
    )


QWEN3_VL = register_base(
    BaseModel(
        name="Qwen3-VL",
        model_type="qwen3_vl",
        model_classes=(VPTQwen3VLForConditionalGeneration,),
        processor_class=VPTQwen3VLProcessor,
        base_model_class=Qwen3VLForConditionalGeneration,
        templates=("qwen3_vl_nothink",),
        mm_plugin="qwen3_vl",
        default_system=None,
        hub_ids=("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
        tiny_config=tiny_qwen3_vl_config,
        tiny_processor=tiny_qwen3_vl_processor,
        tiny_template="vpt_qwen3_vl_nothink",
    )
)

QWEN3_VL_MOE = register_base(
    BaseModel(
        name="Qwen3-VL-MoE",
        model_type="qwen3_vl_moe",
        model_classes=(VPTQwen3VLMoeForConditionalGeneration,),
        processor_class=VPTQwen3VLProcessor,
        base_model_class=Qwen3VLMoeForConditionalGeneration,
        templates=QWEN3_VL.templates,
        mm_plugin=QWEN3_VL.mm_plugin,
        default_system=QWEN3_VL.default_system,
        hub_ids=("Qwen/Qwen3-VL-30B-A3B-Instruct",),
        tiny_config=tiny_qwen3_vl_moe_config,
        tiny_processor=tiny_qwen3_vl_processor,
        tiny_template=QWEN3_VL.tiny_template,
    )
)
