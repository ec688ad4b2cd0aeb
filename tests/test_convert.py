"""``vpt convert``: published checkpoints give the published code's logits and loss."""

import json

import pytest
import torch
from conftest import batch_of, reencoding_example, region_example
from published_reference import (
    PublishedVPT,
    flat_config,
    published_layout,
    random_projector,
    write_published_checkpoint,
)
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

from vpt_plugin.checkpoint import add_vpt_tokens
from vpt_plugin.cli import main as vpt_main
from vpt_plugin.tiny import tiny_encoder_configs

ENCODER_OPTION = {"dino": "--detection-config", "sam": "--seg-config"}


def build_published(branch, tiny_base_dir, directory):
    """A checkpoint as the published code saves it, with random weights, for one branch."""
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    add_vpt_tokens(tokenizer, [branch])
    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_base_dir)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    state = published_layout(base.state_dict())
    encoder_configs = {name: cfg.to_dict() for name, cfg in tiny_encoder_configs().items()}
    hidden = base.config.text_config.hidden_size
    if branch == "dino":
        from transformers import Dinov2Model

        encoder = Dinov2Model(tiny_encoder_configs()["dino"])
        state.update({f"detection_model.{k}": v for k, v in encoder.state_dict().items()})
    elif branch == "sam":
        from transformers.models.sam.modeling_sam import SamVisionEncoder

        encoder = SamVisionEncoder(tiny_encoder_configs()["sam"])
        # A random (not zero) position embedding, so the test sees it.
        encoder.pos_embed.data.normal_(0, 0.02, generator=generator)
        state.update({f"seg_model.{k}": v for k, v in encoder.state_dict().items()})
    state.update(random_projector(branch, hidden, 32, generator))
    vocab = tokenizer.get_vocab()
    token_ids = {}
    for prefix in ("detection", "clip", "seg"):
        token_ids[f"{prefix}_image_token_id"] = vocab.get(f"<|{prefix}_image_pad|>")
        token_ids[f"{prefix}_action_id"] = vocab.get(f"<|{prefix}_action|>")
        token_ids[f"{prefix}_action_start_id"] = vocab.get(f"<|{prefix}_action_start|>")
    vpt_fields = dict(
        num_inner_forward_run=2, projector_scale=1, para_mask_id=1, para_mask_ratio=0.5, alignment=False,
        vision_encoder_ls=[branch], para_start_id=vocab["<|im_start|>"], para_end_id=vocab["<|im_end|>"],
    )
    config_json = flat_config(base.config, vpt_fields, token_ids, "vrt_qwen2_vl" if branch == "clip" else "qwen2_vl_vpt")
    write_published_checkpoint(directory, config_json, state, tokenizer)
    for name, encoder_config in encoder_configs.items():
        (directory.parent / f"{name}-config.json").write_text(json.dumps(encoder_config))
    return config_json, state, encoder_configs


@pytest.fixture(scope="module", params=["dino", "sam", "clip"])
def converted(request, tiny_base_dir, tmp_path_factory):
    branch = request.param
    root = tmp_path_factory.mktemp(f"published-{branch}")
    config_json, state, encoder_configs = build_published(branch, tiny_base_dir, root / "published")
    args = ["convert", str(root / "published"), str(root / "converted")]
    if branch in ENCODER_OPTION:
        args += [ENCODER_OPTION[branch], str(root / f"{branch}-config.json")]
    vpt_main(args)
    return branch, root, PublishedVPT(config_json, state, encoder_configs)


CASES = [
    # (num_inner_forward_run, para_mask_id, explicit M-RoPE positions)
    (2, 0, True), (2, 1, True), (2, 2, True), (1, 0, True), (2, 1, False), (1, 0, False),
]


@pytest.mark.parametrize("passes, para_mask_id, mrope", CASES)
def test_converted_checkpoint_matches_the_published_forward(converted, passes, para_mask_id, mrope):
    branch, root, reference = converted
    model = AutoModelForImageTextToText.from_pretrained(root / "converted").train()  # para masking runs in training mode
    processor = AutoProcessor.from_pretrained(root / "converted")
    config = model.config
    batch = batch_of(processor, [reencoding_example(processor, config, branch), region_example(processor, config)])
    action = config.branch_ids(branch)["action"]
    batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == action, -100)  # as the published data pipeline

    config.num_inner_forward_run = reference.cfg["num_inner_forward_run"] = passes
    config.para_mask_id = reference.cfg["para_mask_id"] = para_mask_id
    config.para_mask_ratio = reference.cfg["para_mask_ratio"] = 1.0
    position_ids = None
    if mrope:
        mm_types = (batch["input_ids"] == config.image_token_id).int()
        position_ids, _ = model.model.get_rope_index(
            batch["input_ids"], mm_types, batch["image_grid_thw"], attention_mask=batch["attention_mask"]
        )
    else:
        config.reference_compat = True  # the published code trains with 1-D positions when given none

    with torch.no_grad():
        ours = model(**batch, position_ids=position_ids)
        ref_logits, ref_loss = reference(batch, position_ids=position_ids)
    assert (ours.logits.float() - ref_logits).abs().max() <= 1e-4
    assert abs(ours.loss.item() - ref_loss.item()) <= 1e-4


