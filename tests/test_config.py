import json

import pytest
from published_reference import flat_config
from transformers import AutoConfig, AutoModelForImageTextToText

from vpt_plugin import VPTInputError, VPTQwen2VLConfig, VRTQwen2VLConfig, VRTQwen2VLForConditionalGeneration
from vpt_plugin.bases import get_base
from vpt_plugin.tiny import tiny_tokenizer

PUBLISHED_FIELDS = dict(
    num_inner_forward_run=2, projector_scale=1, para_mask_id=1, para_mask_ratio=1, alignment=False,
    vision_encoder_ls=["clip"], para_start_id=3, para_end_id=4,
    detection_image_token_id=None, detection_action_id=None, detection_action_start_id=None,
    clip_image_token_id=620, clip_action_id=621, clip_action_start_id=622,
    seg_image_token_id=None, seg_action_id=None, seg_action_start_id=None,
)


@pytest.mark.parametrize("model_type, config_class", [("qwen2_vl_vpt", VPTQwen2VLConfig), ("vrt_qwen2_vl", VRTQwen2VLConfig)])
def test_published_config_json_loads_with_every_field(tmp_path, model_type, config_class):
    base = get_base("qwen2_vl").tiny_config(tiny_tokenizer())
    fields = dict(PUBLISHED_FIELDS)
    token_ids = {k: fields.pop(k) for k in list(fields) if k.endswith("_id") and k not in ("para_start_id", "para_end_id")}
    (tmp_path / "config.json").write_text(json.dumps(flat_config(base, fields, token_ids, model_type)))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is config_class
    for key, value in PUBLISHED_FIELDS.items():
        assert getattr(config, key) == value, key
    assert config.text_config.hidden_size == 128  # flat 4.45 text fields land in text_config
    assert config.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
    assert config.branch_encoder_configs == {}  # the published encoders' shapes apply


def test_released_clip_model_type_builds_the_vpt_model():
    config = VRTQwen2VLConfig(**{**PUBLISHED_FIELDS, "text_config": {"hidden_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 700,
                                   "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}},
                                   "vision_config": {"depth": 1, "embed_dim": 16, "hidden_size": 64, "num_heads": 1}})
    model = AutoModelForImageTextToText.from_config(config)
    assert isinstance(model, VRTQwen2VLForConditionalGeneration)
    assert hasattr(model, "clip_projector") and not hasattr(model, "detection_model")


def test_config_round_trip_keeps_vpt_fields_and_encoder_configs(tiny_vpt_dir, tmp_path):
    config = AutoConfig.from_pretrained(tiny_vpt_dir)
    config.para_mask_ratio = 0.25
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    without_path = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}
    assert without_path(again) == without_path(config)
    assert set(again.branch_encoder_configs) == {"dino", "sam"}


def test_vision_encoder_ls_as_a_comma_separated_string():
    assert VPTQwen2VLConfig(vision_encoder_ls="dino, clip").vision_encoder_ls == ["dino", "clip"]


@pytest.mark.parametrize("field, value, message", [
    ("num_inner_forward_run", 3, "num_inner_forward_run must be 1 or 2, got 3"),
    ("para_mask_id", 5, "para_mask_id must be 0, 1 or 2, got 5"),
    ("para_mask_ratio", 1.5, r"para_mask_ratio must be within 0..1, got 1.5"),
    ("para_start_id", None, "para masking needs para_start_id and para_end_id"),
])
def test_bad_vpt_settings_are_named(tiny_vpt_dir, field, value, message):
    config = AutoConfig.from_pretrained(tiny_vpt_dir)
    setattr(config, field, value)
    with pytest.raises(VPTInputError, match=message):
        config.check_forward_settings()
