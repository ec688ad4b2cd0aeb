"""vpt-plugin inside LLaMA-Factory: what :func:`activate` registers and patches.

Public hooks first: a VPT twin of each supported base's template (``vpt_qwen2_vl`` for
Qwen2-VL and Qwen2.5-VL, ``vpt_qwen3_vl_nothink`` for Qwen3-VL) with the VPT version of its
multimodal plugin, the ``vpt_sharegpt`` dataset formatting, and the composite-model entries
that tell LLaMA-Factory which VPT modules are vision encoders, projectors and LLM. What
those cannot do is in ``patches/`` (vpt_plugin.patches), one module per upstream module.

Each runs when its LLaMA-Factory module is first imported (``vpt_plugin_startup.ON_IMPORT``),
so activation imports nothing and costs nothing at start-up.
"""

import dataclasses
import os
import sys

from vpt_plugin_startup import activate

TRACEBACK_VARIABLE = "VPT_PLUGIN_TRACEBACK"


def report_vpt_errors_briefly(_module=None) -> None:
    """A bad dataset row, entry or model input ends the command with its message, which names the
    dataset, row and field, rather than under a wall of traceback (``VPT_PLUGIN_TRACEBACK=1`` shows it).

    ``sys.excepthook`` is Python's own hook for how an uncaught exception is reported."""
    from ..branches import VPTInputError
    from ..dataset import VPTDataError

    if os.environ.get(TRACEBACK_VARIABLE, "").lower() in ("1", "true", "yes") or getattr(sys.excepthook, "vpt", False):
        return
    upstream = sys.excepthook

    def report(kind, error, traceback):
        if issubclass(kind, (VPTDataError, VPTInputError)):
            print(f"{kind.__name__}: {error}\n({TRACEBACK_VARIABLE}=1 shows where it was raised)", file=sys.stderr)
        else:
            upstream(kind, error, traceback)

    report.vpt = True
    sys.excepthook = report


def register_template_and_plugin(template_module) -> None:
    """A VPT twin of each supported base's templates: ``vpt_<template>``, the base's chat format
    exactly as upstream registers it, with the VPT version of its multimodal plugin."""
    from llamafactory.data.mm_plugin import get_mm_plugin, register_mm_plugin

    from ..bases import BASES
    from .mm_plugin import vpt_plugin_class, vpt_plugin_name, vpt_template_name

    plugin_of_template = {name: base.mm_plugin for base in BASES.values() for name in base.templates}
    for plugin in sorted(set(plugin_of_template.values())):
        register_mm_plugin(vpt_plugin_name(plugin), vpt_plugin_class(plugin))
    for name, plugin in plugin_of_template.items():
        upstream = template_module.TEMPLATES[name]
        # Every field of the upstream template (its Template dataclass), the plugin aside.
        settings = {field.name: getattr(upstream, field.name) for field in dataclasses.fields(upstream)}
        settings["mm_plugin"] = get_mm_plugin(
            vpt_plugin_name(plugin), image_token=upstream.mm_plugin.image_token, video_token=upstream.mm_plugin.video_token
        )
        template_module.register_template(name=vpt_template_name(name), template_class=type(upstream), **settings)


def register_converter(converter_module) -> None:
    from .converter import FORMATTING, VPTSharegptDatasetConverter

    converter_module.register_dataset_converter(FORMATTING, VPTSharegptDatasetConverter)


def register_composite_models(visual_module) -> None:
    """Each VPT model type as its base's composite model, plus the branch encoders and projectors."""
    from ..bases import BASES
    from ..branches import BRANCHES

    encoders = [b.encoder_attribute for b in BRANCHES.values() if b.has_encoder]
    # The box heads map boxes to and from the LLM's hidden size, the ViT fusion weights make the visual
    # features: projectors too (no LoRA on them; `freeze_multi_modal_projector: false` or LoRA's
    # `additional_target` trains them).
    projectors = [b.projector_attribute for b in BRANCHES.values()] + ["box_heads", "mask_decoder", "vit_fusion"]
    for base in BASES.values():
        upstream = visual_module.COMPOSITE_MODELS[base.model_type]
        for model_type in base.vpt_model_types:
            # LLaMA-Factory 0.9.5 names its registry function with a leading underscore.
            visual_module._register_composite_model(
                model_type=model_type,
                projector_keys=upstream.projector_keys + projectors,
                vision_model_keys=upstream.vision_model_keys + encoders,
                language_model_keys=upstream.language_model_keys,
                lora_conflict_keys=upstream.lora_conflict_keys,
            )