def test_para_mask_draws_match_the_published_code(converted):
    """With ratio 0.5, the same seed masks the same batches as the published code."""
    branch, root, reference = converted
    model = AutoModelForImageTextToText.from_pretrained(root / "converted").train()  # para masking runs in training mode
    processor = AutoProcessor.from_pretrained(root / "converted")
    batch = batch_of(processor, [reencoding_example(processor, model.config, branch)])
    action = model.config.branch_ids(branch)["action"]
    batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == action, -100)
    model.config.num_inner_forward_run = reference.cfg["num_inner_forward_run"] = 2
    model.config.para_mask_id = reference.cfg["para_mask_id"] = 2
    model.config.para_mask_ratio = reference.cfg["para_mask_ratio"] = 0.5
    model.config.reference_compat = True
    losses = []
    for seed in range(4):
        with torch.no_grad():
            torch.manual_seed(seed)
            ours = model(**batch).loss.item()
            torch.manual_seed(seed)
            _, theirs = reference(batch)
        assert abs(ours - theirs.item()) <= 1e-4
        losses.append(round(ours, 4))
    assert len(set(losses)) > 1, "the draws should mask some batches and not others"


def test_unused_published_projector_keys_are_dropped_and_others_must_match(tiny_base_dir, tmp_path):
    build_published("clip", tiny_base_dir, tmp_path / "published")
    state = torch.load(tmp_path / "published" / "pytorch_model.bin", weights_only=True)
    assert "clip_projector.linear_feature.weight" in state  # dropped silently: the published forward never reads it

    state["clip_projector.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "published" / "pytorch_model.bin")
    with pytest.raises(SystemExit):
        vpt_main(["convert", str(tmp_path / "published"), str(tmp_path / "out")])
    from vpt_plugin.convert import convert_published_checkpoint

    with pytest.raises(ValueError, match=r"unexpected keys: \['clip_projector.extra.weight'\]"):
        convert_published_checkpoint(tmp_path / "published", tmp_path / "out")

    del state["clip_projector.extra.weight"], state["lm_head.weight"]
    state["clip_projector.linear_condition.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "published" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing keys: \['lm_head.weight'\][\s\S]*clip_projector.linear_condition.bias: expected \(128,\), found \(3,\)"):
        convert_published_checkpoint(tmp_path / "published", tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written for a checkpoint that does not match"


class NotWeights:
    """Any pickled object that is not a tensor container."""


def test_pickled_objects_are_refused(tiny_base_dir, tmp_path):
    from vpt_plugin.convert import convert_published_checkpoint

    build_published("clip", tiny_base_dir, tmp_path / "published")
    torch.save({"not_weights": NotWeights()}, tmp_path / "published" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refused by torch.load\(weights_only=True\)"):
        convert_published_checkpoint(tmp_path / "published", tmp_path / "out")


def test_tied_embeddings_and_sharded_bin_files(tiny_base_dir, tmp_path):
    """Qwen2-VL-2B ties lm_head to the embeddings; large checkpoints come in several .bin shards."""
    config_json, state, _ = build_published("clip", tiny_base_dir, tmp_path / "published")
    config_json["tie_word_embeddings"] = True
    (tmp_path / "published" / "config.json").write_text(json.dumps(config_json))
    (tmp_path / "published" / "pytorch_model.bin").unlink()
    keys = sorted(state)
    torch.save({k: state[k] for k in keys[: len(keys) // 2]}, tmp_path / "published" / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[len(keys) // 2 :]}, tmp_path / "published" / "pytorch_model-00002-of-00002.bin")
    vpt_main(["convert", str(tmp_path / "published"), str(tmp_path / "converted")])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "converted")
    assert model.config.tie_word_embeddings
    embeddings = model.get_input_embeddings().weight
    torch.testing.assert_close(embeddings, state["model.embed_tokens.weight"])
    assert model.lm_head.weight.data_ptr() == embeddings.data_ptr()


def test_a_checkpoint_without_tokenizer_files_is_named_and_converts_with_tokenizer(tiny_base_dir, tmp_path, capsys):
    build_published("clip", tiny_base_dir, tmp_path / "published")
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for path in (tmp_path / "published").iterdir():
        if path.name not in ("config.json", "pytorch_model.bin"):
            path.rename(tokenizer_dir / path.name)
    with pytest.raises(SystemExit):
        vpt_main(["convert", str(tmp_path / "published"), str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert "no tokenizer files (one of ['tokenizer.json', 'vocab.json', 'tokenizer.model']" in error, error
    assert "pass --tokenizer" in error and not (tmp_path / "out").exists()
    vpt_main(["convert", str(tmp_path / "published"), str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)])
    assert AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab() == AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
