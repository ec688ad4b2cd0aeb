"""What the rest of vpt-plugin asks of a base model: one :class:`BaseModel` per supported base.

Everything VPT does (vocabulary, branches, the two-pass forward, generation, the LLaMA-Factory
template, plugin and converter, export) is written once; a base module says what differs:
its transformers classes (through the VPT classes it defines), its LLaMA-Factory template and
multimodal plugin, the system turn its template writes, and its tiny offline configuration.
The ViT geometry (pixels per LLM token) is read from the base's own config and processor.
"""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BaseModel:
    """One supported base model family.

    Attributes:
        name: how people write the base (``Qwen2-VL``).
        model_type: transformers ``model_type`` of the plain base (``qwen2_vl``).
        model_classes: the VPT model classes of this base; the first is the one new VPT models
            get, the others load checkpoints released under other ``model_type`` names. Each
            names its config class (``config_class``).
        processor_class: the VPT processor class (the base's processor under a VPT name, which
            exported folders name in ``auto_map``).
        base_model_class: the plain transformers model (tiny bases, and VPT models built from it).
        templates: LLaMA-Factory templates of the base; each gets a VPT twin ``vpt_<template>``.
        mm_plugin: the LLaMA-Factory multimodal plugin those templates use.
        default_system: the system turn the base's template writes when a conversation has none.
        hub_ids: released bases VPT models start from (documentation, recipes).
        tiny_config: tokenizer -> a tiny random config of the plain base (tests, the demo).
        tiny_processor: tokenizer -> the base's processor at tiny pixel bounds (16 image tokens
            for a 224x224 image).
        tiny_template: the LLaMA-Factory template the tiny demo recipes use.
    """

    name: str
    model_type: str
    model_classes: tuple
    processor_class: type
    base_model_class: type
    templates: tuple[str, ...]
    mm_plugin: str
    default_system: str | None
    hub_ids: tuple[str, ...]
    tiny_config: Callable
    tiny_processor: Callable
    tiny_template: str

    @property
    def model_class(self) -> type:
        """The VPT model class new VPT models of this base get."""
        return self.model_classes[0]

    @property
    def config_class(self) -> type:
        return self.model_class.config_class

    @property
    def vpt_model_types(self) -> tuple[str, ...]:
        return tuple(model.config_class.model_type for model in self.model_classes)

