"""PerceptionGPT's box token through the unmodified ``llamafactory-cli``: train, predict, export.

On a tiny Qwen3-VL and a small version of the demo's box splits (data/make_detail_data.py, boxes in
pixels as dataset_info.json declares): full tuning (ViT fusion on) logs each part of the loss; predict with generate
writes the boxes the model decodes; a LoRA model (heads, embeddings and lm_head trained in full
through ``additional_target``, as the real recipes do) exported by ``llamafactory-cli export`` loads
with ``trust_remote_code`` where vpt_plugin cannot be imported and decodes the same boxes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_export import ENV, run_side_by_side
from test_llamafactory_inference import JOIN_STREAM_THREADS

from vpt_plugin.tiny import build_tiny_fixtures

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "demo" / "box_region.yaml"

# Runs before and after export: teacher-forced boxes of a grounding row, and one-call generation
# whose first turn is forced to a continuous region (row 0) and to a box answer (row 1).
PROBE = r'''
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

class Force(LogitsProcessor):
    """Forces the first tokens of each prompt's first answer (a random tiny model writes what the test needs)."""
    def __init__(self, tokenizer, prompts, scripts):
        self.start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.cases = [(p, tokenizer.encode(s, add_special_tokens=False)) for p, s in zip(prompts, scripts)]
    def __call__(self, input_ids, scores):
        for b, row in enumerate(input_ids.tolist()):
            row = row[row.index(self.start):]  # without padding
            prompt, script = next((p, s) for p, s in self.cases if row[: len(p)] == p)
            step = len(row) - len(prompt)
            if step < len(script):
                scores[b] = float("-inf")
                scores[b, script[step]] = 0.0
        return scores

case = json.loads(sys.argv[1])
if case.get("blocker"):
    sys.path.insert(0, case["blocker"])
    try:
        import vpt_plugin
        raise SystemExit("vpt_plugin was importable")
    except ImportError:
        pass
else:
    import vpt_plugin
model = AutoModelForImageTextToText.from_pretrained(case["path"], trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(case["path"], trust_remote_code=True)
processor.tokenizer.padding_side = "left"
images = [Image.open(path).convert("RGB") for path in case["images"]]
texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                       add_generation_prompt=True) for q in case["questions"]]
prompts = processor(text=texts, images=images, padding=True, return_tensors="pt")
forced = processor(text=[t + "<|perception_box|><|im_end|>" for t in texts], images=images, padding=True, return_tensors="pt")
boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.25, 0.75, 0.5]])
with torch.no_grad():
    out = model(**forced, boxes=boxes)
rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompts["input_ids"], prompts["attention_mask"])]
force = Force(processor.tokenizer, rows, case["scripts"])
generated = model.generate(**prompts, processor=processor, vpt_images=images, do_sample=False, max_new_tokens=6,
                           logits_processor=LogitsProcessorList([force]), return_dict_in_generate=True)
save_file({"pred_boxes": out.pred_boxes.contiguous(), "logits": out.logits.contiguous()}, case["out"] + ".safetensors")
json.dump({"traces": generated.traces, "module": type(model).__module__,
           "vpt_plugin_imported": "vpt_plugin" in sys.modules}, open(case["out"] + ".json", "w"))
'''


# LLaMA-Factory's chat engine on the trained model: a grounding question, answered and streamed.
CHAT = r'''
import json, sys
from PIL import Image
from llamafactory.chat import ChatModel
model, image, out = sys.argv[1:]
chat = ChatModel(dict(model_name_or_path=model, template="vpt_qwen3_vl_nothink", infer_backend="huggingface",
                      max_new_tokens=4, do_sample=False, image_max_pixels=16384))
