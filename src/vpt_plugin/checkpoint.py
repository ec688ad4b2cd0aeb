"""``vpt init``: a trainable VPT checkpoint from a base model (any supported base) and branch encoder checkpoints."""

import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor
from transformers.utils import logging as transformers_logging

from .bases import get_base
from .branches import get_branch
from .vocabulary import BOX_TOKEN, TURN_END, TURN_START, new_tokens

# Bookkeeping keys of a saved config.json, not constructor arguments.
NOT_CONFIG_FIELDS = ("model_type", "architectures", "transformers_version", "auto_map")


def add_vpt_tokens(tokenizer, branch_names: list[str], box_token: bool = False) -> list[int]:
    """Add the region tokens, the branches' tokens (and the box token); return the ids of the tokens that were new."""
    ordinary, special = new_tokens([get_branch(name).tokens.prefix for name in branch_names], box_token)
    before = set(tokenizer.get_vocab())
    tokenizer.add_tokens(ordinary)
    tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    return [tokenizer.convert_tokens_to_ids(t) for t in ordinary + special if t not in before]


def vpt_token_ids(tokenizer, branch_names: list[str]) -> dict[str, int]:
    """Config fields -> ids for the branches' tokens, the box token and the turn delimiters."""
    vocab = tokenizer.get_vocab()
    ids = {"para_start_id": vocab.get(TURN_START), "para_end_id": vocab.get(TURN_END), "box_token_id": vocab.get(BOX_TOKEN)}
    for name in branch_names:
        for key, token in get_branch(name).tokens.config_id_keys.items():
            ids[key] = vocab.get(token)
    return ids


@torch.no_grad()
def init_new_token_rows(model, new_ids: list[int], reference_rows: int) -> None:
    """New rows = mean of the existing rows plus N(0, 1/sqrt(d)) noise (LLaMA-Factory's noise_init).

    Applied to the ids of the new tokens, which may sit in rows a base reserved beyond its
    tokenizer (the Qwen-VL models pad their vocabulary), so such rows start as LLaMA-Factory's would.
    """
    if not new_ids:
        return
    index = torch.tensor(new_ids)
    embeddings = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        embeddings.append(model.get_output_embeddings().weight)
    for weight in embeddings:
        mean = weight[:reference_rows].mean(dim=0, keepdim=True)
        noise = torch.randn(len(new_ids), weight.shape[1], dtype=weight.dtype) / math.sqrt(weight.shape[1])
        weight[index] = (mean + noise).to(weight.dtype)


