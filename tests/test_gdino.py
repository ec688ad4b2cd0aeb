"""The Grounding DINO branch ("gdino") through the battery every branch passes, on a tiny offline detector.

Forward and training signal, the reused prefix against the straightforward forward, one-call
generation against the two-round reference, the shipped recipes (alignment, then VPT tuning)
through ``llamafactory-cli``, export and reload with ``trust_remote_code``; plus what is its own:
the question it reads, its text tokenizer travelling with the checkpoint, and the original
GroundingDINO checkpoint layout.
"""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import batch_of, reencoding_example, region_example, shape_image
from scripted import ScriptedTurns, prompt_batch
from test_export import probe_before_and_after
from test_generation import generate, reference
from test_llamafactory import ENV, REPO
from test_reuse_first_pass import check_reuse_equals_straightforward, plain_example
from transformers import AutoModelForImageTextToText, AutoProcessor, GroundingDinoForObjectDetection

from vpt_plugin.branches import VPTInputError, get_branch
from vpt_plugin.branches.gdino import (
    TOKENIZER_FOLDER,
    bytes_to_texts,
    original_grounding_dino_to_transformers,
    texts_to_bytes,
)
from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.cli import main as vpt_main
from vpt_plugin.conversation import encode_conversation
from vpt_plugin.demo import run_recipe, training_losses
from vpt_plugin.perception import questions_for_images
from vpt_plugin.vocabulary import REENCODING_PROMPT

BRANCH = get_branch("gdino")
QUESTION = "What colour is the square? "


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return BRANCH.save_tiny_encoder(tmp_path_factory.mktemp("grounding-dino") / "detector")


@pytest.fixture(scope="module")
def gdino_vpt_dir(tiny_base_dir, detector_dir, tmp_path_factory):
    return init_vpt_checkpoint(str(tiny_base_dir), tmp_path_factory.mktemp("gdino-vpt"), ["gdino", "clip"],
                               encoder_weights={"gdino": str(detector_dir)})


@pytest.fixture
def gdino_model(gdino_vpt_dir):
    model = AutoModelForImageTextToText.from_pretrained(gdino_vpt_dir).eval()
    model.config.para_mask_id = 0
    return model


@pytest.fixture
def gdino_processor(gdino_vpt_dir):
    return AutoProcessor.from_pretrained(gdino_vpt_dir)


# ----------------------------------------------------------------------------- the question it reads


def test_the_branch_reads_the_question_that_asked_for_its_image(gdino_model, gdino_processor):
    example = reencoding_example(gdino_processor, gdino_model.config, "gdino", question=QUESTION)
    pad = BRANCH.tokens.image_pad
    assert questions_for_images(example["input_ids"], pad, gdino_processor.tokenizer) == ["What colour is the square?"]
    assert bytes_to_texts(example["gdino_texts"]) == ["what colour is the square?."]
    # An alignment row: the instruction beside the branch image is what the detector reads.
    image = shape_image((2, 3), "blue")
    messages = [{"role": "user", "content": f"{BRANCH.tokens.placeholder}Describe the blue square."},
                {"role": "assistant", "content": "blue"}]
    aligned = encode_conversation(gdino_processor, gdino_model.config, messages, branch_images={"gdino": [image]})
    assert bytes_to_texts(aligned["gdino_texts"]) == ["describe the blue square."]


def test_texts_travel_as_fixed_width_bytes():
    texts = ["a red square.", "", "ünïcode ok."]
    data = texts_to_bytes(texts)
    assert data.dtype == torch.uint8 and data.shape[0] == 3 and data.shape[1] == texts_to_bytes(["x"]).shape[1]
    assert bytes_to_texts(data) == texts


def test_features_depend_on_the_question(gdino_model, gdino_processor):
    image = shape_image((5, 2), "red")
    features = []
    for question in ("the red square.", "the blue circle at the left."):
        inputs = BRANCH.preprocess([image], gdino_processor, [question])
        with torch.no_grad():
            features.append(BRANCH.encode(gdino_model, inputs))
    assert features[0].shape == (1, BRANCH.feature_tokens(gdino_model.config, [image], gdino_processor)[0],
                                 gdino_model.config.branch_encoder_configs["gdino"]["d_model"] + 4)
    assert not torch.allclose(features[0], features[1])


