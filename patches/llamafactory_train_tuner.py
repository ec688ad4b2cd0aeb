"""Patch of ``llamafactory.train.tuner``: exporting a VPT model writes a Hub-ready folder.

What changes: ``export_model`` (``llamafactory-cli export``) of a VPT model saves as before,
LoRA adapters merged, then adds the model code that ``trust_remote_code`` loads, ``auto_map``,
the VPT processor and a model card, and pushes the complete folder when
``export_hub_model_id`` is set (:func:`vpt_plugin.llamafactory.export.export_model`). It also
takes ``export_base_model`` (the model card's base model). Other models export as before.

Why no public hook serves: ``export_model`` saves and pushes in one function, with no callback
between saving and pushing, and its pushes upload model, tokenizer and processor from their own
temporary copies, so files added to ``export_dir`` afterwards would never reach the Hub.
"""

from vpt_plugin.patches import check_upstream

TARGET = "llamafactory.train.tuner"
CHECKED_AGAINST = {"export_model": "ab38d0bfaa2d6455"}


def apply_tuner_patch(tuner) -> None:
    check_upstream(tuner, CHECKED_AGAINST, __name__)
    from vpt_plugin.llamafactory import export

    upstream_export_model = tuner.export_model

    def export_model(args=None):
        export.export_model(upstream_export_model, args)

    tuner.export_model = export_model
