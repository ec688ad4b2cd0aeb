"""The VPT recipe keys, and the published recipes' keys in LLaMA-Factory 0.9.5 terms.

LLaMA-Factory parses a recipe into its own dataclasses and rejects keys it does not know.
:func:`split_vpt_arguments` takes the VPT keys out first (into :class:`VPTArguments`) and
renames the published fork's keys to their LLaMA-Factory 0.9.5 equivalents, so the
published YAMLs run with nothing changed but paths and hardware settings.
"""

from dataclasses import dataclass, field, fields
from typing import Any

from transformers import HfArgumentParser
from transformers.utils import logging

logger = logging.get_logger(__name__)

# `customize_model_class: vpt` (published recipes): build a VPT model from a plain base (Qwen2-VL, ...).
VPT_MODEL_CLASS = "vpt"

# Published fork key -> LLaMA-Factory 0.9.5 key (same meaning).
RENAMED_KEYS = {"new_tokens": "add_tokens", "new_special_tokens": "add_special_tokens"}

# Published keys transformers 5 no longer has (-> why dropping them changes nothing that matters).
DROPPED_KEYS = {"save_safetensors": "transformers 5 always saves safetensors, which load the same way"}

# `finetuning_type: freefreeze` is full tuning with an explicit frozen or trainable module
# list; LLaMA-Factory runs it as `full` with nothing frozen, then the lists are applied.
FREEFREEZE = "freefreeze"
FREEFREEZE_AS_FULL = {
    "finetuning_type": "full",
    "freeze_vision_tower": False,
    "freeze_multi_modal_projector": False,
    "freeze_language_model": False,
}

# The published 7B recipe's `lora_target: model.all` meant every linear layer of the LLM; with
# VPT models registered as composite models, LLaMA-Factory's `all` selects exactly those.
LORA_TARGET_RENAMES = {"model.all": "all"}


# Recipe keys that set the VPT config field of the same name.
CONFIG_KEYS = ("num_inner_forward_run", "para_mask_id", "para_mask_ratio", "reuse_first_pass", "box_heads",
               "box_loss_weight", "box_crop_margin", "box_crop_grid", "mask_decoder", "mask_decoder_size", "mask_loss_weight",
               "vit_layer_fusion")


def _split(value: str | None) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()] if value else []


@dataclass
class VPTArguments:
    """Recipe keys vpt-plugin adds to LLaMA-Factory's (all optional)."""

    customize_model_class: str | None = field(
        default=None,
        metadata={"help": "`vpt` turns a plain base `model_name_or_path` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) into a VPT model."},
    )
    vision_encoder_ls: str | None = field(
        default=None, metadata={"help": "The model's branches, comma-separated: dino, sam, clip."}
    )
    vision_encoder_paths: str | None = field(
        default=None,
        metadata={
            "help": "Encoder weights for a new VPT model, `branch=hub id or path`, comma-separated "
            "(default: the published encoders, facebook/dinov2-large and facebook/sam-vit-large)."
        },
    )
    num_inner_forward_run: int | None = field(default=None, metadata={"help": "1: alignment; 2: VPT (two passes)."})
    para_mask_id: int | None = field(default=None, metadata={"help": "0 off, 1 first user turn, 2 also branch turn."})
    para_mask_ratio: float | None = field(default=None, metadata={"help": "Probability per batch of para masking."})
    reuse_first_pass: bool | None = field(
        default=None,
        metadata={"help": "false: two full passes (the straightforward forward, for comparison); default true."},
    )
    box_heads: bool | None = field(
        default=None,
        metadata={"help": "PerceptionGPT's continuous box token <|perception_box|> and its box heads (new heads start fresh)."},
    )
    box_loss_weight: float | None = field(default=None, metadata={"help": "w_box in lm + w_box * (L1 + GIoU); default 1."})
    box_crop_margin: float | None = field(
        default=None, metadata={"help": "Continuous regions crop the box widened by this fraction of its size; default 0."}
    )
    box_crop_grid: int | None = field(
        default=None,
        metadata={"help": "Continuous regions snap the crop to this many pixels (the ViT's patch x merge size); default 0: off."},
    )
    mask_decoder: bool | None = field(
        default=None,
        metadata={"help": "PerceptionGPT's mask decoder, prompted by each decoded box's state (needs box_heads; starts fresh)."},
    )
    mask_decoder_size: int | None = field(default=None, metadata={"help": "Width of a new mask decoder; default 256."})
    mask_loss_weight: float | None = field(
        default=None, metadata={"help": "w_mask in + w_mask * (BCE + Dice), on rows with masks; default 1."}
    )
    vit_layer_fusion: bool | None = field(
        default=None,
        metadata={"help": "PerceptionGPT's adaptive multi-layer fusion of the base ViT's layers (new weights start equal)."},
    )
    freefreeze_frozen_modules: str | None = field(
        default=None, metadata={"help": "freefreeze: parameters whose names contain one of these are frozen."}
    )
    freefreeze_trainable_modules: str | None = field(
        default=None, metadata={"help": "freefreeze: only parameters whose names contain one of these train."}
    )
    compute_classwise_accuracy: bool = field(
        default=False, metadata={"help": "Evaluation reports the accuracy of each token in `class_set`."}
    )
    class_set: str | None = field(
        default=None, metadata={"help": "Tokens for class-wise accuracy, comma-separated (default: all VPT tokens)."}
    )
    freefreeze: bool = field(default=False, metadata={"help": "Set when the recipe asked for finetuning_type freefreeze."})

    # Filled while loading (not recipe keys): a VPT model is being built around a plain base,
    # and which token ids that added to the tokenizer (whose rows the loader initialises).
    builds_from_base: bool = field(default=False, init=False)
    new_token_ids: list | None = field(default=None, init=False)
    rows_before: int | None = field(default=None, init=False)
    processor: object = field(default=None, init=False, repr=False)  # kept for generation (model_loading)

    def __post_init__(self):
        for name in ("box_loss_weight", "box_crop_margin", "mask_loss_weight"):  # `key=4` on the command line arrives as an int
            if isinstance(getattr(self, name), int):
                setattr(self, name, float(getattr(self, name)))
        if self.customize_model_class not in (None, "None", VPT_MODEL_CLASS):
            raise ValueError(
                f"customize_model_class: {self.customize_model_class!r} is not known; use `vpt` (or leave it out)"
            )
        if self.customize_model_class == "None":
            self.customize_model_class = None
        if self.freefreeze_frozen_modules and self.freefreeze_trainable_modules:
            raise ValueError("set freefreeze_frozen_modules or freefreeze_trainable_modules, not both")
        if self.freefreeze and not (self.freefreeze_frozen_modules or self.freefreeze_trainable_modules):
            raise ValueError(
                "finetuning_type: freefreeze needs freefreeze_frozen_modules or freefreeze_trainable_modules"
            )
        if not self.freefreeze and (self.freefreeze_frozen_modules or self.freefreeze_trainable_modules):
            raise ValueError("freefreeze_frozen_modules / freefreeze_trainable_modules need finetuning_type: freefreeze")

    @property
    def branch_names(self) -> list[str]:
        return _split(self.vision_encoder_ls)

    @property
    def encoder_paths(self) -> dict[str, str]:
        paths = {}
        for item in _split(self.vision_encoder_paths):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"vision_encoder_paths: {item!r} is not `branch=path`")
            paths[name.strip()] = path.strip()
        return paths

    @property
    def frozen_modules(self) -> list[str]:
        return _split(self.freefreeze_frozen_modules)

    @property
    def trainable_modules(self) -> list[str]:
        return _split(self.freefreeze_trainable_modules)

    @property
    def class_tokens(self) -> list[str]:
        return _split(self.class_set)

    def config_overrides(self) -> dict[str, Any]:
        """The VPT config fields the recipe sets."""
        return {name: getattr(self, name) for name in CONFIG_KEYS if getattr(self, name) is not None}


