"""vpt-plugin inside LLaMA-Factory: what :func:`activate` registers and patches.

Public hooks first: the ``vpt_qwen2_vl`` template (Qwen2-VL's chat format) and its
multimodal plugin, the ``vpt_sharegpt`` dataset formatting, and the composite-model entries
that tell LLaMA-Factory which VPT modules are vision encoders, projectors and LLM. What
those cannot do is in ``patches/`` (vpt_plugin.patches), one module per upstream module.

Each runs when its LLaMA-Factory module is first imported (``vpt_plugin_startup.ON_IMPORT``),
so activation imports nothing and costs nothing at start-up.
"""

from vpt_plugin_startup import activate


def register_template_and_plugin(template_module) -> None:
    from llamafactory.data.mm_plugin import get_mm_plugin, register_mm_plugin

    from .mm_plugin import PLUGIN_NAME, VPTQwen2VLPlugin

    register_mm_plugin(PLUGIN_NAME, VPTQwen2VLPlugin)
    # Qwen2-VL's chat format exactly as upstream registers it; only the plugin differs.
    qwen2_vl = template_module.TEMPLATES["qwen2_vl"]
    template_module.register_template(
        name=PLUGIN_NAME,
        format_user=qwen2_vl.format_user,
        format_assistant=qwen2_vl.format_assistant,
        format_system=qwen2_vl.format_system,
        format_function=qwen2_vl.format_function,
        format_observation=qwen2_vl.format_observation,
        format_tools=qwen2_vl.format_tools,
        format_prefix=qwen2_vl.format_prefix,
        default_system=qwen2_vl.default_system,
        stop_words=qwen2_vl.stop_words,
        replace_eos=qwen2_vl.replace_eos,
        mm_plugin=get_mm_plugin(
            PLUGIN_NAME,
            image_token=qwen2_vl.mm_plugin.image_token,
            video_token=qwen2_vl.mm_plugin.video_token,
        ),
        template_class=type(qwen2_vl),
    )


def register_converter(converter_module) -> None:
    from .converter import FORMATTING, VPTSharegptDatasetConverter

    converter_module.register_dataset_converter(FORMATTING, VPTSharegptDatasetConverter)


def register_composite_models(visual_module) -> None:
    from ..branches import BRANCHES
    from ..configuration_vpt import VPTQwen2VLConfig, VRTQwen2VLConfig

    encoders = [b.encoder_attribute for b in BRANCHES.values() if b.has_encoder]
    projectors = [b.projector_attribute for b in BRANCHES.values()]
    qwen2_vl = visual_module.COMPOSITE_MODELS["qwen2_vl"]
    for config_class in (VPTQwen2VLConfig, VRTQwen2VLConfig):
        # LLaMA-Factory 0.9.5 names its registry function with a leading underscore.
        visual_module._register_composite_model(
            model_type=config_class.model_type,
            projector_keys=qwen2_vl.projector_keys + projectors,
            vision_model_keys=qwen2_vl.vision_model_keys + encoders,
            language_model_keys=qwen2_vl.language_model_keys,
            lora_conflict_keys=qwen2_vl.lora_conflict_keys,
        )
