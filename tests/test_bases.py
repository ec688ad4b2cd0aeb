"""Every supported base passes the VPT battery on tiny random models.

Qwen2-VL, the published base, runs the whole suite (test_model, test_reuse_first_pass,
test_generation, test_llamafactory*, test_export, test_convert); here each other base (Qwen2.5-VL,
Qwen3-VL dense and MoE) runs the same checks: without VPT tokens a VPT model is its base (every
base); the reused-prefix forward equals the straightforward two passes; one-call generation
equals the two-round reference flow, score by score (every base); on Qwen3-VL the images VPT adds
get the ViT's deepstack features as the base's own images do. The LLaMA-Factory round trip per base is in test_bases_llamafactory.py.
"""

import pytest
import torch
from conftest import batch_of, shape_image
from scripted import ScriptedTurns, prompt_batch
from test_generation import generate, reference
from test_reuse_first_pass import (
    check_lora_gradients_equal_straightforward,
    check_reuse_equals_straightforward,
    plain_example,
)
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from vpt_plugin.bases import BASES, get_base
from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.conversation import collate, encode_conversation
from vpt_plugin.tiny import build_tiny_fixtures, tiny_base_folder, tiny_encoder_configs
from vpt_plugin.vocabulary import REENCODING_PROMPT, REGION_PROMPT

OTHER_BASES = sorted(set(BASES) - {"qwen2_vl"})
DEEPSTACK_BASES = ["qwen3_vl", "qwen3_vl_moe"]
RS, RE, END = "<|region_token_start|>", "<|region_token_end|>", "<|im_end|>"


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    return build_tiny_fixtures(tmp_path_factory.mktemp("bases"), bases=tuple(sorted(BASES)))


@pytest.fixture(scope="module")
def vpt_dirs(tiny_bases, tmp_path_factory):
    """Base name -> a tiny VPT checkpoint of that base with every branch, made on first use."""
    made = {}

    def vpt_dir(base):
        if base not in made:
            made[base] = init_vpt_checkpoint(str(tiny_bases[base]), tmp_path_factory.mktemp(f"vpt-{base}"),
                                             ["dino", "sam", "clip"], encoder_configs=tiny_encoder_configs())
        return made[base]

    return vpt_dir


def load(vpt_dir):
    model = AutoModelForImageTextToText.from_pretrained(vpt_dir).eval()
    model.config.para_mask_id = 0
    return model, AutoProcessor.from_pretrained(vpt_dir)


@pytest.mark.parametrize("base", sorted(BASES))
def test_a_sequence_without_vpt_tokens_gives_exactly_the_base_models_logits(base, tiny_bases, vpt_dirs):
    model, processor = load(vpt_dirs(base))
    plain = get_base(base).base_model_class.from_pretrained(tiny_bases[base]).eval()
    assert type(model) is get_base(base).model_class and tiny_base_folder(base) == tiny_bases[base].name
    text_only = encode_conversation(processor, model.config, [{"role": "user", "content": "What is a grid?"},
                                                              {"role": "assistant", "content": "cells"}])
    batch = batch_of(processor, [plain_example(processor, model.config), text_only])
    batch.pop("labels")
    with torch.no_grad():
        ours = model(**batch).logits
        # The plain base is given what its processor would give: the image positions' token types.
        theirs = plain(**batch, mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).int()).logits
    assert torch.equal(ours[..., : theirs.shape[-1]], theirs)


@pytest.mark.parametrize("base", OTHER_BASES)
@pytest.mark.parametrize("checkpointing, para_mask_id", [(None, 2), ("non-reentrant", 1), ("reentrant", 1)])
def test_reused_prefix_forward_equals_the_straightforward_two_passes(base, vpt_dirs, checkpointing, para_mask_id):
    # The mixed batch: re-encoding rows of every branch, a region row, a plain row.
    check_reuse_equals_straightforward(*load(vpt_dirs(base)), checkpointing, para_mask_id)


@pytest.mark.parametrize("base", OTHER_BASES)
def test_reused_prefix_lora_gradients_equal_the_straightforward_forward(base, vpt_dirs):
    check_lora_gradients_equal_straightforward(*load(vpt_dirs(base)), para_mask_id=1)


