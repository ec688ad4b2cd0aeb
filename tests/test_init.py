"""``vpt init``: tokens, embeddings, config ids, and branch encoder weights from real checkpoints."""

import json
import math
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from transformers import AutoModelForImageTextToText, AutoProcessor, Dinov2Model, SamConfig, SamModel

from vpt_plugin.branches import get_branch
from vpt_plugin.checkpoint import check_token_ids, load_strict
from vpt_plugin.cli import main as vpt_main
from vpt_plugin.tiny import tiny_encoder_configs
from vpt_plugin.vocabulary import new_tokens


def official_tiny_sam():
    """segment-anything's own image encoder at the tiny SAM config's shape, with non-trivial weights."""
    cfg = tiny_encoder_configs()["sam"]
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, mlp_ratio=cfg.mlp_dim / cfg.hidden_size, out_chans=cfg.output_channels,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
    ).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)  # rel-pos and pos-embed start at zero
    return encoder


def save_official_checkpoint(encoder, path):
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)  # the rest of a full SAM file
    torch.save(state, path)


def test_official_sam_weights_give_segment_anythings_features(tmp_path):
    official = official_tiny_sam()
    save_official_checkpoint(official, tmp_path / "sam_vit_tiny.pth")
    branch = get_branch("sam")
    config, state = branch.pretrained_encoder(str(tmp_path / "sam_vit_tiny.pth"), tiny_encoder_configs()["sam"])
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    encoder = SamVisionEncoder(config).eval()
    load_strict(encoder, state, "official SAM")
    pixels = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        ours = encoder(pixel_values=pixels).last_hidden_state
        theirs = official(pixels)
    assert ours.shape == (1, 256, 64, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_transformers_sam_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    sam = SamModel(SamConfig(vision_config=tiny_encoder_configs()["sam"].to_dict()))
    sam.save_pretrained(tmp_path / "sam")
    config, state = get_branch("sam").pretrained_encoder(str(tmp_path / "sam"))
    assert config.hidden_size == 32
    for key, value in sam.vision_encoder.state_dict().items():
        torch.testing.assert_close(state[key], value)


def test_init_with_encoder_checkpoints_and_new_token_rows(tiny_base_dir, tmp_path):
    torch.manual_seed(0)
    dino = Dinov2Model(tiny_encoder_configs()["dino"])
    dino.save_pretrained(tmp_path / "dino")
    official = official_tiny_sam()
    save_official_checkpoint(official, tmp_path / "sam_vit_tiny.pth")
    (tmp_path / "sam.json").write_text(json.dumps(tiny_encoder_configs()["sam"].to_dict()))

    vpt_main([
        "init", "--base", str(tiny_base_dir), "--output", str(tmp_path / "vpt"), "--branches", "dino,sam",
        "--dino", str(tmp_path / "dino"), "--sam", str(tmp_path / "sam_vit_tiny.pth"), "--sam-config", str(tmp_path / "sam.json"),
    ])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "vpt")
    processor = AutoProcessor.from_pretrained(tmp_path / "vpt")
    tokenizer = processor.tokenizer

    for key, value in dino.state_dict().items():
        torch.testing.assert_close(model.detection_model.state_dict()[key], value)
    assert model.config.branch_encoder_configs["dino"]["hidden_size"] == 32
    torch.testing.assert_close(model.seg_model.pos_embed, official.pos_embed)
    assert model.config.vision_encoder_ls == ["dino", "sam"]
    assert model.config.num_inner_forward_run == 2 and model.config.para_mask_id == 1

    # Every new token is in the tokenizer, special or not as released, and its id is in the config.
    ordinary, special = new_tokens(["detection", "seg"])
    vocab = tokenizer.get_vocab()
    assert all(token in vocab for token in ordinary + special)
    assert set(special) <= set(tokenizer.all_special_tokens)
    assert not set(ordinary) & set(tokenizer.all_special_tokens)
    check_token_ids(model.config, tokenizer)
    assert model.config.detection_action_id == vocab["<|detection_action|>"]
    assert model.config.para_start_id == vocab["<|im_start|>"]
    assert model.config.clip_action_id is None  # no clip branch, no clip tokens

    # New rows: the mean of the old rows plus N(0, 1/sqrt(d)) noise, in the input and output embeddings.
    new_ids = torch.tensor([vocab[t] for t in ordinary + special])
    old_rows = min(new_ids).item()
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        mean = weight[:old_rows].mean(dim=0)
        noise = weight[new_ids] - mean
        assert abs(noise.std().item() - 1 / math.sqrt(weight.shape[1])) < 0.2 / math.sqrt(weight.shape[1])
        assert abs(noise.mean().item()) < 0.02


def test_init_refuses_a_base_that_is_not_qwen2_vl(tmp_path):
    from transformers import Dinov2Model

    Dinov2Model(tiny_encoder_configs()["dino"]).save_pretrained(tmp_path / "not-qwen")
    with pytest.raises(SystemExit):
        vpt_main(["init", "--base", str(tmp_path / "not-qwen"), "--output", str(tmp_path / "out")])


def test_dino_weights_for_the_clip_branch_are_refused(tiny_base_dir, tmp_path):
    from vpt_plugin.checkpoint import init_vpt_checkpoint

    with pytest.raises(ValueError, match="branch 'clip' uses the model's own ViT"):
        init_vpt_checkpoint(str(tiny_base_dir), tmp_path, ["clip"], encoder_weights={"clip": "anything"})


def test_init_tiny_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    for name in ("a", "b"):
        vpt_main(["init", "--tiny", "--output", str(tmp_path / name), "--seed", "3"])
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
