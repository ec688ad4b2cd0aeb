"""LLaMA-Factory integration through the real ``llamafactory-cli``, each run a fresh subprocess.

A subprocess is what proves activation: nothing in these tests imports the plugin into the
process that trains. Models are tiny and random, data is the committed demo split.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.demo import final_eval_loss, reload_and_evaluate, run_recipe, training_losses
from vpt_plugin.tiny import build_tiny_fixtures, tiny_encoder_configs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
ENV = {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_fixtures(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def dino_checkpoint(tiny, tmp_path_factory):
    """A two-pass VPT checkpoint with the DINOv2 branch (what the alignment stage hands on)."""
    return init_vpt_checkpoint(
        str(tiny["qwen2_vl"]), tmp_path_factory.mktemp("dino-vpt"), ["dino"], encoder_configs=tiny_encoder_configs()
    )


def cli(args: list[str], tmp_path: Path, env: dict | None = None, timeout: int = 600) -> tuple[int, str]:
    """Run ``llamafactory-cli`` (or python) in the repository root; (exit code, all output)."""
    result = subprocess.run(
        args, cwd=REPO, env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    return result.returncode, result.stdout + result.stderr


def overrides(**settings) -> tuple[str, ...]:
    return tuple(f"{key}={value}" for key, value in settings.items())


# ----------------------------------------------------------------------------- activation


def test_every_process_activates_the_plugin_and_the_switch_turns_it_off(tmp_path):
    probe = (
        "import llamafactory.data.template as t, llamafactory.data.mm_plugin as m, "
        "llamafactory.data.converter as c, llamafactory.model.model_utils.visual as v; "
        "print('vpt_qwen2_vl' in t.TEMPLATES, 'vpt_qwen2_vl' in m.PLUGINS, 'vpt_sharegpt' in c.DATASET_CONVERTERS, "
        "'qwen2_vl_vpt' in v.COMPOSITE_MODELS)"
    )
    code, out = cli([sys.executable, "-c", probe], tmp_path)
    assert code == 0 and out.strip().endswith("True True True True"), out
    code, out = cli([sys.executable, "-c", probe], tmp_path, env={"VPT_PLUGIN_DISABLE": "1"})
    assert code == 0 and out.strip().endswith("False False False False"), out


def test_activation_is_idempotent_and_imports_nothing_at_start_up(tmp_path):
    probe = (
        "import sys, llamafactory, vpt_plugin_startup; before = set(sys.modules); "
        "vpt_plugin_startup.activate(); vpt_plugin_startup.activate(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'vpt_plugin')), "
        "sorted(set(sys.modules) - before))"
    )
    code, out = cli([sys.executable, "-c", probe], tmp_path)
    assert code == 0 and out.strip().endswith("[] []"), out


def test_unsupported_llamafactory_version_fails_loudly(tmp_path):
    # A distribution record earlier on the path makes importlib.metadata report another version.
    record = tmp_path / "llamafactory-0.9.9.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: llamafactory\nVersion: 0.9.9\n")
    code, out = cli([sys.executable, "-c", "import llamafactory"], tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert code != 0
    assert "vpt-plugin supports LLaMA-Factory 0.9.5, but 0.9.9 is installed" in out
    assert "VPT_PLUGIN_DISABLE=1" in out


# ----------------------------------------------------------------------------- training


def test_published_clip_recipe_with_paths_and_hardware_changed(tiny, tmp_path):
    """configs/Qwen2-VL-2b-VPT-CLIP.yaml, as released (customize_model_class, new_tokens,
    new_special_tokens, freefreeze, compute_classwise_accuracy, class_set, streaming)."""
    recipe = yaml.safe_load((REPO / "configs" / "Qwen2-VL-2b-VPT-CLIP.yaml").read_text())
    data_dir = tmp_path / "data"
    (data_dir / "vpt_datasets").mkdir(parents=True)
    shutil.copy(REPO / "data" / "dataset_info.json", data_dir)
    shutil.copy(REPO / "data" / "demo" / "vpt_demo_clip_train.json", data_dir / "vpt_datasets" / "MixVRT_CLIP_Full.json")
    changed = {
        # paths
        "model_name_or_path": str(tiny["qwen2_vl"]), "dataset_dir": str(data_dir), "media_dir": str(REPO / "data"),
        "output_dir": str(tmp_path / "out"),
        # hardware: one CPU, no DeepSpeed, fp32, small batches, few steps, one worker
        "deepspeed": None, "bf16": False, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
        "per_device_eval_batch_size": 2, "max_steps": 6, "logging_steps": 1, "eval_steps": 6, "save_steps": 6,
        "val_size": 8, "buffer_size": 16, "preprocessing_batch_size": 16, "preprocessing_num_workers": 1,
        # LLaMA-Factory 0.9.5 streams a local file in `dataloader_num_workers` shards: 0 (the default) is none
        "dataloader_num_workers": 1,
        "image_max_pixels": 12544,
    }
    recipe.update(changed)
    recipe = {key: value for key, value in recipe.items() if value is not None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(path, tmp_path / "train.log", env=ENV)
    losses = training_losses(tmp_path / "out")
    # At the published learning rate (2e-5) six steps move a random model little; the demo shows learning.
    assert len(losses) == 6 and all(0 < loss < 20 for loss in losses), losses
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    evaluation = [entry for entry in state["log_history"] if "eval_loss" in entry][-1]
    assert "eval_accuracy_clip_action_start" in evaluation and "eval_accuracy_vpt_tokens" in evaluation
    assert "eval_accuracy_clip_action" not in evaluation, "<|clip_action|> is never predicted"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl_vpt" and config["vision_encoder_ls"] == ["clip"]
    assert config["num_inner_forward_run"] == 2 and config["para_mask_id"] == 1


def test_sam_recipes_align_then_tune(tiny, tmp_path):
    """The SAM branch's demo pipeline (the recipe tour, ``python -m vpt_plugin.demo --tour``):
    alignment from a plain Qwen2-VL, then VPT tuning from its output."""
    aligned = tmp_path / "aligned"
    common = dict(max_steps=2, logging_steps=1, save_steps=100)
    run_recipe(DEMO / "sam_1_alignment.yaml", tmp_path / "align.log", env=ENV, extra_args=overrides(
        model_name_or_path=tiny["qwen2_vl"], vision_encoder_paths=f"sam={tiny['sam']}", output_dir=aligned, **common))
    run_recipe(DEMO / "sam_2_vpt.yaml", tmp_path / "tune.log", env=ENV, extra_args=overrides(
        model_name_or_path=aligned, output_dir=tmp_path / "tuned", eval_steps=2, **common))
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["vision_encoder_ls"] == ["sam"] and config["num_inner_forward_run"] == 2
    assert len(training_losses(tmp_path / "tuned")) == 2


def test_lora_recipe_trains_saves_and_reloads(tiny, tmp_path):
    recipe = DEMO / "clip_vpt_lora.yaml"
    args = overrides(model_name_or_path=tiny["qwen2_vl"], output_dir=tmp_path / "out", max_steps=8)
    run_recipe(recipe, tmp_path / "train.log", args, env=ENV)
    losses = training_losses(tmp_path / "out")
    assert losses[-1] < losses[0], losses
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    loss = reload_and_evaluate(recipe, tmp_path / "reload.log", args)
    assert 0 < loss < losses[0]


def test_two_processes_on_cpu(dino_checkpoint, tmp_path):
    args = overrides(model_name_or_path=dino_checkpoint, output_dir=tmp_path / "out", max_steps=4, eval_steps=4)
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
    code, log = cli(["llamafactory-cli", "train", str(DEMO / "dino_2_vpt.yaml"), *args], tmp_path, env=env)
    assert "world size: 2" in log
    assert len(training_losses(tmp_path / "out")) == 2 and (tmp_path / "out" / "model.safetensors").is_file()
    if code != 0:
        # Seen about one run in three here: a gloo worker aborts in interpreter teardown, after the
        # run has trained, evaluated and saved (checked above). Anything else is a failure.
        tail = log[log.rindex("***** eval metrics *****"):]
        assert "terminate called without an active exception" in tail and "Traceback" not in tail.split("Failures:")[0], log[-3000:]


def test_deepspeed_zero2_two_processes(dino_checkpoint, tmp_path):
    args = overrides(
        model_name_or_path=dino_checkpoint, output_dir=tmp_path / "out", max_steps=4, eval_steps=4,
        deepspeed=REPO / "configs" / "deepspeed" / "ds_z2.json",
    )
    run_recipe(DEMO / "dino_2_vpt.yaml", tmp_path / "train.log", args, env={**ENV, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    log = (tmp_path / "train.log").read_text()
    assert "DeepSpeed" in log and "world size: 2" in log
    assert len(training_losses(tmp_path / "out")) == 2


def test_deepspeed_zero3_alignment_two_processes(dino_checkpoint, tmp_path):
    """ZeRO-3 runs alignment data (every row has a branch image, so all ranks run the same modules)."""
    args = overrides(
        model_name_or_path=dino_checkpoint, output_dir=tmp_path / "out", max_steps=4, customize_model_class="null",
        deepspeed=REPO / "configs" / "deepspeed" / "ds_z3.json",
    )
    run_recipe(DEMO / "dino_1_alignment.yaml", tmp_path / "train.log", args, env={**ENV, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert "world size: 2" in (tmp_path / "train.log").read_text()
    assert len(training_losses(tmp_path / "out")) == 2


def train_on_two_processes(recipe: Path, args: tuple, tmp_path: Path, env: dict) -> None:
    """``llamafactory-cli train`` on two processes; the run must train and save. A gloo worker that
    aborts in interpreter teardown after that (seen about one run in three here) is not a failure."""
    code, log = cli(["llamafactory-cli", "train", str(recipe), *args], tmp_path, env=env)
    if code != 0:
        assert "***** train metrics *****" in log, log[-3000:]
        tail = log[log.rindex("***** train metrics *****"):]
        assert "terminate called without an active exception" in tail and "Traceback" not in tail.split("Failures:")[0], \
            log[-3000:]


def test_deepspeed_stages_and_prefix_reuse_train_mixed_rows_as_data_parallel_does(dino_checkpoint, tmp_path):
    """Two processes on the demo's mixed rows (micro-batches with and without DINOv2 images and
    actions), para masking on: ZeRO-2 and ZeRO-3, where every rank runs every module (blank inputs
    where its micro-batch has no use for one), train exactly as plain data parallel (torch DDP) does,
    with the reusing forward and the straightforward one, step for step; the evaluation at the last
    step (mixed test rows, ZeRO-3 gathering weights in evaluation too) gives the same loss."""
    env = {**ENV, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
    losses = {}
    for stage in ("ddp", "ds_z2", "ds_z3"):
        for reuse in (True, False) if stage != "ddp" else (True,):
            out = tmp_path / f"{stage}-reuse-{reuse}"
            deepspeed = {} if stage == "ddp" else {"deepspeed": REPO / "configs" / "deepspeed" / f"{stage}.json"}
            args = overrides(model_name_or_path=dino_checkpoint, max_steps=4, logging_steps=1, eval_steps=4,
                             output_dir=out, reuse_first_pass=reuse, **deepspeed)
            train_on_two_processes(DEMO / "dino_2_vpt.yaml", args, tmp_path, env)
            losses[stage, reuse] = [*training_losses(out), final_eval_loss(out)]
            assert json.loads((out / "config.json").read_text())["reuse_first_pass"] is reuse  # the recipe key took effect
    assert len(losses["ddp", True]) == 5 and losses["ddp", True][-1] is not None
    for run, run_losses in losses.items():
        assert run_losses == pytest.approx(losses["ddp", True], rel=1e-5), run


def test_resumed_run_repeats_the_uninterrupted_losses(tiny, tmp_path):
    """Stopped after its first checkpoint and resumed: the same losses step for step, para-mask draws included."""
    recipe = DEMO / "clip_vpt.yaml"
    common = dict(model_name_or_path=tiny["qwen2_vl"], max_steps=8, save_steps=4, logging_steps=1, eval_strategy="'no'")
    run_recipe(recipe, tmp_path / "full.log", overrides(**common, output_dir=tmp_path / "full"), env=ENV)
    uninterrupted = training_losses(tmp_path / "full")

    stopped = tmp_path / "stopped"
    command = ["llamafactory-cli", "train", str(recipe), *overrides(**common, output_dir=stopped)]
    with open(tmp_path / "stopped.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (stopped / "checkpoint-4" / "trainer_state.json").is_file() and process.poll() is None:
            assert time.time() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.2)
        process.kill()
        process.wait()
    assert not (stopped / "checkpoint-8").exists(), "the run was to be stopped before finishing"
    args = overrides(**common, output_dir=stopped, resume_from_checkpoint=stopped / "checkpoint-4")
    run_recipe(recipe, tmp_path / "resumed.log", args, env=ENV)
    resumed = training_losses(stopped)
    assert len(uninterrupted) == len(resumed) == 8
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)


# ----------------------------------------------------------------------------- bad input

GOOD_ROW = json.loads((REPO / "data" / "demo" / "vpt_demo_clip_train.json").read_text())[0]  # a region row


def bad_rows():
    row = json.loads(json.dumps(GOOD_ROW))
    image = row["images"][0]
    cases = {}

    def case(name, edit, expected):
        bad = json.loads(json.dumps(row))
        edit(bad)
        cases[name] = (bad, expected)

    case("placeholders_and_images_disagree", lambda r: r["images"].append(image),
         "row 1: images: 2 <image> placeholder(s) in the messages but 3 image(s)")
    case("missing_image_file", lambda r: r["images"].__setitem__(0, "demo/images/nowhere.png"),
         "row 1: images[0]: demo/images/nowhere.png: image file not found")
    case("crop_not_four_integers", lambda r: r["images"].__setitem__(1, f"{image}_1,2,3"),
         "crop suffix '1,2,3' is not four integers")
    case("crop_outside_image", lambda r: r["images"].__setitem__(1, f"{image}_0,0,300,300"),
         "crop (0, 0, 300, 300) is outside the 224x224 image")
    case("crop_without_area", lambda r: r["images"].__setitem__(1, f"{image}_50,50,50,90"),
         "crop (50, 50, 50, 90) has no area")
    case("grid_token_out_of_range", lambda r: r["messages"][1].__setitem__("content", "<|region_token_start|><|x_8|><|y_1|><|region_token_end|>"),
         "row 1: messages[1].content: grid token <|x_8|> is outside 0..7")
    return cases


@pytest.mark.parametrize("name", sorted(bad_rows()))
def test_bad_dataset_row_stops_before_training_and_loses_nothing(tiny, tmp_path, name):
    bad, expected = bad_rows()[name]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    info = json.loads((REPO / "data" / "dataset_info.json").read_text())["vpt_demo_clip_train"]
    (data_dir / "dataset_info.json").write_text(json.dumps({"bad": {**info, "file_name": "bad.json"}}))
    (data_dir / "bad.json").write_text(json.dumps([GOOD_ROW, bad]))
    output = tmp_path / "out"
    output.mkdir()
    (output / "earlier_run.txt").write_text("kept")
    args = overrides(model_name_or_path=tiny["qwen2_vl"], dataset="bad", eval_dataset="bad", dataset_dir=data_dir,
                     media_dir=REPO / "data", output_dir=output)
    code, out = cli(["llamafactory-cli", "train", str(DEMO / "clip_vpt.yaml"), *args], tmp_path)
    assert code != 0
    assert "VPTDataError: dataset bad.json, row 1" in out and expected in out, out[-3000:]
    assert "'loss'" not in out, "training must not start"
    assert (output / "earlier_run.txt").read_text() == "kept"


def test_released_sharegpt_entries_train_unchanged_and_bad_ones_are_named_briefly(tiny, tmp_path):
    """The published dataset_info.json says `"formatting": "sharegpt"` beside branch image columns:
    such an entry is read as VPT data with one notice; another formatting is refused by name, no traceback."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    info = json.loads((REPO / "data" / "dataset_info.json").read_text())["vpt_demo_clip_train"]
    info = {**info, "formatting": "sharegpt", "file_name": str(REPO / "data" / "demo" / "vpt_demo_clip_train.json")}
    (data_dir / "dataset_info.json").write_text(json.dumps({"released_style": info,
                                                            "as_alpaca": {**info, "formatting": "alpaca"}}))
    args = overrides(model_name_or_path=tiny["qwen2_vl"], dataset="released_style", dataset_dir=data_dir,
                     media_dir=REPO / "data", output_dir=tmp_path / "out", max_steps=2, eval_dataset="released_style")
    code, out = cli(["llamafactory-cli", "train", str(DEMO / "clip_vpt.yaml"), *args], tmp_path)
    assert code == 0, out[-3000:]
    assert out.count("dataset released_style: maps ['clip_images', 'detection_images', 'seg_images'], so it is read "
                     "as vpt_sharegpt") == 1, out[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()

    args = overrides(model_name_or_path=tiny["qwen2_vl"], dataset="as_alpaca", dataset_dir=data_dir,
                     output_dir=tmp_path / "out2")
    code, out = cli(["llamafactory-cli", "train", str(DEMO / "clip_vpt.yaml"), *args], tmp_path)
    assert code != 0
    assert ("VPTDataError: dataset_info.json, dataset as_alpaca: columns ['clip_images', 'detection_images', "
            "'seg_images'] need `\"formatting\": \"vpt_sharegpt\"` (found 'alpaca')") in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_vpt_data_needs_a_vpt_template(tiny, tmp_path):
    args = overrides(model_name_or_path=tiny["qwen2_vl"], template="qwen2_vl", output_dir=tmp_path / "out")
    code, out = cli(["llamafactory-cli", "train", str(DEMO / "clip_vpt.yaml"), *args], tmp_path)
    assert code != 0
    assert ("dataset demo/vpt_demo_clip_train.json (formatting vpt_sharegpt): template 'qwen2_vl' cannot lay out VPT rows; "
            "use the VPT twin of the base's template, one of ['vpt_qwen2_vl', 'vpt_qwen3_vl_nothink']") in out, out[-3000:]


def test_recipe_naming_a_branch_the_checkpoint_lacks(dino_checkpoint, tmp_path):
    args = overrides(model_name_or_path=dino_checkpoint, vision_encoder_ls="sam", output_dir=tmp_path / "out")
    code, out = cli(["llamafactory-cli", "train", str(DEMO / "dino_2_vpt.yaml"), *args], tmp_path)
    assert code != 0
    assert "recipe key vision_encoder_ls='sam' names ['sam'], which the checkpoint" in out and "it has ['dino']" in out