@pytest.mark.parametrize("base", DEEPSTACK_BASES)
def test_clip_branch_images_get_deepstack_features_as_the_bases_own_images(base, tiny_bases, vpt_dirs):
    """One pass without control, the clip projector is the identity: a clip-branch image must then
    be exactly what the plain base makes of the same image shown as its own, deepstack included."""
    model, processor = load(vpt_dirs(base))
    model.config.num_inner_forward_run = 1
    plain = get_base(base).base_model_class.from_pretrained(tiny_bases[base]).eval()
    image, detail = shape_image((2, 5), "red"), shape_image((6, 1), "blue")
    messages = [{"role": "user", "content": "<image>What is here?<clip_image>"}, {"role": "assistant", "content": "red"}]
    ours = collate([encode_conversation(processor, model.config, messages, [image], {"clip": [detail]})],
                   processor.tokenizer.pad_token_id)
    # The same sequence with the clip image as a second image of the base's own.
    ids = ours["input_ids"].clone()
    ids[ids == model.config.clip_image_token_id] = model.config.image_token_id
    positions = torch.arange(ids.shape[1])[None, None].expand(3, 1, -1)  # the same positions for both
    with torch.no_grad():
        logits = model(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"],
                       image_grid_thw=ours["image_grid_thw"], clip_pixel_values=ours["clip_pixel_values"],
                       clip_images_grid_thw=ours["clip_images_grid_thw"], position_ids=positions).logits
        expected = plain(input_ids=ids, pixel_values=torch.cat([ours["pixel_values"], ours["clip_pixel_values"]]),
                         image_grid_thw=torch.cat([ours["image_grid_thw"], ours["clip_images_grid_thw"]]),
                         position_ids=positions).logits
        deepstack = plain.model.get_image_features(ours["clip_pixel_values"], ours["clip_images_grid_thw"]).deepstack_features
    assert len(deepstack) == 2 and all(layer.abs().sum() > 0 for layer in deepstack)  # the equality is not vacuous
    torch.testing.assert_close(logits[..., : expected.shape[-1]], expected, rtol=1e-5, atol=1e-5)


class RecordedScores(LogitsProcessor):
    """Keeps each row's scores at every decoding step (before the script forces a token), by prompt."""

    def __init__(self, script: ScriptedTurns, prompts: list[list[int]]):
        self.script, self.prompts = script, prompts
        self.scores = {k: [] for k in range(len(prompts))}

    def __call__(self, input_ids, scores):
        pad = self.script.tokenizer.pad_token_id
        for b, row in enumerate(input_ids.tolist()):
            while row and row[0] == pad:
                row = row[1:]
            k = next(k for k, prompt in enumerate(self.prompts) if row[: len(prompt)] == prompt)
            self.scores[k].append(scores[b].clone())
        return scores

    def as_list(self) -> LogitsProcessorList:
        return LogitsProcessorList([self, self.script])


@pytest.mark.parametrize("base", sorted(BASES))
def test_one_call_generation_equals_the_two_round_reference(base, vpt_dirs):
    """A region row, a re-encoding row per branch and a plain row, in one batch, greedy: the same
    answers and traces, and the same scores at every step (so every image's features, deepstack
    included, reach the decoder alike)."""
    model, processor = load(vpt_dirs(base))
    first_turns = {"region": RS + "<|x_5|><|y_2|><|x_6|><|y_3|>" + RE + END, "dino": "<|detection_action_start|>",
                   "sam": "<|seg_action_start|>", "clip": "<|clip_action_start|>", None: None}
    images = [shape_image((5, 2), colour) for colour in ("red", "blue", "green", "yellow", "white")]
    questions = [f"Row {k}. What colour? {REGION_PROMPT if kind == 'region' else REENCODING_PROMPT}"
                 for k, kind in enumerate(first_turns)]
    batch = prompt_batch(processor, model.config, questions, images)
    script = ScriptedTurns(processor.tokenizer)
    for k, first in enumerate(first_turns.values()):
        if first:
            script.add(batch["prompts"][k], {0: first})
    one_call = RecordedScores(script, batch["prompts"])
    answers, traces = generate(model, processor, batch, one_call, images)
    for k, kind in enumerate(first_turns):
        re_read = RecordedScores(script, batch["prompts"])
        ref_answer, ref_trace = reference(model, processor, batch, re_read, images, k)
        assert answers[k] == ref_answer, f"row {k} ({kind}): one-call {answers[k]} != reference {ref_answer}"
        assert traces[k] == ref_trace.to_dict()
        if kind:  # the unscripted row does what the random model does
            assert [r["kind"] for r in traces[k]["rounds"]] == [kind], traces[k]
        assert len(one_call.scores[k]) == len(re_read.scores[k]) >= len(ref_answer)
        torch.testing.assert_close(torch.stack(one_call.scores[k]), torch.stack(re_read.scores[k]), rtol=1e-4, atol=1e-4)