def init_vpt_checkpoint(
    base: str,
    output_dir: str | Path,
    branch_names: list[str],
    encoder_weights: dict[str, str] | None = None,
    encoder_configs: dict | None = None,
    num_inner_forward_run: int = 2,
    para_mask_id: int = 1,
    para_mask_ratio: float = 0.5,
    box_heads: bool = False,
    mask_decoder: bool = False,
    mask_decoder_size: int = 256,
    seed: int = 0,
) -> Path:
    """Build and save a VPT checkpoint.

    Args:
        base: a hub id or local directory of a supported base (model, tokenizer, processor); its
            ``model_type`` picks the VPT class (``vpt_plugin.bases``).
        branch_names: the branches to give the model (``dino``, ``sam``, ``clip``).
        encoder_weights: branch name -> encoder checkpoint (hub id, directory, or for SAM an
            official ``sam_vit_*.pth``). A branch with an encoder but no weights starts random.
        encoder_configs: branch name -> encoder config, for random encoders or ``.pth`` files.
        box_heads: give the model PerceptionGPT's box token and heads (fresh).
        mask_decoder: and its mask decoder (fresh), ``mask_decoder_size`` wide.
    """
    encoder_weights = encoder_weights or {}
    encoder_configs = dict(encoder_configs or {})
    torch.manual_seed(seed)

    encoder_states = {}
    for name in branch_names:
        branch = get_branch(name)
        if name in encoder_weights:
            if not branch.has_encoder:
                raise ValueError(f"branch {name!r} uses the model's own ViT; it takes no encoder weights")
            encoder_configs[name], encoder_states[name] = branch.pretrained_encoder(
                encoder_weights[name], encoder_configs.get(name)
            )

    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    rows_before = len(tokenizer)
    new_ids = add_vpt_tokens(tokenizer, branch_names, box_heads)

    base_config = AutoConfig.from_pretrained(base)
    try:
        description = get_base(base_config.model_type)
    except ValueError as error:
        raise ValueError(f"base {base}: {error}") from None
    if base_config.model_type != description.model_type:
        raise ValueError(f"base {base} is already a VPT model ({base_config.model_type!r}); start from its plain "
                         f"base ({description.model_type!r})")
    base_fields = {k: v for k, v in base_config.to_dict().items() if k not in NOT_CONFIG_FIELDS}
    config = description.config_class(
        **base_fields,
        vision_encoder_ls=list(branch_names),
        branch_encoder_configs={n: cfg.to_dict() for n, cfg in encoder_configs.items() if n in branch_names},
        num_inner_forward_run=num_inner_forward_run,
        para_mask_id=para_mask_id,
        para_mask_ratio=para_mask_ratio,
        box_heads=box_heads,
        mask_decoder=mask_decoder,
        mask_decoder_size=mask_decoder_size,
        **vpt_token_ids(tokenizer, branch_names),
    )
    # The base has no branch modules, so transformers would list each of their keys as missing;
    # every other key must match, which output_loading_info lets us check ourselves.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, loading = description.model_class.from_pretrained(base, config=config, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    branch_prefixes = tuple(f"{attribute}." for attribute in branch_attributes(branch_names) + ["box_heads", "mask_decoder"])
    unmatched = [key for key in loading["missing_keys"] if not key.startswith(branch_prefixes)]
    if unmatched or loading["unexpected_keys"] or loading["mismatched_keys"]:
        raise ValueError(
            f"base {base}: not a {description.model_type} checkpoint this model can start from: missing {sorted(unmatched)[:20]}, "
            f"unexpected {sorted(loading['unexpected_keys'])[:20]}, mis-shaped {list(loading['mismatched_keys'])[:20]}"
        )
    for name, state in encoder_states.items():
        encoder = getattr(model, get_branch(name).encoder_attribute)
        load_strict(encoder, state, f"{name} encoder from {encoder_weights[name]}")
    for name in branch_names:
        get_branch(name).load_assets(model, encoder_weights.get(name), source_is_encoder=True)

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    init_new_token_rows(model, new_ids, reference_rows=rows_before)

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def branch_attributes(branch_names: list[str]) -> list[str]:
    """Model attributes (encoders and projectors) of the given branches."""
    attributes = []
    for name in branch_names:
        branch = get_branch(name)
        attributes += [branch.encoder_attribute] if branch.has_encoder else []
        attributes.append(branch.projector_attribute)
    return attributes


def check_token_ids(config, tokenizer) -> None:
    """Each VPT token id in the config must be that token's id in the tokenizer."""
    vocab = tokenizer.get_vocab()
    if getattr(config, "box_heads", False) and vocab.get(BOX_TOKEN) != config.box_token_id:
        raise ValueError(f"config box_token_id={config.box_token_id} but the tokenizer has {BOX_TOKEN} "
                         f"{'absent' if BOX_TOKEN not in vocab else 'id %d' % vocab[BOX_TOKEN]}")
    for name in config.vision_encoder_ls:
        for key, token in get_branch(name).tokens.config_id_keys.items():
            config_id = getattr(config, key, None)
            if config_id is not None and vocab.get(token) != config_id:
                found = "absent" if token not in vocab else f"id {vocab[token]}"
                raise ValueError(f"config {key}={config_id} but the tokenizer has {token} {found}")


def check_safetensors_folder(folder, what: str) -> None:
    """Every ``*.safetensors`` file of ``folder`` (and every shard its index names) opens: a truncated
    or corrupted file is named here, before anything loads, rather than deep inside the loader."""
    import json

    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return  # a hub id: the hub's files are checked by their hashes
    for index in folder.glob("*.safetensors.index.json"):
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{what} {folder}: {index.name} names shards that are missing: {missing}")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):
                pass
        except SafetensorError as error:
            raise ValueError(f"{what} {folder}: {file.name} is truncated or corrupted ({error}); copy or save it "
                             "again (an interrupted save or download leaves such a file)") from None


def check_state_dict(expected: dict[str, torch.Tensor], state_dict: dict, what: str) -> None:
    """Raise an error naming every missing, unexpected or mis-shaped key of ``state_dict``."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{key}: expected {tuple(expected[key].shape)}, found {tuple(state_dict[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if expected[key].shape != state_dict[key].shape
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"{what}: the checkpoint does not match the model.\n"
            f"  missing keys: {missing[:20]}{' ...' if len(missing) > 20 else ''}\n"
            f"  unexpected keys: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}\n"
            f"  shape mismatches: {mis_shaped[:20]}"
        )


def load_strict(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """``load_state_dict`` that names every missing, unexpected or mis-shaped key."""
    check_state_dict(module.state_dict(), state_dict, what)
    module.load_state_dict(state_dict)
