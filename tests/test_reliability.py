"""Bad inputs through the real ``llamafactory-cli``: each ends the run with an error that names it.

Each case is one fresh subprocess that must fail before training, with a message saying what is
wrong and where; they run side by side. The checkpoint is a tiny clip-branch VPT model (``vpt init``).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_llamafactory import DEMO, ENV, REPO, overrides

from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.tiny import build_tiny_fixtures


def run_failing_side_by_side(commands: dict[str, list[str]], logs: Path) -> dict[str, tuple[int, str]]:
    """Run commands at once; name -> (exit code, all output)."""
    running = {}
    for name, argv in commands.items():
        log = open(logs / f"{name}.log", "w")
        running[name] = (subprocess.Popen(argv, cwd=REPO, env={**os.environ, **ENV}, stdout=log,
                                          stderr=subprocess.STDOUT), log)
    results = {}
    for name, (process, log) in running.items():
        process.wait(timeout=600)
        log.close()
        results[name] = (process.returncode, (logs / f"{name}.log").read_text())
    return results


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    tiny = build_tiny_fixtures(root / "tiny", bases=("qwen2_vl",))
    good = init_vpt_checkpoint(str(tiny["qwen2_vl"]), root / "good", ["clip"])

    truncated = Path(shutil.copytree(good, root / "truncated"))
    truncate(truncated / "model.safetensors")

    other_ids = Path(shutil.copytree(good, root / "other_ids"))
    config = json.loads((other_ids / "config.json").read_text())
    config["clip_action_id"] = 3
    (other_ids / "config.json").write_text(json.dumps(config))

    # An earlier run of this output_dir left a checkpoint whose weights were cut short (a full disk, a kill).
    resumed = root / "resumed"
    shutil.copytree(good, resumed / "checkpoint-2")
    truncate(resumed / "checkpoint-2" / "model.safetensors")

    recipe = str(DEMO / "clip_vpt.yaml")

    def train(**settings):
        return ["llamafactory-cli", "train", recipe, *overrides(**settings)]

    commands = {
        "truncated": train(model_name_or_path=truncated, output_dir=root / "out-truncated"),
        "other_ids": train(model_name_or_path=other_ids, output_dir=root / "out-other-ids"),
        "resumed": train(model_name_or_path=good, output_dir=resumed, overwrite_output_dir="false"),
        "fa2": train(model_name_or_path=good, flash_attn="fa2", output_dir=root / "out-fa2"),
    }
    return root, run_failing_side_by_side(commands, root)


def test_a_truncated_checkpoint_is_named_at_load(failures):
    root, results = failures
    code, out = results["truncated"]
    assert code != 0
    assert (f"model_name_or_path {root}/truncated: model.safetensors is truncated or corrupted "
            "(Error while deserializing header: incomplete metadata, file not fully covered)") in out, out[-3000:]


def test_a_truncated_checkpoint_is_named_at_resume(failures):
    root, results = failures
    code, out = results["resumed"]
    assert code != 0
    assert f"resume_from_checkpoint {root}/resumed/checkpoint-2: model.safetensors is truncated or corrupted" in out, \
        out[-3000:]
    assert "Loading weights" not in out  # named before the model was built


def test_token_ids_that_do_not_match_the_tokenizer_are_named(failures):
    root, results = failures
    code, out = results["other_ids"]
    assert code != 0
    assert (f"model_name_or_path {root}/other_ids: config clip_action_id=3 but the tokenizer has <|clip_action|> id"
            in out), out[-3000:]
    assert "come from different checkpoints" in out


def test_flash_attention_2_on_transformers_5_6_says_to_use_sdpa(failures):
    _, results = failures
    code, out = results["fa2"]
    assert code != 0
    assert "recipe key flash_attn: fa2: transformers 5.6.0's flash-attention-2 path crashes (fixed in 5.7.0" in out, \
        out[-3000:]
    assert "set `flash_attn: sdpa`" in out
