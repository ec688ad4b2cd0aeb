"""``vpt convert``: a checkpoint saved by the published VPT code -> this project's format.

The published code (transformers 4.45) saves ``pytorch_model*.bin`` with the old Qwen2-VL
key layout (``model.layers.*``, ``model.embed_tokens``, ``visual.*``, ``lm_head``) beside
its branch modules (``detection_model.*``, ``detection_projector.*``, ``seg_model.*``,
``seg_projector.*``, ``clip_projector.*``), and a flat config without the branch encoders'
configs (it assumed dinov2-large and sam-vit-large).
"""

import json
import pickle
import re
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from .bases.qwen2_vl import VPTQwen2VLConfig, VPTQwen2VLForConditionalGeneration
from .branches import get_branch
from .checkpoint import NOT_CONFIG_FIELDS, check_state_dict, check_token_ids

# Published key -> ours. Branch modules keep their names.
KEY_RENAMES = [
    (r"^model\.", "model.language_model."),
    (r"^visual\.", "model.visual."),
]

# Parameters the published projectors create but their forward never reads.
UNUSED_PUBLISHED_KEYS = re.compile(r"^(clip_projector\.(linear|layernorm)_feature|seg_projector\.linear_feature)\.")


def read_published_weights(src: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint directory: ``pytorch_model*.bin`` (weights only) or ``*.safetensors``."""
    bins = sorted(src.glob("pytorch_model*.bin"))
    safetensors = sorted(src.glob("*.safetensors"))
    if not bins and not safetensors:
        raise FileNotFoundError(f"{src}: no pytorch_model*.bin or *.safetensors weights")
    state = {}
    for path in bins:
        try:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: refused by torch.load(weights_only=True), not a plain weights file: {error}") from error
    for path in safetensors:
        state.update(load_file(path))
    return state


def published_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state.items():
        if UNUSED_PUBLISHED_KEYS.match(key):
            continue
        for pattern, replacement in KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def published_config(src: Path, detection_config=None, seg_config=None) -> VPTQwen2VLConfig:
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no config.json")
    fields = json.loads(path.read_text())
    if fields.get("model_type") not in ("qwen2_vl_vpt", "vrt_qwen2_vl"):
        raise ValueError(f"{path}: model_type {fields.get('model_type')!r} is not a published VPT model")
    fields = {key: value for key, value in fields.items() if key not in NOT_CONFIG_FIELDS}
    given = {"dino": detection_config, "sam": seg_config}
    fields["branch_encoder_configs"] = {
        name: (given.get(name) or get_branch(name).default_encoder_config()).to_dict()
        for name in fields.get("vision_encoder_ls", [])
        if get_branch(name).has_encoder
    }
    return VPTQwen2VLConfig(**fields)


# A saved tokenizer has one of these (fast tokenizer, byte-level BPE vocabulary, sentencepiece model).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def published_tokenizer(src: Path, tokenizer: str | None):
    """The checkpoint's tokenizer (with its VPT tokens): from ``tokenizer`` (a folder or hub id) if
    given, else from ``src``, which must then hold the tokenizer files."""
    if tokenizer is None and not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{src}: no tokenizer files (one of {list(TOKENIZER_FILES)}, with tokenizer_config.json); the published "
            "code saves them beside the weights. Copy them from the training run, or pass --tokenizer with the "
            "folder (or hub id) of the tokenizer the checkpoint was trained with, VPT tokens included")
    return AutoTokenizer.from_pretrained(tokenizer or src)


def convert_published_checkpoint(src, dst, detection_config=None, seg_config=None, tokenizer=None) -> Path:
    """Convert, check every key and shape, and save model (safetensors), tokenizer and processor."""
    src, dst = Path(src), Path(dst)
    config = published_config(src, detection_config, seg_config)
    tokenizer = published_tokenizer(src, tokenizer)
    check_token_ids(config, tokenizer)

    state = published_to_ours(read_published_weights(src))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers ties it to the embeddings again on load
    # Shapes only: the model is built on the meta device, so a 7B checkpoint converts in its own memory.
    with torch.device("meta"):
        expected = VPTQwen2VLForConditionalGeneration(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    check_state_dict(expected, state, f"published checkpoint {src}")

    image_processor = (
        Qwen2VLImageProcessor.from_pretrained(src) if (src / "preprocessor_config.json").is_file() else Qwen2VLImageProcessor()
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    config.architectures = [VPTQwen2VLForConditionalGeneration.__name__]
    config.save_pretrained(dst)
    save_torch_state_dict(state, dst)
    if (src / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(src).save_pretrained(dst)
    processor.save_pretrained(dst)
    return dst
