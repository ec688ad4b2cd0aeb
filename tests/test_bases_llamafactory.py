"""Qwen2.5-VL and Qwen3-VL through the unmodified ``llamafactory-cli``: train, predict, export.

Per base, the tiny demo recipes build a VPT model around a plain tiny base and train it: full
(clip branch) and LoRA (DINOv2 branch); predict with generate answers the demo clip split with
the full model; ``llamafactory-cli export`` merges the LoRA model into a Hub folder, which a
process where ``vpt_plugin`` cannot be imported loads with ``trust_remote_code`` and which
computes the same logits, answers and traces as the model before export. (Qwen2-VL runs the
same through test_llamafactory*.py and test_export.py.)
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_export import probe_before_and_after, run_side_by_side
from test_llamafactory_inference import check_predictions

from vpt_plugin.bases import get_base
from vpt_plugin.demo import training_losses
from vpt_plugin.tiny import build_tiny_fixtures

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
BASES = {"qwen2_5_vl": "vpt_qwen2_vl", "qwen3_vl": "vpt_qwen3_vl_nothink"}  # base -> its VPT template
PIXELS = {"qwen2_5_vl": 12544, "qwen3_vl": 16384}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of the module, per base: trained models, predictions, the export and both probes."""
    root = tmp_path_factory.mktemp("bases-llamafactory")
    tiny = build_tiny_fixtures(root / "tiny", bases=tuple(BASES))
    out = {base: root / base for base in BASES}
    train = {}
    for base in BASES:
        common = dict(model_name_or_path=tiny[base], max_steps=4, logging_steps=1, save_steps=100)
        train[f"{base}-full"] = (["llamafactory-cli", "train", str(DEMO / f"{base}_clip_vpt.yaml"),
                                  *_args(common, output_dir=out[base] / "full", eval_steps=4)], {})
        train[f"{base}-lora"] = (["llamafactory-cli", "train", str(DEMO / f"{base}_dino_vpt_lora.yaml"),
                                  *_args(common, output_dir=out[base] / "lora", vision_encoder_paths=f"dino={tiny['dino']}")], {})
    run_side_by_side(train, root)

    after_training = {}
    cases = {}
    for base, template in BASES.items():
        after_training[f"{base}-predict"] = (
            ["llamafactory-cli", "train", str(DEMO / "clip_vpt_predict.yaml"),
             *_args(dict(model_name_or_path=out[base] / "full", template=template, image_max_pixels=PIXELS[base],
                         output_dir=out[base] / "predict", max_new_tokens=8))], {})
        # The LoRA model as its training recipe built it: same base, VPT keys and encoder weights.
        lora = yaml.safe_load((DEMO / f"{base}_dino_vpt_lora.yaml").read_text())
        export = {key: lora[key] for key in ("customize_model_class", "vision_encoder_ls", "num_inner_forward_run",
                                             "para_mask_id", "para_mask_ratio", "image_max_pixels")}
        export.update(model_name_or_path=str(tiny[base]), adapter_name_or_path=str(out[base] / "lora"),
                      vision_encoder_paths=f"dino={tiny['dino']}", finetuning_type="lora", template=template,
                      infer_dtype="float32", export_dir=str(out[base] / "exported"))
        (root / f"{base}-export.yaml").write_text(yaml.safe_dump(export))
        after_training[f"{base}-export"] = (["llamafactory-cli", "export", str(root / f"{base}-export.yaml")], {})
        loader_args = {k: v for k, v in export.items() if k != "export_dir"}
        cases[base] = {"before": {"load": "llamafactory", "args": loader_args, "out": str(out[base] / "before")},
                       "after": {"path": export["export_dir"], "out": str(out[base] / "after")}}
    run_side_by_side(after_training, root)

    probe_before_and_after(cases, root)
    return {base: {"out": out[base], **cases[base]} for base in BASES}


def _args(*settings: dict, **more) -> list[str]:
    merged = {k: v for s in (*settings, more) for k, v in s.items()}
    return [f"{key}={value}" for key, value in merged.items()]


