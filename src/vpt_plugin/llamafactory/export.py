"""``llamafactory-cli export`` of a VPT model (called from patches/llamafactory_train_tuner.py).

LLaMA-Factory's ``export_model`` loads the model (merging LoRA adapters), saves model,
tokenizer and processor to ``export_dir`` and pushes each to ``export_hub_model_id``. For a
VPT model it runs without the push; then the folder is made Hub-ready
(:func:`vpt_plugin.export.finish_hub_folder`: model code, ``auto_map``, processor, model card)
and pushed once, complete. LLaMA-Factory's three pushes would publish a config whose
``auto_map`` names code that is not there yet. Other models export exactly as before.

Export key added by vpt-plugin: ``export_base_model``, the Hub id the model card names as its
``base_model`` when ``model_name_or_path`` is a local directory (a Hub id, or a Hub cache
snapshot, names itself).
"""

import logging

import yaml

from ..configuration_vpt import VPTConfigMixin
from ..export import finish_hub_folder, hub_id_of, push_hub_folder

logger = logging.getLogger(__name__)

BASE_MODEL_KEY = "export_base_model"
HUB_MODEL_KEY = "export_hub_model_id"
MADE_BY = "LLaMA-Factory (`llamafactory-cli export`)"


def export_model(upstream_export_model, args=None) -> None:
    from llamafactory.hparams import get_infer_args
    from llamafactory.hparams.parser import read_args
    from llamafactory.model.loader import load_config

    args, base_model = pop_argument(read_args(args), BASE_MODEL_KEY)
    model_args, _, _, _ = get_infer_args(args)
    if not isinstance(load_config(model_args), VPTConfigMixin):
        if base_model:
            raise ValueError(f"{BASE_MODEL_KEY} names the model card's base model of a VPT export; "
                             f"{model_args.model_name_or_path} is not a VPT model")
        upstream_export_model(args)
        return
    without_push, hub_model_id = pop_argument(args, HUB_MODEL_KEY)
    upstream_export_model(without_push)
    recipe = yaml.safe_dump(without_secrets(args), sort_keys=False) if isinstance(args, dict) else None
    made_by = MADE_BY if recipe else f"LLaMA-Factory (`llamafactory-cli export {' '.join(without_secrets(args))}`)"
    base_model = base_model or hub_id_of(model_args.model_name_or_path)
    finish_hub_folder(model_args.export_dir, base_model, recipe, made_by, hub_model_id)
    logger.info("Hub-ready VPT model (code, auto_map, model card) in %s", model_args.export_dir)
    if hub_model_id:
        url = push_hub_folder(model_args.export_dir, hub_model_id, token=model_args.hf_hub_token)
        logger.info("pushed %s to %s", model_args.export_dir, url)


def pop_argument(args: dict | list, key: str):
    """``(args without key, its value or None)``, for YAML (dict) and ``--key value`` (list) arguments."""
    if isinstance(args, dict):
        args = dict(args)
        return args, args.pop(key, None)
    rest, value, i = [], None, 0
    while i < len(args):
        name, sep, given = args[i].partition("=")
        if name == f"--{key}":
            if not sep:
                i += 1
                given = args[i] if i < len(args) else None
            value = given
        else:
            rest.append(args[i])
        i += 1
    return rest, value


def without_secrets(args: dict | list):
    """The arguments without hub tokens, for the model card."""
    if isinstance(args, dict):
        return {key: value for key, value in args.items() if not key.endswith("_token")}
    keys = [item[2:].partition("=")[0] for item in args if item.startswith("--")]
    for key in [key for key in keys if key.endswith("_token")]:
        args, _ = pop_argument(args, key)
    return args
