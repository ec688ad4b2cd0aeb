"""Registry of Vision Re-Encoding branches, one module each in this package.

Adding a branch is adding one file here: a :class:`VisionBranch` subclass decorated
with :func:`register_branch`. Every module of the package is imported on first use.
"""

import importlib
import pkgutil

from .base import ControlProjector, VisionBranch, VPTInputError

BRANCHES: dict[str, VisionBranch] = {}


def register_branch(cls: type[VisionBranch]) -> type[VisionBranch]:
    BRANCHES[cls.name] = cls()
    return cls


def _import_branch_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def get_branch(name: str) -> VisionBranch:
    if name not in BRANCHES:
        raise VPTInputError(f"unknown vision branch {name!r}; known branches: {sorted(BRANCHES)}")
    return BRANCHES[name]


_import_branch_modules()

__all__ = ["BRANCHES", "ControlProjector", "VPTInputError", "VisionBranch", "get_branch", "register_branch"]
