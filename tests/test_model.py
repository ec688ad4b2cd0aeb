"""The two-pass VPT forward (method.md section 3) on the tiny checkpoint."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_of, reencoding_example, region_example, shape_image
from transformers import AutoModelForImageTextToText

from vpt_plugin import VPTInputError
from vpt_plugin.branches import BRANCHES, get_branch
from vpt_plugin.conversation import IGNORE_INDEX


class LanguageModelCalls:
    """Records the inputs_embeds and output states of each language-model pass.

    It reads the straightforward forward's two full passes (test_reuse_first_pass.py checks that
    the default, prefix-reusing forward gives the same loss, logits and gradients).
    """

    def __init__(self, model):
        model.config.reuse_first_pass = False
        self.embeds, self.states = [], []
        self.handles = [
            model.model.language_model.register_forward_hook(self._record, with_kwargs=True),
        ]

    def _record(self, module, args, kwargs, output):
        self.embeds.append(kwargs["inputs_embeds"])
        self.states.append(output.last_hidden_state)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def action_positions(batch, model, branch):
    ids = model.config.branch_ids(branch)
    return (batch["input_ids"] == ids["action"]).nonzero().tolist()


def test_save_and_load_round_trip_gives_the_same_logits(model, processor, tmp_path):
    batch = batch_of(processor, [reencoding_example(processor, model.config, b) for b in ("dino", "sam", "clip")])
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.branch_encoder_configs == model.config.branch_encoder_configs
    with torch.no_grad():
        after = reloaded(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("branch", ["dino", "sam", "clip"])
def test_control_state_is_the_pass_one_state_at_action_start(model, processor, branch):
    config = model.config
    example = reencoding_example(processor, config, branch, answer="red")
    changed_after = reencoding_example(processor, config, branch, answer="green")  # differs after action_start
    changed_before = reencoding_example(processor, config, branch, answer="red", question="Which colour? ")
    calls = LanguageModelCalls(model)
    controls = []
    projector = model.branch_projector(branch)
    hook = projector.layernorm_condition.register_forward_hook(lambda m, args, out: controls.append(args[0]))
    with torch.no_grad():
        model(**batch_of(processor, [example]))
        model(**batch_of(processor, [changed_after]))
        model(**batch_of(processor, [changed_before]))
    hook.remove()
    calls.remove()

    (row, col), = action_positions(batch_of(processor, [example]), model, branch)
    start = config.branch_ids(branch)["action_start"]
    assert example["input_ids"][col - 1] == start
    # The control is pass 1's state at action_start, injected at <|B_action|> in pass 2.
    torch.testing.assert_close(controls[0][0], calls.states[0][row, col - 1])
    torch.testing.assert_close(calls.embeds[1][row, col], calls.states[0][row, col - 1])
    # Causality: changing tokens after action_start leaves the control state unchanged.
    torch.testing.assert_close(controls[1], controls[0], rtol=0, atol=0)
    assert not torch.allclose(controls[2], controls[0]), "the control state does depend on the question"
    # ...while the branch features, re-weighted by it, differ from pass 1's in pass 2.
    pads = torch.tensor(example["input_ids"]) == config.branch_ids(branch)["image"]
    assert not torch.allclose(calls.embeds[1][0, pads], calls.embeds[0][0, pads])


def test_gradients_reach_the_llm_through_pass_one_and_the_projectors(model, processor):
    model.train()
    batch = batch_of(processor, [reencoding_example(processor, model.config, b) for b in ("dino", "sam", "clip")])
    calls = LanguageModelCalls(model)
    pass_one_grads = []
    original_record = calls._record

    def record_and_watch(module, args, kwargs, output):
        original_record(module, args, kwargs, output)
        if len(calls.states) == 1:
            output.last_hidden_state.register_hook(lambda grad: pass_one_grads.append(grad))

    calls.handles[0].remove()
    calls.handles = [model.model.language_model.register_forward_hook(record_and_watch, with_kwargs=True)]
    model(**batch).loss.backward()
    calls.remove()

    assert len(calls.states) == 2
    assert pass_one_grads and pass_one_grads[0].abs().sum() > 0, "no gradient flows back through pass 1"
    for name in ("dino", "sam", "clip"):
        projector = model.branch_projector(name)
        assert projector.linear_condition.weight.grad.abs().sum() > 0, name
    assert model.detection_projector.linear_feature.weight.grad.abs().sum() > 0
    assert model.seg_projector.conv_feature.weight.grad.abs().sum() > 0
    # New token embeddings train (the reference computes embeddings under no_grad; see reference_compat).
    action = model.config.branch_ids("clip")["action_start"]
    assert model.get_input_embeddings().weight.grad[action].abs().sum() > 0


def test_reference_compat_freezes_embeddings_and_uses_1d_positions(model, processor):
    model.train()
    batch = batch_of(processor, [reencoding_example(processor, model.config, "clip")])
    model.config.reference_compat = True
    model(**batch).loss.backward()
    assert model.get_input_embeddings().weight.grad is None
    with torch.no_grad():
        compat = model(**batch).logits
        length = batch["input_ids"].shape[1]
        positions = torch.arange(length).view(1, 1, -1).expand(3, 1, -1)
        model.config.reference_compat = False
        explicit_1d = model(**batch, position_ids=positions).logits
        mrope = model(**batch).logits
    torch.testing.assert_close(compat, explicit_1d)
    assert not torch.allclose(compat, mrope)


def test_explicit_mrope_positions_equal_the_default(model, processor):
    batch = batch_of(processor, [reencoding_example(processor, model.config, "clip"), region_example(processor, model.config)])
    mm_types = (batch["input_ids"] == model.config.image_token_id).int()
    position_ids, _ = model.model.get_rope_index(
        batch["input_ids"], mm_types, batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    with torch.no_grad():
        default = model(**batch).logits
        explicit = model(**batch, position_ids=position_ids).logits
    torch.testing.assert_close(explicit, default)


@pytest.mark.parametrize("para_mask_id, turns", [(1, (1,)), (2, (1, 3))])
def test_para_mask_zeroes_exactly_the_masked_turns(model, processor, para_mask_id, turns):
    config = model.config
    config.para_mask_id, config.para_mask_ratio = para_mask_id, 1.0
    model.train()
    batch = batch_of(processor, [reencoding_example(processor, config, "dino"), region_example(processor, config)])
    calls = LanguageModelCalls(model)
    with torch.no_grad():
        model(**batch)
    calls.remove()
    real = batch["attention_mask"].bool()  # the pad token's embedding row is zero by construction
    zeroed = (calls.embeds[1] == 0).all(dim=-1) & real

    ids = batch["input_ids"][0]
    starts = (ids == config.para_start_id).nonzero().flatten()
    ends = (ids == config.para_end_id).nonzero().flatten()
    expected = torch.zeros_like(ids, dtype=torch.bool)
    for turn in turns:
        expected[starts[turn] + 1 : ends[turn]] = True
    assert torch.equal(zeroed[0], expected)
    assert not zeroed[1].any(), "a row without action tokens is never masked"
    assert not ((calls.embeds[0] == 0).all(dim=-1) & real).any(), "pass 1 is never masked"

    for off in ("ratio", "eval mode"):  # para masking is for training only
        if off == "ratio":
            config.para_mask_ratio = 0.0
        else:
            config.para_mask_ratio = 1.0
            model.eval()
        calls = LanguageModelCalls(model)
        with torch.no_grad():
            model(**batch)
        calls.remove()
        assert not ((calls.embeds[1] == 0).all(dim=-1) & real).any(), off


def test_action_token_labels_are_ignored(model, processor):
    batch = batch_of(processor, [reencoding_example(processor, model.config, "sam")])
    action = model.config.branch_ids("sam")["action"]
    assert (batch["labels"] == action).any(), "the example labels its action token"
    with torch.no_grad():
        out = model(**batch)
    labels = batch["labels"].masked_fill(batch["input_ids"] == action, IGNORE_INDEX)
    expected = F.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)
    with_action = F.cross_entropy(out.logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=IGNORE_INDEX)
    assert not torch.isclose(out.loss, with_action)


def test_padded_batch_rows_match_their_single_row_results(model, processor):
    config = model.config
    examples = [reencoding_example(processor, config, "clip"), region_example(processor, config),
                reencoding_example(processor, config, "dino", colour="blue", cell=(0, 0))]
    batch = batch_of(processor, examples)
    with torch.no_grad():
        together = model(**batch).logits
        for row, example in enumerate(examples):
            alone = model(**batch_of(processor, [example])).logits[0]
            torch.testing.assert_close(together[row, : alone.shape[0]], alone, atol=2e-5, rtol=1e-4)


def test_one_pass_alignment_and_switching_passes_between_calls(model, processor):
    config = model.config
    batch = batch_of(processor, [reencoding_example(processor, config, "dino")])
    calls = LanguageModelCalls(model)
    with torch.no_grad():
        config.num_inner_forward_run = 1
        one = model(**batch).logits
        config.num_inner_forward_run = 2
        two = model(**batch).logits
    calls.remove()
    assert len(calls.embeds) == 3
    assert not torch.allclose(one, two)
    # One pass places un-weighted projector output and leaves the action token's own embedding.
    (row, col), = action_positions(batch, model, "dino")
    action_embedding = model.get_input_embeddings().weight[config.branch_ids("dino")["action"]]
    torch.testing.assert_close(calls.embeds[0][row, col], action_embedding)


def test_alignment_sample_without_action_tokens(model, processor):
    """Alignment data: a branch image and a caption, no action tokens, one pass."""
    from vpt_plugin.conversation import encode_conversation

    model.config.num_inner_forward_run = 1
    image = shape_image((3, 3), "red")
    messages = [{"role": "user", "content": "<seg_image>Describe the image."}, {"role": "assistant", "content": "red square"}]
    example = encode_conversation(processor, model.config, messages, branch_images={"sam": [image]})
    out = model(**batch_of(processor, [example]))
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------ bad input


def test_branch_images_without_action_token_name_the_row(model, processor):
    from vpt_plugin.conversation import encode_conversation

    image = shape_image((3, 3), "red")
    no_action = encode_conversation(
        processor, model.config,
        [{"role": "user", "content": "<detection_image>What colour?"}, {"role": "assistant", "content": "red"}],
        branch_images={"dino": [image]},
    )
    batch = batch_of(processor, [region_example(processor, model.config), no_action])
    with pytest.raises(VPTInputError, match=r"row 1: 1 <detection_image> image\(s\) but 0 <\|detection_action\|>"):
        model(**batch)


def test_pad_count_not_matching_features(model, processor):
    batch = batch_of(processor, [reencoding_example(processor, model.config, "dino")])
    batch["detection_images"] = torch.cat([batch["detection_images"]] * 2)
    with pytest.raises(VPTInputError, match=r"branch 'dino': the batch has 256 <\|detection_image_pad\|> tokens .* 2 image\(s\) give 512"):
        model(**batch)


def test_images_for_a_branch_the_model_lacks(tiny_base_dir, processor, tmp_path):
    from vpt_plugin.checkpoint import init_vpt_checkpoint

    clip_only = init_vpt_checkpoint(str(tiny_base_dir), tmp_path, ["clip"])
    model = AutoModelForImageTextToText.from_pretrained(clip_only)
    batch = batch_of(processor, [reencoding_example(processor, model.config, "clip")])
    with pytest.raises(VPTInputError, match=r"detection_images given, but this model has no 'dino' branch"):
        model(**batch, detection_images=torch.zeros(1, 3, 224, 224))


def test_unknown_branch_name():
    from vpt_plugin import VPTQwen2VLConfig

    with pytest.raises(Exception, match=re.escape(f"unknown vision branch 'owl'; known branches: {sorted(BRANCHES)}")):
        VPTQwen2VLConfig(vision_encoder_ls=["owl"])


def test_action_token_without_action_start(model, processor):
    batch = batch_of(processor, [reencoding_example(processor, model.config, "clip")])
    (row, col), = action_positions(batch, model, "clip")
    batch["input_ids"][row, col - 1] = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(VPTInputError, match=rf"row 0, position {col}: <\|clip_action\|> must follow <\|clip_action_start\|>"):
        model(**batch)


def test_missing_token_ids_in_config(model, processor):
    model.config.seg_action_id = None
    batch = batch_of(processor, [reencoding_example(processor, model.config, "clip")])
    with pytest.raises(VPTInputError, match=r"branch 'sam' .* lacks \['seg_action_id'\]"):
        model(**batch)


def test_config_ids_not_in_tokenizer(model, processor):
    from vpt_plugin.checkpoint import check_token_ids

    check_token_ids(model.config, processor.tokenizer)
    model.config.clip_action_id = 3
    with pytest.raises(ValueError, match=r"config clip_action_id=3 but the tokenizer has <\|clip_action\|> id \d+"):
        check_token_ids(model.config, processor.tokenizer)


def test_para_mask_row_without_enough_turns(model, processor):
    from vpt_plugin.conversation import encode_conversation

    model.config.para_mask_id, model.config.para_mask_ratio = 2, 1.0
    model.train()
    image = shape_image((3, 3), "red")
    tokens = get_branch("clip").tokens
    short = encode_conversation(
        processor, model.config,
        [{"role": "user", "content": f"<image>Q? {tokens.action_sequence}{tokens.placeholder}"}],
        [image], {"clip": [image]},
    )
    with pytest.raises(VPTInputError, match=r"row 0: para mask needs a turn after the one holding the action token "
                                            r"\(position \d+\), but the row has 2 <\|im_start\|>"):
        model(**batch_of(processor, [short]))


def test_sam_encodes_one_image_per_call_except_under_zero3(model, processor, monkeypatch):
    """Same features either way; one encoder call per image bounds SAM's global-attention transient, and one
    call per step under ZeRO-3 keeps every rank's calls (each gathers the weights) in step."""
    import vpt_plugin.branches.sam as sam

    branch = get_branch("sam")
    images = [shape_image((k, k), colour) for k, colour in enumerate(["red", "blue", "green"])]
    inputs = branch.preprocess(images, processor)
    calls = []
    handle = getattr(model, branch.encoder_attribute).register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        per_image = branch.encode(model, inputs)
        monkeypatch.setattr(sam, "is_deepspeed_zero3_enabled", lambda: True)
        one_call = branch.encode(model, inputs)
    handle.remove()
    assert calls == [1] * 4  # three for the images one by one, then one for all
    assert per_image.shape == one_call.shape == (3, 256, 64, 64)
    torch.testing.assert_close(per_image, one_call, atol=1e-4, rtol=1e-4)