@pytest.mark.parametrize("base", sorted(BASES))
def test_full_and_lora_recipes_train_the_bases_vpt_model(runs, base):
    out = runs[base]["out"]
    for run in ("full", "lora"):
        losses = training_losses(out / run)
        assert len(losses) == 4 and all(0 < loss < 20 for loss in losses), (run, losses)
    config = json.loads((out / "full" / "config.json").read_text())
    assert config["model_type"] == get_base(base).config_class.model_type
    assert config["architectures"] == [get_base(base).model_class.__name__]
    assert config["vision_encoder_ls"] == ["clip"] and config["num_inner_forward_run"] == 2
    state = json.loads((out / "full" / "trainer_state.json").read_text())
    evaluation = [entry for entry in state["log_history"] if "eval_loss" in entry][-1]
    assert "eval_accuracy_clip_action_start" in evaluation and "eval_accuracy_vpt_tokens" in evaluation
    assert (out / "lora" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("base", sorted(BASES))
def test_predict_with_generate_answers_with_the_bases_vpt_loop(runs, base):
    check_predictions(runs[base]["out"] / "predict")


@pytest.mark.parametrize("base", sorted(BASES))
def test_exported_lora_model_loads_without_vpt_plugin_and_answers_alike(runs, base):
    before, after = runs[base]["before"], runs[base]["after"]
    assert after["model_module"].startswith("transformers_modules.") and not after["vpt_plugin_imported"]
    assert after["processor_class"] == get_base(base).processor_class.__name__
    assert after["dtype"] == before["dtype"] == "torch.float32"
    assert torch.equal(after["logits"], before["logits"])
    assert after["answers"] == before["answers"] and after["traces"] == before["traces"]
    kinds = [trace["rounds"][0]["kind"] if trace["rounds"] else None for trace in after["traces"]]
    assert kinds == ["region", "dino"], after["traces"]
    config = json.loads((Path(after["path"]) / "config.json").read_text())
    assert config["model_type"] == get_base(base).config_class.model_type
    assert config["auto_map"]["AutoModelForImageTextToText"] == f"modeling_vpt.{get_base(base).model_class.__name__}"


# The new bases' recipes in configs/, with paths and hardware changed, on the tiny bases and demo rows
# standing in for the released splits: the Qwen3-VL DINOv2 pipeline (alignment, then VPT tuning
# from its output) and the Qwen2.5-VL clip LoRA recipe.
RECIPE_DATA = {
    "llava_alignment_detection_qwen_response_train": "alignment_demo_detection_train.json",
    "MixVRT_Detection_Full": "vpt_demo_detection_train.json",
    "MixVRT_CLIP_Full": "vpt_demo_clip_train.json",
}


def test_new_base_recipes_run_with_paths_and_hardware_changed(tmp_path):
    tiny = build_tiny_fixtures(tmp_path / "tiny", bases=tuple(BASES))
    data_dir = tmp_path / "data"
    (data_dir / "vpt_datasets").mkdir(parents=True)
    (data_dir / "dataset_info.json").write_bytes((REPO / "data" / "dataset_info.json").read_bytes())
    for name, demo_file in RECIPE_DATA.items():
        (data_dir / "vpt_datasets" / f"{name}.json").write_bytes((REPO / "data" / "demo" / demo_file).read_bytes())
    hardware = {"deepspeed": None, "bf16": False, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                "per_device_eval_batch_size": 2, "max_steps": 3, "logging_steps": 1, "eval_steps": 3, "save_steps": 3,
                "val_size": 4, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "lora_rank": 8,
                "dataset_dir": str(data_dir), "media_dir": str(REPO / "data")}
    stages = [
        ("Qwen3-VL-4b-VPT-Det-Alignment", {"model_name_or_path": tiny["qwen3_vl"], "image_max_pixels": PIXELS["qwen3_vl"],
                                           "vision_encoder_paths": f"dino={tiny['dino']}"}),
        ("Qwen3-VL-4b-VPT-Det", {"model_name_or_path": tmp_path / "Qwen3-VL-4b-VPT-Det-Alignment",
                                 "image_max_pixels": PIXELS["qwen3_vl"]}),
        ("Qwen2.5-VL-7b-VPT-CLIP", {"model_name_or_path": tiny["qwen2_5_vl"], "image_max_pixels": PIXELS["qwen2_5_vl"]}),
    ]
    for name, paths in stages:
        recipe = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        recipe.update(hardware, **paths, output_dir=tmp_path / name)
        if recipe["finetuning_type"] != "lora":
            recipe.pop("lora_rank")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in recipe.items() if v is not None}))
        run_side_by_side({name: (["llamafactory-cli", "train", str(path)], {})}, tmp_path)
        assert len(training_losses(tmp_path / name)) == 3
    config = json.loads((tmp_path / "Qwen3-VL-4b-VPT-Det" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl_vpt" and config["vision_encoder_ls"] == ["dino"]
    assert config["num_inner_forward_run"] == 2 and config["para_mask_id"] == 1
    assert (tmp_path / "Qwen2.5-VL-7b-VPT-CLIP" / "adapter_model.safetensors").is_file()
