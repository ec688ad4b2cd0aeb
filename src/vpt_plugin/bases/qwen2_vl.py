"""Qwen2-VL, the published base: ``VPTQwen2VLForConditionalGeneration`` (``model_type`` ``qwen2_vl_vpt``).

The released CLIP model's ``model_type`` ``vrt_qwen2_vl`` loads as the same model. ViT: patch 14,
2x2 merge, 28 px per LLM token. LLaMA-Factory template ``qwen2_vl`` (VPT twin ``vpt_qwen2_vl``),
which writes a default system turn.
"""

from huggingface_hub.dataclasses import strict
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from ..configuration_vpt import VPTConfigMixin
from ..modeling_vpt import VPTModelMixin
from . import register_base
from .base import BaseModel


@strict
class VPTQwen2VLConfig(VPTConfigMixin, Qwen2VLConfig):
    """Qwen2-VL config plus every VPT field the released ``config.json`` files carry (:class:`VPTConfigMixin`)."""

    model_type = "qwen2_vl_vpt"


@strict
class VRTQwen2VLConfig(VPTQwen2VLConfig):
    """The released CLIP model's ``model_type`` (``vrt_qwen2_vl``): same config, other name."""

    model_type = "vrt_qwen2_vl"


class VPTQwen2VLForConditionalGeneration(VPTModelMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL whose vision branches (``config.vision_encoder_ls``) re-encode on request."""

    config_class = VPTQwen2VLConfig


class VRTQwen2VLForConditionalGeneration(VPTQwen2VLForConditionalGeneration):
    """The released CLIP model's class name (``model_type`` ``vrt_qwen2_vl``); same model."""

    config_class = VRTQwen2VLConfig


class VPTQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for a VPT model: give it to ``model.generate(..., processor=processor)``."""


# Qwen2-VL's chat format: a default system turn, then <|im_start|>role\ncontent<|im_end|>\n per turn.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pixel bounds that give 16 image tokens for a 224x224 image (56^2 .. 112^2 pixels at 28 px per token).
QWEN2_VL_TINY_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}


def tiny_qwen2_vl_processor(tokenizer, processor_class=Qwen2VLProcessor) -> Qwen2VLProcessor:
    """The plain base's processor at tiny pixel bounds (Qwen2.5-VL's processor takes the same parts)."""
    return processor_class(
        image_processor=Qwen2VLImageProcessor(size=QWEN2_VL_TINY_PIXELS),
        video_processor=Qwen2VLVideoProcessor(size=QWEN2_VL_TINY_PIXELS),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


TINY_HIDDEN = 128


def tiny_text_config(tokenizer, **overrides) -> dict:
    """The tiny LLM (hidden 128, 2 layers) the tiny bases share, as ``text_config`` fields."""
    ids = tokenizer.convert_tokens_to_ids
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    return {**fields, **overrides}


def tiny_token_ids(tokenizer) -> dict:
    """The image and video token ids a Qwen-VL config names."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def tiny_qwen2_vl_config(tokenizer) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=tiny_text_config(tokenizer),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=TINY_HIDDEN, num_heads=2, patch_size=14),
        tie_word_embeddings=False,
        **tiny_token_ids(tokenizer),
    )


QWEN2_VL = register_base(
    BaseModel(
        name="Qwen2-VL",
        model_type="qwen2_vl",
        model_classes=(VPTQwen2VLForConditionalGeneration, VRTQwen2VLForConditionalGeneration),
        processor_class=VPTQwen2VLProcessor,
        base_model_class=Qwen2VLForConditionalGeneration,
        templates=("qwen2_vl",),
        mm_plugin="qwen2_vl",
        default_system="You are a helpful assistant.",
        hub_ids=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
        tiny_config=tiny_qwen2_vl_config,
        tiny_processor=tiny_qwen2_vl_processor,
        tiny_template="vpt_qwen2_vl",
    )
)