def test_features_do_not_depend_on_the_batch(gdino_model, gdino_processor):
    """The processor pads a batch to its largest image; each image's features are its own all the same."""
    wide, tall = shape_image((5, 2), "red").resize((300, 200)), shape_image((1, 6), "blue").resize((200, 300))
    with torch.no_grad():
        alone = BRANCH.encode(gdino_model, BRANCH.preprocess([wide], gdino_processor, ["the red square."]))
        together = BRANCH.encode(gdino_model, BRANCH.preprocess([wide, tall], gdino_processor,
                                                                 ["the red square.", "the blue square."]))
    torch.testing.assert_close(together[0], alone[0])


# ----------------------------------------------------------------------------- forward and reuse


def test_forward_trains_the_projector_and_the_control_reweights(gdino_model, gdino_processor):
    gdino_model.train()
    batch = batch_of(gdino_processor, [reencoding_example(gdino_processor, gdino_model.config, "gdino")])
    out = gdino_model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    projector = gdino_model.gdino_projector
    for name in ("linear_feature", "linear_box", "linear_condition"):
        assert getattr(projector, name).weight.grad.abs().sum() > 0, name
    # The detector is frozen in the recipes but differentiable: the loss reaches it.
    assert gdino_model.gdino_model.model.text_projection.weight.grad.abs().sum() > 0


def gdino_mixed_batch(processor, config):
    examples = [
        reencoding_example(processor, config, "gdino", colour="red", cell=(5, 2)),
        region_example(processor, config),
        reencoding_example(processor, config, "clip", colour="green", cell=(3, 7)),
        reencoding_example(processor, config, "gdino", colour="blue", cell=(0, 0), question="Which shape is it? "),
        plain_example(processor, config),
    ]
    return batch_of(processor, examples)


@pytest.mark.parametrize("para_mask_id", [0, 2])
def test_reused_prefix_equals_the_straightforward_forward(gdino_model, gdino_processor, para_mask_id):
    batch = gdino_mixed_batch(gdino_processor, gdino_model.config)
    check_reuse_equals_straightforward(gdino_model, gdino_processor, None, para_mask_id, batch)


def test_the_idle_inputs_run_the_branch(gdino_model):
    """What a ZeRO rank without gdino images runs, so every rank runs every module."""
    like = torch.zeros(1, dtype=torch.float32)
    encoded = BRANCH.encode(gdino_model, BRANCH.dummy_inputs(gdino_model, like))
    assert torch.isfinite(encoded).all()
    projected = gdino_model.gdino_projector.project_features(BRANCH.dummy_features(gdino_model.config, like))
    assert projected[0].shape[-1] == gdino_model.config.text_config.hidden_size


# ----------------------------------------------------------------------------- generation


def test_one_call_generation_equals_the_two_round_reference(gdino_model, gdino_processor):
    images = [shape_image((5, 2), "red"), shape_image((1, 6), "blue"), shape_image((3, 3), "green")]
    questions = [f"Row {k}. What colour is the square? {REENCODING_PROMPT}" for k in range(3)]
    batch = prompt_batch(gdino_processor, gdino_model.config, questions, images)
    script = ScriptedTurns(gdino_processor.tokenizer)
    script.add(batch["prompts"][0], {0: BRANCH.tokens.action_start})
    script.add(batch["prompts"][2], {0: BRANCH.tokens.action_start})
    answers, traces = generate(gdino_model, gdino_processor, batch, script, images)
    for k in range(3):
        ref_answer, ref_trace = reference(gdino_model, gdino_processor, batch, script, images, k)
        assert answers[k] == ref_answer, f"row {k}: one-call {answers[k]} != reference {ref_answer}"
        assert traces[k] == ref_trace.to_dict()
    assert [t["rounds"][0]["kind"] if t["rounds"] else None for t in traces][::2] == ["gdino", "gdino"]


# ----------------------------------------------------------------------------- checkpoints


def test_the_text_tokenizer_travels_with_the_checkpoint(gdino_model, gdino_vpt_dir, tmp_path):
    assert (Path(gdino_vpt_dir) / TOKENIZER_FOLDER / "tokenizer_config.json").is_file()
    gdino_model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.gdino_text_tokenizer.get_vocab() == gdino_model.gdino_text_tokenizer.get_vocab()
    # Without it the branch cannot run, and says what is missing.
    gdino_model.save_pretrained(tmp_path / "bare")
    for file in (tmp_path / "bare" / TOKENIZER_FOLDER).iterdir():
        file.unlink()
    bare = AutoModelForImageTextToText.from_pretrained(tmp_path / "bare")
    with pytest.raises(VPTInputError, match=r"the gdino branch has no text tokenizer: .* lacks gdino_tokenizer/"):
        BRANCH.encode(bare, BRANCH.dummy_inputs(bare, torch.zeros(1)))