VPT_KEYS = tuple(f.name for f in fields(VPTArguments) if f.init and f.name != "freefreeze")


def _translate(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LLaMA-Factory keys, VPT keys) of a recipe given as a dict."""
    args = dict(args)
    vpt = {key: args.pop(key) for key in VPT_KEYS if key in args}
    for key, reason in DROPPED_KEYS.items():
        if key in args:
            args.pop(key)
            logger.warning("recipe key %s ignored: %s", key, reason)
    for old, new in RENAMED_KEYS.items():
        if old in args:
            if new in args:
                raise ValueError(f"recipe sets both {old!r} (published name) and {new!r}; keep one")
            args[new] = args.pop(old)
    if args.get("finetuning_type") == FREEFREEZE:
        args.update(FREEFREEZE_AS_FULL)
        vpt["freefreeze"] = True
    if str(vpt.get("compute_classwise_accuracy", False)).lower() == "true":
        args["compute_accuracy"] = True  # LLaMA-Factory's token accuracy, which the VPT figures extend
    if isinstance(args.get("lora_target"), str):
        args["lora_target"] = LORA_TARGET_RENAMES.get(args["lora_target"].strip(), args["lora_target"])
    return args, vpt


def _list_to_dict(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull ``--key value`` / ``--key=value`` pairs that are VPT or renamed keys out of CLI args."""
    wanted = set(VPT_KEYS) | set(RENAMED_KEYS) | set(DROPPED_KEYS) | {"finetuning_type", "lora_target", "compute_accuracy"}
    rest, picked, i = [], {}, 0
    while i < len(args):
        arg = args[i]
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in wanted:
            if not sep:
                i += 1
                value = args[i] if i < len(args) else ""
            picked[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, picked


def split_vpt_arguments(args: dict[str, Any] | list[str]) -> tuple[dict[str, Any] | list[str], VPTArguments]:
    """Recipe arguments (YAML dict or CLI list) -> (what LLaMA-Factory parses, :class:`VPTArguments`)."""
    parser = HfArgumentParser(VPTArguments)
    if isinstance(args, dict):
        rest, vpt = _translate(args)
        (vpt_args,) = parser.parse_dict(vpt)
        return rest, vpt_args
    rest, picked = _list_to_dict(list(args))
    translated, vpt = _translate(picked)
    rest += [item for key, value in translated.items() for item in (f"--{key}", str(value))]
    (vpt_args,) = parser.parse_args_into_dataclasses(
        args=[item for key, value in vpt.items() for item in (f"--{key}", str(value))]
    )
    return rest, vpt_args
