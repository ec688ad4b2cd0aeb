"""Activates vpt-plugin inside LLaMA-Factory, in every Python process of this environment.

``vpt_plugin.pth`` (installed beside this module) imports it at interpreter start-up. It
does almost nothing then: it asks to be told when ``llamafactory`` is first imported, and
then :func:`activate` checks the LLaMA-Factory version and asks to be told when each module
vpt-plugin extends is imported (``ON_IMPORT``); the registrations and patches run then.
LLaMA-Factory has no plugin entry point, and its workers (torchrun, DeepSpeed) are fresh
interpreters, so start-up is the one place that reaches all of them. This module is outside
the ``vpt_plugin`` package so that start-up imports neither torch nor transformers.

Set ``VPT_PLUGIN_DISABLE=1`` to leave LLaMA-Factory untouched.
"""

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from importlib.metadata import version

DISABLE_VARIABLE = "VPT_PLUGIN_DISABLE"
PINNED_LLAMAFACTORY = "0.9.5"

# LLaMA-Factory module -> "module:function" called with it once it is imported. Public hooks
# (registries) live in vpt_plugin.llamafactory; changes to upstream code in vpt_plugin.patches.
ON_IMPORT = {
    "llamafactory.data.template": "vpt_plugin.llamafactory:register_template_and_plugin",
    "llamafactory.data.converter": "vpt_plugin.llamafactory:register_converter",
    "llamafactory.model.model_utils.visual": "vpt_plugin.llamafactory:register_composite_models",
    "llamafactory.hparams.parser": "vpt_plugin.patches.llamafactory_hparams_parser:apply_hparams_parser_patch",
    "llamafactory.model.loader": "vpt_plugin.patches.llamafactory_model_loader:apply_model_loader_patch",
    "llamafactory.data.parser": "vpt_plugin.patches.llamafactory_data_parser:apply_data_parser_patch",
    "llamafactory.data.loader": "vpt_plugin.patches.llamafactory_data_loader:apply_data_loader_patch",
    "llamafactory.train.sft.workflow": "vpt_plugin.patches.llamafactory_train_sft_workflow:apply_sft_workflow_patch",
    "llamafactory.train.sft.trainer": "vpt_plugin.patches.llamafactory_train_sft_trainer:apply_sft_trainer_patch",
    "llamafactory.train.tuner": "vpt_plugin.patches.llamafactory_train_tuner:apply_tuner_patch",
    "llamafactory.api.app": "vpt_plugin.patches.llamafactory_api_app:apply_api_app_patch",
    # The command line and the torchrun workers' entry: how a VPT error ends the process.
    "llamafactory.cli": "vpt_plugin.llamafactory:report_vpt_errors_briefly",
    "llamafactory.launcher": "vpt_plugin.llamafactory:report_vpt_errors_briefly",
}


class UnsupportedLlamaFactoryError(RuntimeError):
    """The installed LLaMA-Factory is not the code vpt-plugin was written against."""


class _RunAfterLoader(importlib.abc.Loader):
    """Runs a module's own loader, then the callbacks waiting for that module."""

    def __init__(self, loader, callbacks):
        self.loader = loader
        self.callbacks = callbacks

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for callback in self.callbacks:
            callback(module)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of each module that has callbacks waiting."""

    def __init__(self):
        self.waiting: dict[str, list] = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.waiting:
            return None
        callbacks = self.waiting.pop(fullname)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RunAfterLoader(spec.loader, callbacks)
        return spec


_FINDER = _AfterImportFinder()


def run_after_import(module_name: str, callback) -> None:
    """Call ``callback(module)`` once ``module_name`` has been imported (now, if it already is)."""
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    _FINDER.waiting.setdefault(module_name, []).append(callback)


def _call(target: str):
    def run(module):
        module_name, function = target.split(":")
        getattr(importlib.import_module(module_name), function)(module)

    return run


_ACTIVE = False


def activate(_module=None) -> None:
    """Register vpt-plugin with LLaMA-Factory (idempotent; runs by itself in every process)."""
    global _ACTIVE
    if _ACTIVE:
        return
    installed = version("llamafactory")
    if installed != PINNED_LLAMAFACTORY:
        raise UnsupportedLlamaFactoryError(
            f"vpt-plugin supports LLaMA-Factory {PINNED_LLAMAFACTORY}, but {installed} is installed. Install "
            f"llamafactory=={PINNED_LLAMAFACTORY}, or set {DISABLE_VARIABLE}=1 to run LLaMA-Factory without vpt-plugin."
        )
    _ACTIVE = True
    for module_name, target in ON_IMPORT.items():
        run_after_import(module_name, _call(target))


def install() -> None:
    if os.environ.get(DISABLE_VARIABLE, "").lower() in ("1", "true", "yes"):
        return
    run_after_import("llamafactory", activate)


install()
