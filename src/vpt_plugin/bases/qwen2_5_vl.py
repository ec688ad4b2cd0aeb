"""Qwen2.5-VL: ``VPTQwen2_5_VLForConditionalGeneration`` (``model_type`` ``qwen2_5_vl_vpt``).

ViT with window attention (a few full-attention blocks), patch 14, 2x2 merge: 28 px per LLM
token, as Qwen2-VL. Videos carry ``second_per_grid_ts`` (absolute time in their positions).
LLaMA-Factory uses Qwen2-VL's template and plugin for it (VPT twin ``vpt_qwen2_vl``).
"""

from functools import partial

from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from ..configuration_vpt import VPTConfigMixin
from ..modeling_vpt import VPTModelMixin
from . import register_base
from .base import BaseModel
from .qwen2_vl import QWEN2_VL, TINY_HIDDEN, tiny_qwen2_vl_processor, tiny_text_config, tiny_token_ids


@strict
class VPTQwen2_5_VLConfig(VPTConfigMixin, Qwen2_5_VLConfig):
    """Qwen2.5-VL config plus the VPT fields (:class:`VPTConfigMixin`)."""

    model_type = "qwen2_5_vl_vpt"


class VPTQwen2_5_VLForConditionalGeneration(VPTModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose vision branches (``config.vision_encoder_ls``) re-encode on request."""

    config_class = VPTQwen2_5_VLConfig


class VPTQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for a VPT model: give it to ``model.generate(..., processor=processor)``."""


def tiny_qwen2_5_vl_config(tokenizer) -> Qwen2_5_VLConfig:
    # A 56 px window (2x2 merged tokens) and one full-attention block, so both attentions run.
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY_HIDDEN,
                  patch_size=14, window_size=56, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(
        text_config=tiny_text_config(tokenizer),
        vision_config=vision,
        tie_word_embeddings=False,
        **tiny_token_ids(tokenizer),
    )


QWEN2_5_VL = register_base(
    BaseModel(
        name="Qwen2.5-VL",
        model_type="qwen2_5_vl",
        model_classes=(VPTQwen2_5_VLForConditionalGeneration,),
        processor_class=VPTQwen2_5_VLProcessor,
        base_model_class=Qwen2_5_VLForConditionalGeneration,
        templates=QWEN2_VL.templates,
        mm_plugin=QWEN2_VL.mm_plugin,
        default_system=QWEN2_VL.default_system,
        hub_ids=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
        tiny_config=tiny_qwen2_5_vl_config,
        tiny_processor=partial(tiny_qwen2_vl_processor, processor_class=Qwen2_5_VLProcessor),
        tiny_template=QWEN2_VL.tiny_template,
    )
)
