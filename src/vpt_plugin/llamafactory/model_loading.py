"""How LLaMA-Factory's model loader meets VPT models (called from patches/llamafactory_model_loader.py).

Two ways in:
- ``model_name_or_path`` is a VPT checkpoint (``vpt init``, ``vpt convert``, a VPT training
  output): it loads through the Auto classes; the recipe may change the VPT knobs.
- A plain base (any supported base: Qwen2-VL, Qwen2.5-VL, Qwen3-VL) with
  ``customize_model_class: vpt`` (the published recipes): the VPT model is built around it in memory: the VPT tokens are added, the branch encoders load
  their published weights (or ``vision_encoder_paths``), the projectors start fresh and the
  new token rows start as the mean of the old rows plus noise.
"""

import json
import logging
from pathlib import Path

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from ..bases import get_base
from ..branches import get_branch
from ..checkpoint import (
    NOT_CONFIG_FIELDS,
    add_vpt_tokens,
    check_safetensors_folder,
    check_token_ids,
    init_new_token_rows,
    load_strict,
    vpt_token_ids,
)
from ..configuration_vpt import VPTConfigMixin
from .arguments import CONFIG_KEYS, VPT_MODEL_CLASS, VPTArguments
from .metric_tokens import configure_metric

logger = logging.getLogger(__name__)


def vpt_arguments(model_args) -> VPTArguments:
    """The VPT keys of the recipe (attached to ``model_args`` by the hparams patch)."""
    return getattr(model_args, "vpt", None) or VPTArguments()


def builds_vpt_model(config, model_args) -> bool:
    """Whether this load makes a new VPT model around a plain base."""
    return not isinstance(config, VPTConfigMixin) and vpt_arguments(model_args).customize_model_class == VPT_MODEL_CLASS


# Written beside a LoRA adapter: the VPT settings of the model it was trained on, so that export,
# chat and predict rebuild that model from the base without the training recipe's keys.
ADAPTER_SETTINGS_FILE = "vpt_adapter_settings.json"
# Saved settings a recipe may change when it loads the adapter (training knobs, where the encoders lie);
# the others shape the model and must agree.
ADJUSTABLE_SETTINGS = ("vision_encoder_paths", "para_mask_id", "para_mask_ratio", "reuse_first_pass",
                       "box_loss_weight", "mask_loss_weight")
# Adapter weights of these modules mean the adapter was trained on a VPT model.
VPT_MODULE_MARKERS = ("_projector.", "box_heads.", "mask_decoder.", "vit_fusion.")


def adapter_settings(config, vpt: VPTArguments) -> dict:
    """The recipe keys that rebuild this VPT model from its base: what :data:`ADAPTER_SETTINGS_FILE` holds."""
    settings = {"customize_model_class": VPT_MODEL_CLASS, "vision_encoder_ls": ",".join(config.vision_encoder_ls)}
    if vpt.vision_encoder_paths:
        settings["vision_encoder_paths"] = vpt.vision_encoder_paths
    settings.update({name: getattr(config, name) for name in CONFIG_KEYS})
    return settings


