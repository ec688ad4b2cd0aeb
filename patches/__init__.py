"""Every change vpt-plugin makes to upstream (LLaMA-Factory) behaviour, one module per patched module.

Each module names the upstream module it patches (``TARGET``), has one ``apply_...``
function, says what it changes and why no public hook serves, and records the source
digest of every upstream function it wraps or replaces (``CHECKED_AGAINST``, taken from
LLaMA-Factory :data:`PINNED_LLAMAFACTORY`). Applying a patch first compares those digests
with the installed code and refuses, naming the pinned version, when upstream has changed.
"""

import hashlib
import inspect

from vpt_plugin_startup import PINNED_LLAMAFACTORY, UnsupportedLlamaFactoryError


def source_digest(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def check_upstream(module, checked_against: dict[str, str], patch: str) -> None:
    """Raise :class:`UnsupportedLlamaFactoryError` unless each named object's source has the recorded digest."""
    for qualname, digest in checked_against.items():
        obj = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        try:
            found = source_digest(obj) if obj is not None else None
        except (OSError, TypeError):  # no source to read: not the code we know
            found = None
        if found != digest:
            raise UnsupportedLlamaFactoryError(
                f"vpt-plugin patch {patch}: {module.__name__}.{qualname} is not the code of LLaMA-Factory "
                f"{PINNED_LLAMAFACTORY} that this patch was checked against. Install llamafactory=="
                f"{PINNED_LLAMAFACTORY}, or set VPT_PLUGIN_DISABLE=1 to run LLaMA-Factory without vpt-plugin."
            )