messages = [{"role": "user", "content": "<image>Where is the purple square?"}]
image = Image.open(image)
[reply] = chat.chat(messages, images=[image])
traces = chat.engine.model.vpt_last_traces
streamed = "".join(chat.stream_chat(messages, images=[image]))
json.dump({"reply": reply.response_text, "streamed": streamed, "traces": traces}, open(out, "w"))
''' + JOIN_STREAM_THREADS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("box-llamafactory")
    tiny = build_tiny_fixtures(root / "tiny", bases=("qwen3_vl",))
    data_dir = root / "data"
    data_dir.mkdir()
    (data_dir / "dataset_info.json").write_bytes((REPO / "data" / "dataset_info.json").read_bytes())
    subprocess.run([sys.executable, str(REPO / "data" / "make_detail_data.py"), "--output", str(data_dir / "detail"),
                    "--train-images", "16", "--test-images", "4"], check=True, capture_output=True)
    # Every run adds PerceptionGPT's mask decoder (small); the full run trains it on the grounding masks.
    common = dict(model_name_or_path=tiny["qwen3_vl"], dataset_dir=data_dir, logging_steps=1, mask_decoder="true",
                  mask_decoder_size=32)
    lora = dict(finetuning_type="lora", lora_target="all", additional_target="box_heads,mask_decoder,lm_head,embed_tokens",
                freeze_vision_tower="true")
    run_side_by_side({
        # A box answer is one token: 30 steps teach the model to write it, so predict decodes boxes.
        "full": (["llamafactory-cli", "train", str(RECIPE), *_args(common, output_dir=root / "full", max_steps=30, learning_rate=1e-3,
                                                                    dataset="detail_grounding_masks_train", vit_layer_fusion="true")], {}),
        "lora": (["llamafactory-cli", "train", str(RECIPE), *_args(common, lora, output_dir=root / "lora", max_steps=4)], {}),
    }, root)

    predict = dict(model_name_or_path=root / "full", dataset_dir=data_dir, eval_dataset="detail_grounding_test",
                   output_dir=root / "predict", max_new_tokens=4)
    # The export names no VPT key: the adapter's saved settings rebuild the model it was trained on.
    export = dict(model_name_or_path=str(tiny["qwen3_vl"]), adapter_name_or_path=str(root / "lora"),
                  template="vpt_qwen3_vl_nothink", finetuning_type="lora", infer_dtype="float32", image_max_pixels=16384,
                  export_dir=str(root / "exported"))
    (root / "export.yaml").write_text(yaml.safe_dump(export))
    test_image = data_dir / json.loads((data_dir / "detail" / "detail_grounding_test.json").read_text())[0]["images"][0]
    run_side_by_side({
        "predict": (["llamafactory-cli", "train", str(REPO / "configs" / "demo" / "box_predict.yaml"), *_args(predict)], {}),
        "export": (["llamafactory-cli", "export", str(root / "export.yaml")], {}),
        "chat": ([sys.executable, "-c", CHAT, str(root / "full"), str(test_image), str(root / "chat.json")], {}),
    }, root)

    blocker = root / "blocker" / "vpt_plugin"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('vpt_plugin is not installed here')\n")
    test_rows = json.loads((data_dir / "detail" / "detail_grounding_test.json").read_text())
    probe = {"images": [str(data_dir / row["images"][0]) for row in test_rows[:2]],
             "questions": ["Which pattern does the purple square have?", "Where is the purple square?"],
             "scripts": ["<|region_token_start|><|perception_box|><|region_token_end|><|im_end|>", "<|perception_box|>"]}
    cases = {"before": {**probe, "path": str(root / "merged-before"), "out": str(root / "before")},
             "after": {**probe, "path": export["export_dir"], "out": str(root / "after"), "blocker": str(blocker.parent)}}
    # The reference: the same adapter merged on the model the training recipe's keys build, named in full.
    recipe_keys = {key: value for key, value in yaml.safe_load(RECIPE.read_text()).items()
                   if key in ("customize_model_class", "box_heads", "num_inner_forward_run", "box_crop_margin", "box_crop_grid")}
    _merge_lora(tiny["qwen3_vl"], root / "lora", {**export, **recipe_keys, "mask_decoder": True, "mask_decoder_size": 32},
                Path(cases["before"]["path"]))
    run_side_by_side({name: ([sys.executable, "-c", PROBE, json.dumps(case)],
                             {"VPT_PLUGIN_DISABLE": "1", "HF_MODULES_CACHE": str(root / "modules")} if name == "after" else {})
                      for name, case in cases.items()}, root)
    for case in cases.values():
        case.update(json.loads(Path(case["out"] + ".json").read_text()), **load_file(case["out"] + ".safetensors"))
    return {"root": root, "tiny": tiny, **cases}


def _merge_lora(base, adapter, export_args, folder: Path) -> None:
    """The LoRA model as LLaMA-Factory's loader builds it from the export's own arguments, saved with the plugin."""
    script = (
        "import sys, json\n"
        "from llamafactory.hparams import get_infer_args\n"
        "from llamafactory.data import get_template_and_fix_tokenizer\n"
        "from llamafactory.model import load_model, load_tokenizer\n"
        "args = json.loads(sys.argv[1])\n"
        "model_args, data_args, finetuning_args, _ = get_infer_args(args)\n"
        "loaded = load_tokenizer(model_args)\n"
        "get_template_and_fix_tokenizer(loaded['tokenizer'], data_args)\n"
        "model = load_model(loaded['tokenizer'], model_args, finetuning_args)\n"
        "model.save_pretrained(sys.argv[2])\n"
        "loaded['processor'].save_pretrained(sys.argv[2])\n"
    )
    args = {k: v for k, v in export_args.items() if k != "export_dir"}
    subprocess.run([sys.executable, "-c", script, json.dumps(args), str(folder)], check=True, cwd=REPO, env=ENV,
                   capture_output=True)


def _args(*settings: dict, **more) -> list[str]:
    merged = {k: v for s in (*settings, more) for k, v in s.items()}
    return [f"{key}={value}" for key, value in merged.items()]


def test_training_logs_each_part_of_the_loss(runs):
    for run, parts in (("full", ("lm_loss", "box_l1", "box_giou", "mask_bce", "mask_dice")),
                       ("lora", ("lm_loss", "box_l1", "box_giou"))):  # the LoRA run's data has no masks
        state = json.loads((runs["root"] / run / "trainer_state.json").read_text())
        logged = [entry for entry in state["log_history"] if "loss" in entry]
        assert logged and all(set(parts) <= set(entry) for entry in logged), logged[:2]
        for entry in logged:
            # loss = lm + w_box * (L1 + GIoU) [+ w_mask * (BCE + Dice)], each a mean over the logging interval (one step).
            assert entry["loss"] == pytest.approx(sum(entry[part] for part in parts), abs=2e-3)
    config = json.loads((runs["root"] / "full" / "config.json").read_text())
    assert config["box_heads"] is True and config["box_token_id"] is not None
    # The recipe key turned the ViT fusion on, and its weights trained (they start at zero).
    assert config["vit_layer_fusion"] is True
    assert load_file(runs["root"] / "full" / "model.safetensors")["vit_fusion.weights"].abs().sum() > 0


def test_predict_writes_the_decoded_boxes(runs):
    lines = (runs["root"] / "predict" / "generated_predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert len(predictions) == 4
    for prediction in predictions:
        (box,) = prediction["vpt_trace"]["answer_boxes"]
        assert len(box) == 4 and all(0 <= v <= 1 for v in box)
        (mask,) = prediction["vpt_trace"]["answer_masks"]  # over the 256x256 image
        assert mask["size"] == [256, 256] and sum(mask["counts"]) == 256 * 256


def test_chat_engine_answers_with_a_decoded_box_and_mask(runs):
    chat = json.loads((runs["root"] / "chat.json").read_text())
    assert chat["reply"] == chat["streamed"]
    (trace,) = chat["traces"]
    assert len(trace["answer_boxes"]) == 1 and trace["answer_masks"][0]["size"] == [256, 256]


def test_exported_lora_model_decodes_the_same_boxes_without_vpt_plugin(runs):
    before, after = runs["before"], runs["after"]
    assert after["module"].startswith("transformers_modules.") and not after["vpt_plugin_imported"]
    assert torch.equal(after["pred_boxes"], before["pred_boxes"]) and torch.equal(after["logits"], before["logits"])
    assert after["traces"] == before["traces"]
    region, answer = after["traces"]
    assert region["rounds"][0]["kind"] == "region" and len(region["rounds"][0]["boxes"]) == 1
    assert len(answer["answer_boxes"]) == 1 and len(answer["answer_masks"]) == 1


def test_the_adapter_carries_its_vpt_settings_and_contradictions_are_named(runs, tmp_path):
    from llamafactory.hparams import ModelArguments
    from transformers import AutoConfig

    from vpt_plugin.llamafactory.arguments import VPTArguments
    from vpt_plugin.llamafactory.model_loading import (
        ADAPTER_SETTINGS_FILE,
        apply_adapter_settings,
    )

    adapter = runs["root"] / "lora"
    saved = json.loads((adapter / ADAPTER_SETTINGS_FILE).read_text())
    assert saved["customize_model_class"] == "vpt" and saved["box_heads"] is True and saved["mask_decoder_size"] == 32
    assert saved["box_crop_margin"] == pytest.approx(0.16667) and saved["box_crop_grid"] == 32

    base_config = AutoConfig.from_pretrained(runs["tiny"]["qwen3_vl"])  # a plain base

    def load_args(adapter_path, **keys):
        model_args = ModelArguments(model_name_or_path=str(runs["tiny"]["qwen3_vl"]), adapter_name_or_path=str(adapter_path))
        model_args.vpt = VPTArguments(**keys)
        return model_args

    with pytest.raises(ValueError, match=r"recipe key box_crop_margin: 0.5, but the adapter .*lora was trained with 0.16667"):
        apply_adapter_settings(base_config, load_args(adapter, box_crop_margin=0.5))
    agreeing = load_args(adapter, box_heads=True, num_inner_forward_run=1)
    apply_adapter_settings(base_config, agreeing)
    assert agreeing.vpt.mask_decoder is True and agreeing.vpt.customize_model_class == "vpt"
    adjusted = load_args(adapter, box_loss_weight=2.0)  # a training knob may change, to go on training
    apply_adapter_settings(base_config, adjusted)
    assert adjusted.vpt.box_loss_weight == 2.0 and adjusted.vpt.box_heads is True

    # An adapter saved without the settings (an older vpt-plugin) cannot silently load as a plain LoRA.
    older = tmp_path / "older"
    older.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (older / name).write_bytes((adapter / name).read_bytes())
    vpt_base = AutoConfig.from_pretrained(runs["root"] / "full")  # a VPT checkpoint's config carries the settings
    apply_adapter_settings(vpt_base, load_args(older))
    with pytest.raises(ValueError, match=r"its weights hold VPT modules \(\['box_heads', 'mask_decoder'\]\) but it has "
                                         r"no vpt_adapter_settings.json"):
        apply_adapter_settings(base_config, load_args(older))