def apply_adapter_settings(config, model_args) -> None:
    """Fill the recipe's VPT keys from the settings saved beside each adapter. A key the recipe sets
    to another value is an error that names it, unless it is one of :data:`ADJUSTABLE_SETTINGS`; so is
    a VPT adapter saved without settings for a plain base (a VPT checkpoint's config carries them)."""
    vpt = vpt_arguments(model_args)
    for adapter in model_args.adapter_name_or_path or []:
        path = Path(adapter) / ADAPTER_SETTINGS_FILE
        if not path.is_file():
            plain_base = not isinstance(config, VPTConfigMixin) and vpt.customize_model_class != VPT_MODEL_CLASS
            if Path(adapter).is_dir() and plain_base:
                modules = _vpt_modules_in_adapter(Path(adapter))
                if modules:
                    raise ValueError(
                        f"adapter_name_or_path {adapter}: its weights hold VPT modules ({modules}) but it has no "
                        f"{ADAPTER_SETTINGS_FILE} (an older vpt-plugin saved it without); give the training "
                        "recipe's VPT keys (customize_model_class: vpt, vision_encoder_ls, num_inner_forward_run, "
                        "box_heads, ...) to rebuild the model it was trained on")
            continue
        saved = json.loads(path.read_text())
        for key, value in saved.items():
            given = getattr(vpt, key)
            if given is None:
                setattr(vpt, key, value)
            elif key not in ADJUSTABLE_SETTINGS and not _same_setting(given, value):
                raise ValueError(f"recipe key {key}: {given!r}, but the adapter {adapter} was trained with {value!r} "
                                 f"({path}); leave the key out, or set it to the trained value")
    vpt.__post_init__()  # the filled values get the recipe keys' checks and coercions


def _same_setting(given, saved) -> bool:
    if isinstance(saved, float) or isinstance(given, float):
        return abs(float(given) - float(saved)) < 1e-9
    if isinstance(saved, str) and isinstance(given, str):
        return [v.strip() for v in given.split(",")] == [v.strip() for v in saved.split(",")]
    return given == saved


def _vpt_modules_in_adapter(folder: Path) -> list[str]:
    from safetensors import safe_open

    found = set()
    for file in folder.glob("adapter_model*.safetensors"):
        with safe_open(file, "pt") as weights:
            found |= {marker.rstrip(".") for key in weights.keys() for marker in VPT_MODULE_MARKERS if marker in key}
    return sorted(found)


def vpt_config(config, model_args):
    """The config to load with: the checkpoint's, VPT-ified or given the recipe's VPT knobs.

    Token ids are filled in later, from the tokenizer (:func:`set_token_ids`).
    """
    apply_adapter_settings(config, model_args)
    vpt = vpt_arguments(model_args)
    source = model_args.model_name_or_path
    if isinstance(config, VPTConfigMixin):
        lacking = [name for name in vpt.branch_names if name not in config.vision_encoder_ls]
        if lacking:
            raise ValueError(
                f"recipe key vision_encoder_ls={vpt.vision_encoder_ls!r} names {lacking}, which the checkpoint "
                f"{source} lacks: it has {config.vision_encoder_ls}"
            )
    elif builds_vpt_model(config, model_args):
        try:
            base = get_base(config.model_type)
        except ValueError as error:
            raise ValueError(f"customize_model_class: vpt, `model_name_or_path` {source}: {error}") from None
        base_fields = {k: v for k, v in config.to_dict().items() if k not in NOT_CONFIG_FIELDS}
        encoder_configs = {name: encoder_weights(name, model_args)[0].to_dict() for name in _encoders(vpt)}
        config = base.config_class(**base_fields, vision_encoder_ls=vpt.branch_names, branch_encoder_configs=encoder_configs)
        vpt.builds_from_base = True
    else:
        return config
    check_attention(model_args)
    check_safetensors_folder(source, "model_name_or_path")
    for adapter in model_args.adapter_name_or_path or []:
        check_safetensors_folder(adapter, "adapter_name_or_path")
    for key, value in vpt.config_overrides().items():
        setattr(config, key, value)
    if config.num_inner_forward_run == 2 and getattr(model_args, "use_reentrant_gc", False):
        # Reentrant checkpointing runs one backward per checkpointed call, so the two passes through
        # each layer fire its parameters' gradient hooks twice, which DeepSpeed ZeRO-2 cannot bucket.
        logger.info("VPT two-pass model: gradient checkpointing switched to non-reentrant")
        model_args.use_reentrant_gc = False
    return config


# transformers 5.6.0's flash-attention-2 path is broken (fixed upstream in 5.7.0).
FLASH_ATTENTION_2_FIXED_IN = "5.7.0"


