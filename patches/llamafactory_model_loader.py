"""Patch of ``llamafactory.model.loader``: VPT models load, and published recipes build them.

What changes (each a wrapper around the upstream function of the same name, looked up by
``load_model`` through this module's globals):
- ``load_tokenizer``: a new VPT model's tokens are added; the processor gets the VPT config.
- ``load_config``: a VPT config (from ``customize_model_class: vpt`` or the checkpoint) with
  the recipe's VPT knobs.
- ``patch_config``: the config's VPT token ids are filled or checked against the tokenizer.
- ``patch_model``: a new VPT model's encoder weights and new token rows; a VPT model keeps
  its own ``generate`` (upstream swaps in transformers' plain one), and one loaded for
  inference gets what one-call VPT generation needs (``model.vpt_perception``).
- ``init_adapter``: ``finetuning_type: freefreeze`` module lists.

Why no public hook serves: LLaMA-Factory picks the config and model class from the
checkpoint alone and has no callback between loading and adapter setup; the published
recipes build VPT models from plain Qwen2-VL checkpoints, which only the loader can do.
"""

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.model.loader"
CHECKED_AGAINST = {
    "load_tokenizer": "4216849fb56b55a7",
    "load_config": "5fe9616a02206615",
    "load_model": "90f2a445a1d01cb4",
}


def apply_model_loader_patch(loader) -> None:
    check_upstream(loader, CHECKED_AGAINST, __name__)
    from vpt_plugin.llamafactory import model_loading

    upstream = {name: getattr(loader, name) for name in ("load_tokenizer", "load_config", "patch_config", "patch_model", "init_adapter")}

    def load_tokenizer(model_args):
        tokenizer_module = upstream["load_tokenizer"](model_args)
        model_loading.prepare_tokenizer(tokenizer_module, upstream["load_config"](model_args), model_args)
        return tokenizer_module

    def load_config(model_args):
        return model_loading.vpt_config(upstream["load_config"](model_args), model_args)

    def patch_config(config, tokenizer, model_args, init_kwargs, is_trainable):
        upstream["patch_config"](config, tokenizer, model_args, init_kwargs, is_trainable)
        model_loading.set_token_ids(config, tokenizer, model_args)

    def patch_model(model, tokenizer, model_args, is_trainable, add_valuehead):
        upstream["patch_model"](model, tokenizer, model_args, is_trainable, add_valuehead)
        model_loading.finish_new_model(model, tokenizer, model_args)
        model_loading.enable_generation(model, model_args, is_trainable)

    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        model = upstream["init_adapter"](config, model, model_args, finetuning_args, is_trainable)
        model_loading.apply_freefreeze(model, model_args, is_trainable)
        return model

    loader.load_tokenizer = load_tokenizer
    loader.load_config = load_config
    loader.patch_config = patch_config
    loader.patch_model = patch_model
    loader.init_adapter = init_adapter
