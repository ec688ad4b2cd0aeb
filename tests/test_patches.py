"""patches/: each patch names its upstream target and the code it was checked against."""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import vpt_plugin_startup

from vpt_plugin.patches import PINNED_LLAMAFACTORY, UnsupportedLlamaFactoryError, check_upstream

PATCHES = {
    target.split(":")[0]: module
    for module, target in vpt_plugin_startup.ON_IMPORT.items()
    if target.startswith("vpt_plugin.patches.")
}


def test_installed_llamafactory_is_the_code_each_patch_was_checked_against():
    """Fails when the pinned upstream changes under a patch (a new LLaMA-Factory release).

    Checked in a process with the plugin off, where the upstream functions are unpatched.
    """
    probe = (
        "import importlib; from vpt_plugin.patches import check_upstream\n"
        f"for name in {sorted(PATCHES)!r}:\n"
        "    patch = importlib.import_module(name)\n"
        "    check_upstream(importlib.import_module(patch.TARGET), patch.CHECKED_AGAINST, name)\n"
        "    for key in [k for k in vars(patch) if k.endswith('_CHECKED_AGAINST') and k != 'CHECKED_AGAINST']:\n"
        "        target = getattr(patch, key.removesuffix('CHECKED_AGAINST') + 'TARGET')\n"
        "        check_upstream(importlib.import_module(target), getattr(patch, key), name)\n"
        f"print('checked', {len(PATCHES)})\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "VPT_PLUGIN_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for module_name, target in PATCHES.items():
        patch = importlib.import_module(module_name)
        assert patch.TARGET == target
        assert patch.__doc__ and "Why no public hook serves" in patch.__doc__, module_name


def test_a_changed_upstream_function_is_refused_with_the_pinned_version(tmp_path):
    (tmp_path / "changed_parser.py").write_text("def _parse_args(parser, args=None):\n    return 'changed'\n")
    spec = importlib.util.spec_from_file_location("changed_parser", tmp_path / "changed_parser.py")
    changed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(changed)
    with pytest.raises(UnsupportedLlamaFactoryError, match=f"not the code of LLaMA-Factory {PINNED_LLAMAFACTORY}"):
        check_upstream(changed, {"_parse_args": "9be0738ee0227b8e"}, "test")