def check_attention(model_args) -> None:
    """Refuse ``flash_attn: fa2`` on a transformers that crashes in it, saying what to use instead."""
    import transformers
    from packaging.version import Version

    if str(model_args.flash_attn) == "fa2" and Version(transformers.__version__) < Version(FLASH_ATTENTION_2_FIXED_IN):
        raise ValueError(
            f"recipe key flash_attn: fa2: transformers {transformers.__version__}'s flash-attention-2 path crashes "
            f"(fixed in {FLASH_ATTENTION_2_FIXED_IN}, which LLaMA-Factory 0.9.5 does not allow); set `flash_attn: sdpa` "
            "(PyTorch's fused attention, which uses flash kernels on GPU) or leave the key out")


def enable_generation(model, model_args, is_trainable: bool) -> None:
    """A VPT model loaded for inference (chat, api, predict) generates with the one-call loop.

    The processor (kept by :func:`prepare_tokenizer`) hands generation each row's original
    image, and the model gets what it needs to crop and re-encode (``model.vpt_perception``).
    """
    if not isinstance(model.config, VPTConfigMixin):
        return
    # LLaMA-Factory's patch_model replaces a model's own `generate` with transformers' plain one
    # (for remote-code models); VPT models keep theirs.
    vars(model).pop("generate", None)
    processor = getattr(vpt_arguments(model_args), "processor", None)
    if is_trainable or processor is None:
        return
    from llamafactory.data.mm_plugin import get_mm_plugin

    from ..generation import PerceptionInputs
    from .mm_plugin import vpt_plugin_name

    plugin_name = vpt_plugin_name(get_base(model.config.model_type).mm_plugin)
    plugin = get_mm_plugin(plugin_name, image_token="<|image_pad|>", video_token="<|video_pad|>")
    processor.vpt_generation = True
    model.vpt_perception = PerceptionInputs(processor, prepare_image=plugin.prepare_for_generation(processor))


def set_token_ids(config, tokenizer, model_args) -> None:
    """Fill the config's missing VPT token ids from the tokenizer; check the ones it has against it."""
    if not isinstance(config, VPTConfigMixin):
        return
    for key, value in vpt_token_ids(tokenizer, config.vision_encoder_ls).items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    try:
        check_token_ids(config, tokenizer)
    except ValueError as error:
        raise ValueError(f"model_name_or_path {model_args.model_name_or_path}: {error}; the config.json and the "
                         "tokenizer files come from different checkpoints") from None
    config.check_forward_settings()


def prepare_tokenizer(tokenizer_module, base_config, model_args) -> None:
    """After LLaMA-Factory loads the tokenizer: add the VPT tokens of a new VPT model, and give
    the processor the VPT config (the VPT templates' plugins read branch token counts from it).
    """
    tokenizer, processor = tokenizer_module["tokenizer"], tokenizer_module["processor"]
    config = vpt_config(base_config, model_args)
    if not isinstance(config, VPTConfigMixin):
        return
    vpt = vpt_arguments(model_args)
    # A new VPT model, or a checkpoint from a stage that lacked some tokens (an alignment model
    # has no action tokens): the missing ones are added, and their rows initialised on load.
    vpt.rows_before = len(tokenizer)
    vpt.new_token_ids = add_vpt_tokens(tokenizer, config.vision_encoder_ls, config.box_heads)
    set_token_ids(config, tokenizer, model_args)
    configure_metric(tokenizer, vpt, config.vision_encoder_ls)
    if processor is not None:
        processor.vpt_config = config
        vpt.processor = processor