def test_init_without_a_detector_says_what_to_give(tiny_base_dir, tmp_path):
    with pytest.raises(VPTInputError, match=r"needs a Grounding DINO checkpoint for its text tokenizer \(`vpt init --gdino`"):
        init_vpt_checkpoint(str(tiny_base_dir), tmp_path / "out", ["gdino"],
                            encoder_configs={"gdino": BRANCH.tiny_encoder_config()})


def to_original_layout(state: dict) -> dict:
    """transformers' GroundingDinoForObjectDetection keys -> the original GroundingDINO repository's, written
    out per module as that repository names them (the inverse of the branch's conversion, stated independently)."""
    original = {}
    swin = "model.backbone.conv_encoder.model."
    for key, value in state.items():
        if key.startswith("bbox_embed."):
            original[key] = value  # the detection head's own copy of the decoder's box MLPs
            continue
        new = key
        if key.startswith(swin):
            new = key[len(swin):]
            new = new.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
            new = new.replace("embeddings.norm.", "patch_embed.norm.")
            new = re.sub(r"hidden_states_norms\.stage(\d)", lambda m: f"norm{int(m[1]) - 1}", new)
            new = new.replace("encoder.layers.", "layers.").replace("layernorm_before", "norm1")
            new = new.replace("layernorm_after", "norm2").replace("attention.output.dense", "attn.proj")
            new = new.replace("attention.self.relative_position", "attn.relative_position")
            new = new.replace("intermediate.dense", "mlp.fc1").replace("output.dense", "mlp.fc2")
            new = "backbone.0." + new
        else:
            for hf, orig in [
                (r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn_layer_norm", r"transformer.encoder.layers.\1.norm1"),
                (r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.final_layer_norm", r"transformer.encoder.layers.\1.norm2"),
                (r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.fc(\d)", r"transformer.encoder.layers.\1.linear\2"),
                (r"^model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn", r"transformer.encoder.layers.\1.self_attn"),
                (r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc(\d)", r"transformer.encoder.text_layers.\1.linear\2"),
                (r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_before", r"transformer.encoder.text_layers.\1.norm1"),
                (r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_after", r"transformer.encoder.text_layers.\1.norm2"),
                (r"^model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn", r"transformer.encoder.text_layers.\1.self_attn"),
                (r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.vision_param", r"transformer.encoder.fusion_layers.\1.gamma_v"),
                (r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.text_param", r"transformer.encoder.fusion_layers.\1.gamma_l"),
                (r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_vision", r"transformer.encoder.fusion_layers.\1.layer_norm_v"),
                (r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_text", r"transformer.encoder.fusion_layers.\1.layer_norm_l"),
                (r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.(out_|values_|)vision_proj", r"transformer.encoder.fusion_layers.\1.attn.\2v_proj"),
                (r"^model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.(out_|values_|)text_proj", r"transformer.encoder.fusion_layers.\1.attn.\2l_proj"),
                (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_text_layer_norm", r"transformer.decoder.layers.\1.catext_norm"),
                (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_text", r"transformer.decoder.layers.\1.ca_text"),
                (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm", r"transformer.decoder.layers.\1.norm1"),
                (r"^model\.decoder\.layers\.(\d+)\.encoder_attn", r"transformer.decoder.layers.\1.cross_attn"),
                (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm", r"transformer.decoder.layers.\1.norm2"),
                (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm", r"transformer.decoder.layers.\1.norm3"),
                (r"^model\.decoder\.layers\.(\d+)\.fc(\d)", r"transformer.decoder.layers.\1.linear\2"),
                (r"^model\.decoder\.layers\.(\d+)\.self_attn", r"transformer.decoder.layers.\1.self_attn"),
                (r"^model\.decoder\.layer_norm", "transformer.decoder.norm"),
                (r"^model\.decoder\.reference_points_head", "transformer.decoder.ref_point_head"),
                (r"^model\.decoder\.bbox_embed", "transformer.decoder.bbox_embed"),
                (r"^model\.encoder_output_bbox_embed", "transformer.enc_out_bbox_embed"),
                (r"^model\.(enc_output|enc_output_norm|level_embed)", r"transformer.\1"),
                (r"^model\.query_position_embeddings", "transformer.tgt_embed"),
                (r"^model\.text_backbone", "bert"),
                (r"^model\.text_projection", "feat_map"),
                (r"^model\.input_proj_vision", "input_proj"),
            ]:
                if re.match(hf, key):
                    new = re.sub(hf, orig, key)
                    break
        original[new] = value
    # Fused projections: Swin's qkv, and nn.MultiheadAttention's in_proj in the text and decoder attentions.
    for stem in sorted({k.rsplit(".", 2)[0] for k in original if re.search(r"\.(query|key|value)\.(weight|bias)$", k)}):
        if stem.startswith("bert."):
            continue  # BERT keeps separate query, key and value in both layouts
        fused = "qkv." if stem.startswith("backbone.0.") else "in_proj_"
        target = stem.replace("attention.self", "attn") if stem.startswith("backbone.0.") else stem
        for kind in ("weight", "bias"):
            parts = [original.pop(f"{stem}.{part}.{kind}") for part in ("query", "key", "value")]
            original[f"{target}.{fused}{kind}"] = torch.cat(parts)
    original["bert.embeddings.position_ids"] = torch.arange(4)[None]  # present in the original, dropped on load
    return {"model": {f"module.{key}": value for key, value in original.items()}}


def test_an_original_checkpoint_loads_and_computes_as_the_transformers_one(detector_dir, tmp_path):
    detector = GroundingDinoForObjectDetection.from_pretrained(detector_dir).eval()
    torch.save(to_original_layout(detector.state_dict()), tmp_path / "groundingdino_tiny.pth")
    config = BRANCH.tiny_encoder_config()
    converted = original_grounding_dino_to_transformers(torch.load(tmp_path / "groundingdino_tiny.pth")["model"])
    rebuilt = GroundingDinoForObjectDetection(config).eval()
    missing, unexpected = rebuilt.load_state_dict(converted, strict=False)
    assert not unexpected and not [k for k in missing if "relative_position_index" not in k], (missing, unexpected)
    processor = AutoProcessor.from_pretrained(detector_dir)
    inputs = processor(images=[shape_image((2, 2), "red")], text=["a red square."], return_tensors="pt")
    with torch.no_grad():
        expected, found = detector(**inputs), rebuilt(**inputs)
    torch.testing.assert_close(found.logits, expected.logits)
    torch.testing.assert_close(found.pred_boxes, expected.pred_boxes)

    # `vpt init --gdino x.pth --gdino-config cfg.json`: the tokenizer is read from the .pth file's folder.
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "gdino.json").write_text(json.dumps(config.to_dict()))
    vpt_main(["init", "--tiny", "--output", str(tmp_path / "vpt"), "--branches", "gdino",
              "--gdino", str(tmp_path / "groundingdino_tiny.pth"), "--gdino-config", str(tmp_path / "gdino.json")])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "vpt")
    for key, value in detector.state_dict().items():
        torch.testing.assert_close(model.gdino_model.state_dict()[key], value, msg=key)


# ----------------------------------------------------------------------------- LLaMA-Factory and export


def gdino_rows(rows: list[dict]) -> list[dict]:
    """Demo rows of the DINOv2 branch as gdino rows: its tokens, placeholder and column renamed."""
    dino = get_branch("dino").tokens
    text = json.dumps(rows)
    for old, new in ((dino.action_start, BRANCH.tokens.action_start), (dino.action_end, BRANCH.tokens.action_end),
                     (dino.action, BRANCH.tokens.action), (dino.placeholder, BRANCH.tokens.placeholder),
                     (get_branch("dino").data_column, BRANCH.data_column)):
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    return json.loads(text)


@pytest.fixture(scope="module")
def gdino_data(tmp_path_factory):
    """The recipes' datasets: ``gdino_alignment_train`` from the demo's DINOv2 alignment rows (images under
    data/), ``gdino_vpt_train`` made by ``vpt data convert --branches gdino`` from VQA rows with boxes (as a
    user makes them, e.g. from ``vpt data propose``; images in this folder)."""
    folder = tmp_path_factory.mktemp("gdino-data")
    alignment = gdino_rows(json.loads((REPO / "data" / "demo" / "alignment_demo_detection_train.json").read_text()))
    (folder / "gdino_alignment_train.json").write_text(json.dumps(alignment))
    (folder / "images").mkdir()
    vqa = []
    for k, (colour, cell) in enumerate([("red", (5, 2)), ("blue", (1, 6)), ("green", (3, 3)), ("yellow", (6, 0))] * 2):
        shape_image(cell, colour).save(folder / "images" / f"{k}.png")
        box = [cell[0] * 28 + 2, cell[1] * 28 + 2, cell[0] * 28 + 25, cell[1] * 28 + 25]
        vqa.append({"image": f"images/{k}.png", "question": "What colour is the square?", "answer": colour, "box": box})
    (folder / "vqa.json").write_text(json.dumps(vqa))
    vpt_main(["data", "convert", str(folder / "vqa.json"), "--output", str(folder / "gdino_vpt_train.json"),
              "--media-dir", str(folder), "--branches", "gdino"])
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    info = {name: {"file_name": f"{name}.json", "formatting": "vpt_sharegpt", "tags": tags,
                   "columns": {"messages": "messages", "images": "images", BRANCH.data_column: BRANCH.data_column}}
            for name in ("gdino_alignment_train", "gdino_vpt_train")}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def on_a_cpu(recipe: Path, **changed) -> dict:
    """A shipped recipe with the tiny model, data and a CPU's settings laid over it."""
    settings = yaml.safe_load(recipe.read_text())
    settings.update(deepspeed=None, bf16=False, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    max_steps=2, logging_steps=1, save_steps=100, eval_strategy="no", preprocessing_num_workers=1,
                    dataloader_num_workers=0, image_max_pixels=12544, report_to="none", **changed)
    return {key: value for key, value in settings.items() if value is not None and key != "val_size"}


@pytest.fixture(scope="module")
def trained(tiny_base_dir, detector_dir, gdino_data, tmp_path_factory):
    """The two shipped gdino recipes through ``llamafactory-cli train``: alignment from a plain base, then VPT tuning."""
    root = tmp_path_factory.mktemp("gdino-train")
    alignment = on_a_cpu(REPO / "configs" / "Qwen2.5-VL-3b-VPT-GDino-Alignment.yaml", model_name_or_path=str(tiny_base_dir),
                         vision_encoder_paths=f"gdino={detector_dir}", output_dir=str(root / "aligned"),
                         dataset_dir=str(gdino_data), media_dir=str(REPO / "data"))
    tuning = on_a_cpu(REPO / "configs" / "Qwen2.5-VL-3b-VPT-GDino.yaml", model_name_or_path=str(root / "aligned"),
                      output_dir=str(root / "tuned"), dataset_dir=str(gdino_data))
    for name, recipe in (("aligned", alignment), ("tuned", tuning)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        run_recipe(root / f"{name}.yaml", root / f"{name}.log", env=ENV)
    return root


def test_the_recipes_align_then_tune_through_llamafactory(trained):
    for name, passes in (("aligned", 1), ("tuned", 2)):
        losses = training_losses(trained / name)
        assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), (name, losses)
        config = json.loads((trained / name / "config.json").read_text())
        assert config["vision_encoder_ls"] == ["gdino"] and config["num_inner_forward_run"] == passes
        assert (trained / name / TOKENIZER_FOLDER / "tokenizer_config.json").is_file(), name


def test_export_and_reload_with_trust_remote_code_answer_alike(trained, tmp_path):
    vpt_main(["export", str(trained / "tuned"), str(tmp_path / "exported"), "--base-model", "Qwen/Qwen2.5-VL-3B-Instruct"])
    assert (tmp_path / "exported" / TOKENIZER_FOLDER / "tokenizer_config.json").is_file()
    cases = {"gdino": {"before": {"load": "auto", "path": str(trained / "tuned"), "out": str(tmp_path / "before")},
                       "after": {"path": str(tmp_path / "exported"), "out": str(tmp_path / "after")}}}
    probe_before_and_after(cases, tmp_path)
    before, after = cases["gdino"]["before"], cases["gdino"]["after"]
    assert after["model_module"].startswith("transformers_modules.") and not after["vpt_plugin_imported"]
    assert torch.equal(after["logits"], before["logits"])
    assert after["answers"] == before["answers"] and after["traces"] == before["traces"]
    assert [t["rounds"][0]["kind"] for t in after["traces"]] == ["region", "gdino"], after["traces"]
