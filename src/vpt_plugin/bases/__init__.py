"""Registry of supported base models, one module each in this package.

Adding a base is adding one file here: its VPT classes (the base's transformers config, model and
processor with the VPT mixins in front) and a :class:`BaseModel` passed to :func:`register_base`.
Every module of the package is imported on first use.
"""

import importlib
import pkgutil

from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from ..branches import VPTInputError
from .base import BaseModel

BASES: dict[str, BaseModel] = {}  # plain base model_type -> its description
_BY_VPT_MODEL_TYPE: dict[str, BaseModel] = {}


def register_base(base: BaseModel) -> BaseModel:
    """Register a base; its VPT model types also take the base's weight-key layout.

    Base checkpoints on the Hub, and what ``save_pretrained`` writes, may use an older key layout
    (Qwen2-VL: ``model.layers.*``, ``visual.*``) that transformers renames on load by ``model_type``.
    """
    BASES[base.model_type] = base
    layout = get_checkpoint_conversion_mapping(base.model_type)
    for model_type in base.vpt_model_types:
        _BY_VPT_MODEL_TYPE[model_type] = base
        if layout is not None and get_checkpoint_conversion_mapping(model_type) is None:
            register_checkpoint_conversion_mapping(model_type, layout)
    return base


def _import_base_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def get_base(model_type: str) -> BaseModel:
    """The base of a plain or a VPT ``model_type``."""
    base = BASES.get(model_type) or _BY_VPT_MODEL_TYPE.get(model_type)
    if base is None:
        raise VPTInputError(
            f"model_type {model_type!r} is not a base vpt-plugin supports; supported bases: {sorted(BASES)} "
            f"(VPT model types {sorted(_BY_VPT_MODEL_TYPE)})"
        )
    return base


_import_base_modules()

__all__ = ["BASES", "BaseModel", "get_base", "register_base"]
