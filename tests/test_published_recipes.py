"""Every recipe in configs/ reads data the way it is shipped: its data settings train on a tiny model.

The recipes' models and datasets are too big for CPU, so each distinct set of their data settings
(streaming, buffer and batch sizes, mixing, validation split, workers, cutoff) is laid over the
tiny clip-branch demo recipe and trained for two steps on the demo split, through the unmodified
``llamafactory-cli``. A recipe whose settings cannot read a local file (streaming with no
dataloader workers, which LLaMA-Factory 0.9.5 turns into an empty stream) fails here.
"""

import json
from pathlib import Path

import pytest
import yaml
from test_export import run_side_by_side
from test_llamafactory import DEMO, REPO, cli

from vpt_plugin.tiny import build_tiny_fixtures

DATA_KEYS = ("streaming", "buffer_size", "preprocessing_batch_size", "mix_strategy", "accelerator_config",
             "dataloader_num_workers", "val_size", "max_samples", "eval_strategy", "cutoff_len", "overwrite_cache")


def published_data_settings() -> dict[str, dict]:
    """Recipe name -> its data settings, one recipe per distinct set."""
    distinct = {}
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        settings = yaml.safe_load(recipe.read_text())
        data = {key: settings[key] for key in DATA_KEYS if key in settings}
        distinct.setdefault(json.dumps(data, sort_keys=True), (recipe.stem, data))
    return dict(distinct.values())


def on_the_demo(data: dict) -> dict:
    """The data settings at the demo's scale: a validation split that leaves rows to train on."""
    data = dict(data)
    if data.get("val_size", 0) >= 1:
        data["val_size"] = 8
    return data


def demo_recipe_with(data: dict, tiny_base: Path, output_dir: Path) -> dict:
    """The tiny clip-branch demo recipe, reading its data with ``data``'s settings for two steps."""
    recipe = {**yaml.safe_load((DEMO / "clip_vpt.yaml").read_text()), **on_the_demo(data),
              "model_name_or_path": str(tiny_base), "output_dir": str(output_dir), "dataset_dir": str(REPO / "data"),
              "max_steps": 2, "logging_steps": 1, "eval_steps": 2, "save_strategy": "no",
              "preprocessing_num_workers": 2, "per_device_train_batch_size": 2}  # (this machine's two cores)
    if "val_size" in data:
        recipe.pop("eval_dataset")  # LLaMA-Factory takes a validation split or an eval dataset, not both
    if "eval_strategy" not in data:
        recipe.pop("eval_strategy"), recipe.pop("eval_dataset")
    return recipe


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_fixtures(tmp_path_factory.mktemp("tiny"), bases=("qwen2_vl",))["qwen2_vl"]


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    commands = {}
    for name, data in published_data_settings().items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(demo_recipe_with(data, tiny_base, root / name)))
        commands[name] = (["llamafactory-cli", "train", str(root / f"{name}.yaml")], {})
    run_side_by_side(commands, root)
    return root


def test_each_published_data_setting_trains(trained):
    names = published_data_settings()
    assert "Qwen2-VL-2b-VPT-CLIP" in names  # the streaming recipes are among them
    for name in names:
        state = json.loads((trained / name / "trainer_state.json").read_text())
        assert state["global_step"] == 2, name
        assert [entry for entry in state["log_history"] if "loss" in entry], name


def test_streaming_a_local_file_without_workers_says_what_to_set(tiny_base, tmp_path):
    streaming = published_data_settings()["Qwen2-VL-2b-VPT-CLIP"]
    recipe = demo_recipe_with({**streaming, "dataloader_num_workers": 0}, tiny_base, tmp_path / "out")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, out = cli(["llamafactory-cli", "train", str(tmp_path / "recipe.yaml")], tmp_path)
    assert code != 0
    assert ("dataset demo/vpt_demo_clip_train.json: `streaming: true` reads a local file as `dataloader_num_workers` "
            "shards (LLaMA-Factory 0.9.5), and with 0 workers the stream is empty; set `dataloader_num_workers: 1` or "
            "more, or `streaming: false`") in out, out[-3000:]
    assert "StopIteration" not in out