def finish_new_model(model, tokenizer, model_args) -> None:
    """Encoder weights of a VPT model built around a plain base, and rows of tokens added now; the
    settings a LoRA adapter trained on it saves (``model.vpt_adapter_settings``, written by the trainer patch)."""
    config = model.config
    vpt = vpt_arguments(model_args)
    if isinstance(config, VPTConfigMixin):
        model.vpt_adapter_settings = adapter_settings(config, vpt)
        if config.mask_decoder and is_deepspeed_zero3_enabled():
            # It runs its parts once per decoded box; as a leaf ZeRO-3 gathers its weights once per call,
            # so ranks with different numbers of boxes stay in step (LLaMA-Factory does this for MoE blocks).
            from deepspeed.utils import set_z3_leaf_modules

            from ..box_heads import MaskDecoder

            set_z3_leaf_modules(model, [MaskDecoder])
    if not isinstance(config, VPTConfigMixin) or not (vpt.builds_from_base or vpt.new_token_ids):
        return
    if vpt.new_token_ids is None:
        raise RuntimeError("a new VPT model needs its tokenizer loaded first (load_tokenizer before load_model)")
    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "vpt-plugin cannot add VPT weights or tokens under DeepSpeed ZeRO-3 (weights are partitioned "
            "while loading); make the checkpoint first with `vpt init --base "
            f"{model_args.model_name_or_path} --branches {','.join(config.vision_encoder_ls)}` and train from it"
        )
    for name in _encoders(vpt) if vpt.builds_from_base else []:
        _, state, path = encoder_weights(name, model_args)
        encoder = getattr(model, get_branch(name).encoder_attribute)
        with torch.no_grad():
            load_strict(encoder, {k: v.to(encoder.dtype) for k, v in state.items()}, f"{name} encoder from {path}")
        get_branch(name).load_assets(model, path, source_is_encoder=True)
        _ENCODER_CACHE.pop((name, path), None)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:  # as `vpt init` does
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    init_new_token_rows(model, vpt.new_token_ids, reference_rows=vpt.rows_before)
    logger.info("VPT model %s: branches %s, %d new tokens", model_args.model_name_or_path, config.vision_encoder_ls, len(vpt.new_token_ids))


def apply_freefreeze(model, model_args, is_trainable: bool) -> None:
    """``finetuning_type: freefreeze``: freeze (or train only) parameters whose names contain a listed module."""
    vpt = vpt_arguments(model_args)
    if not (is_trainable and vpt.freefreeze):
        return
    frozen = vpt.frozen_modules
    patterns = frozen or vpt.trainable_modules
    names = [name for name, _ in model.named_parameters()]
    if patterns != ["all"]:
        unmatched = [p for p in patterns if not any(p in name for name in names)]
        if unmatched:
            key = "freefreeze_frozen_modules" if frozen else "freefreeze_trainable_modules"
            top = sorted({name.split(".")[0] for name in names} | {".".join(name.split(".")[:2]) for name in names})
            raise ValueError(f"recipe key {key}: {unmatched} match no parameter; the model has {top}")
    compute_dtype = model_args.compute_dtype
    for name, param in model.named_parameters():
        listed = patterns == ["all"] or any(p in name for p in patterns)
        trainable = not listed if frozen else listed
        param.requires_grad_(trainable)
        if not trainable and param.is_floating_point() and compute_dtype is not None and param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)  # full tuning upcast it; frozen weights need no fp32 copy


def _encoders(vpt: VPTArguments) -> list[str]:
    return [name for name in vpt.branch_names if get_branch(name).has_encoder]


_ENCODER_CACHE: dict[tuple[str, str], tuple] = {}


def encoder_weights(name: str, model_args) -> tuple:
    """``(encoder config, state dict, path)`` a new VPT model's branch encoder starts from."""
    vpt = vpt_arguments(model_args)
    branch = get_branch(name)
    path = vpt.encoder_paths.get(name, branch.pretrained_id)
    if (name, path) not in _ENCODER_CACHE:
        try:
            _ENCODER_CACHE[(name, path)] = branch.pretrained_encoder(path)
        except OSError as error:
            raise OSError(
                f"branch {name!r}: cannot load its encoder from {path!r} (recipe key vision_encoder_paths, "
                f"e.g. `vision_encoder_paths: {name}=/path/to/encoder`): {error}"
            ) from error
    config, state = _ENCODER_CACHE[(name, path)]
    return config, state, path
