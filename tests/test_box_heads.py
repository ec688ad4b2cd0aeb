"""PerceptionGPT's continuous perception token: heads, losses, the forward, and generation (box_heads.py)."""

import pytest
import torch
from scripted import ScriptedTurns
from test_generation import END, RE, RS, generate, reference
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import shape_image
from vpt_plugin.box_heads import BoxHeads, box_crop_pixels, box_losses, paired_iou
from vpt_plugin.branches import VPTInputError
from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.conversation import collate, collate_prompts, encode_conversation
from vpt_plugin.generation import PerceptionInputs, perception_turn
from vpt_plugin.perception import Perception
from vpt_plugin.vocabulary import BOX_TOKEN

BOX = BOX_TOKEN


@pytest.fixture(scope="module")
def box_vpt_dir(tiny_base_dir, tmp_path_factory):
    return init_vpt_checkpoint(str(tiny_base_dir), tmp_path_factory.mktemp("tiny-box"), ["clip"], box_heads=True)


@pytest.fixture
def box_model(box_vpt_dir):
    model = AutoModelForImageTextToText.from_pretrained(box_vpt_dir).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # heads that decode something other than the centre
        for p in model.box_heads.decoder[-1].parameters():
            p.normal_(0, 0.5)
    return model


@pytest.fixture
def box_processor(box_vpt_dir):
    return AutoProcessor.from_pretrained(box_vpt_dir)


def test_losses_equal_hand_computation():
    decoded = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.6]])
    target = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.2, 0.2, 0.4, 0.6]])
    # Box 0: intersection 0.25^2 = 0.0625, union 0.25 + 0.25 - 0.0625 = 0.4375, enclosing 0.75^2 = 0.5625.
    iou0 = 0.0625 / 0.4375
    giou0 = iou0 - (0.5625 - 0.4375) / 0.5625
    losses = box_losses(decoded, target)
    assert losses["box_l1"].item() == pytest.approx((4 * 0.25 + 0) / 8)
    assert losses["box_giou"].item() == pytest.approx(((1 - giou0) + 0) / 2, rel=1e-5)
    assert paired_iou(decoded, target).tolist() == pytest.approx([iou0, 1.0], rel=1e-5)
    # A decoder's coordinates in the wrong order are the same box for IoU.
    assert paired_iou(torch.tensor([[0.5, 0.5, 0.0, 0.0]]), target[:1]).item() == pytest.approx(iou0, rel=1e-5)


def test_fresh_heads_decode_the_centre_and_crops_follow_the_margin():
    heads = BoxHeads(hidden_size=16, head_size=8)
    heads.reset_parameters()
    assert heads.decode(torch.randn(3, 16)).tolist() == [[0.5] * 4] * 3
    assert box_crop_pixels([0.25, 0.5, 0.5, 0.75], 200, 100) == (50, 50, 100, 75)
    assert box_crop_pixels([0.25, 0.5, 0.5, 0.75], 200, 100, margin=0.2) == (40, 45, 110, 80)
    assert box_crop_pixels([0.9, 0.9, 1.4, 0.9], 100, 100) == (90, 90, 100, 91)  # clamped, at least a pixel


def test_a_crop_snapped_to_the_grid_keeps_its_size_and_place_under_small_box_errors():
    # The demo's square (72, 136)-(120, 184) of a 256 px image, widened by 1/6 (8 px): its 2x2 block
    # (64, 128)-(128, 192), 64 px a side, on Qwen3-VL's 32 px tokens.
    exact, off = [72, 136, 120, 184], [75, 134, 123, 182]  # off: 3 px right, 2 px up
    assert box_crop_pixels([v / 256 for v in exact], 256, 256, 1 / 6, grid=32) == (64, 128, 128, 192)
    assert box_crop_pixels([v / 256 for v in off], 256, 256, 1 / 6) == (67, 126, 131, 190)
    assert box_crop_pixels([v / 256 for v in off], 256, 256, 1 / 6, grid=32) == (64, 128, 128, 192)
    # 90..100 of 100 px: one step (32), centred at 79 -> the far edge (68) is nearer than the grid's 64.
    assert box_crop_pixels([0.9, 0.9, 1.0, 1.0], 100, 100, grid=32) == (68, 68, 100, 100)
    # 47 px rounds to one step (32) and sits on the grid nearest its centring (37.5 -> 32); an image
    # smaller than the grid is cropped whole.
    assert box_crop_pixels([0.3, 0.3, 0.77, 0.77], 100, 100, grid=32) == (32, 32, 64, 64)
    assert box_crop_pixels([0.2, 0.2, 0.5, 0.5], 20, 20, grid=32) == (0, 0, 20, 20)
    # The whole of a 100 px image with 28 px steps: 112 is nearest but larger than the image, so 84, the
    # largest multiple it holds (unresampled; 16 px of the box cut, within three quarters of a step).
    assert box_crop_pixels([0.0, 0.0, 1.0, 1.0], 100, 100, grid=28) == (0, 0, 84, 84)
    with pytest.raises(ValueError, match="box crop grid must be 0 .off. or a number of pixels, got -28"):
        box_crop_pixels([0.2, 0.2, 0.5, 0.5], 100, 100, grid=-28)


def test_generation_snaps_a_continuous_crop_as_the_config_says(box_model, box_processor):
    config = box_model.config
    config.box_crop_margin, config.box_crop_grid = 1 / 6, 32
    image = shape_image((2, 4), "red", size=256)
    body = box_processor.tokenizer.encode(RS + BOX + RE, add_special_tokens=False)
    turns = [perception_turn(Perception("region", boxes=[[v / 256 for v in box]]), body, image,
                             PerceptionInputs(box_processor), config)
             for box in ([72, 136, 120, 184], [75, 134, 123, 182])]
    assert [turn.round_trace["pixel_boxes"] for turn in turns] == [[[64, 128, 128, 192]]] * 2
    assert torch.equal(turns[0].crops[0], turns[1].crops[0])  # the same pixels reach the ViT
    config.box_crop_grid = -1
    with pytest.raises(VPTInputError, match="box_crop_grid must be a whole number of pixels, 0 or more, got -1"):
        config.check_forward_settings()


def _rec_batch(processor, config, boxes=((0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.8))):
    examples = []
    for k, box in enumerate(boxes):
        messages = [
            {"role": "user", "content": f"<image>Where is the square {k}?"},
            {"role": "assistant", "content": f"It is here {BOX}."},
        ]
        examples.append(encode_conversation(processor, config, messages, [shape_image((k, 2), "red")], boxes=[list(box)]))
    # A region-input row: the box is in the question, the answer is text (no box loss).
    messages = [{"role": "user", "content": f"<image>What is in {BOX}?"}, {"role": "assistant", "content": "red"}]
    examples.append(encode_conversation(processor, config, messages, [shape_image((3, 3), "red")], boxes=[[0.3, 0.3, 0.5, 0.5]]))
    return collate(examples, processor.tokenizer.pad_token_id)


def test_the_decoded_state_is_the_one_before_the_token_and_gradients_reach_the_llm(box_model, box_processor):
    model = box_model
    batch = _rec_batch(box_processor, model.config)
    normed = []
    hook = model.model.language_model.norm.register_forward_hook(lambda m, a, out: normed.append(out))
    out = model(**batch)
    hook.remove()
    states = normed[-1]
    rows, cols = (batch["input_ids"] == model.config.box_token_id).nonzero(as_tuple=True)
    assert torch.allclose(out.pred_boxes, model.box_heads.decode(states[rows, cols - 1]), atol=1e-6)
    # Only the two written boxes are targets; the box in the question is input only.
    expected = box_losses(out.pred_boxes[:2], batch["boxes"][:2])
    assert out.box_l1.item() == pytest.approx(expected["box_l1"].item())
    assert out.loss.item() == pytest.approx((out.lm_loss + out.box_l1 + out.box_giou).item(), rel=1e-6)

    # The box loss alone trains the LLM through the decoded state; the LM loss trains the box encoder.
    model.zero_grad()
    (out.box_l1 + out.box_giou).backward(retain_graph=True)
    layer_weight = model.model.language_model.layers[0].mlp.down_proj.weight
    assert layer_weight.grad.abs().sum() > 0
    model.zero_grad()
    out.lm_loss.backward()
    assert model.box_heads.encoder[0].weight.grad.abs().sum() > 0


def test_a_box_is_the_input_embedding_of_its_token(box_model, box_processor):
    model = box_model
    batch = _rec_batch(box_processor, model.config)
    with torch.no_grad():
        first = model(**batch)
        moved = model(**{**batch, "boxes": batch["boxes"] + 0.1})
    # The decoded states precede their tokens, so they do not see the box; later positions do.
    assert torch.equal(first.pred_boxes, moved.pred_boxes)
    assert not torch.allclose(first.logits, moved.logits)


def test_box_counts_that_do_not_match_the_tokens_are_named(box_model, box_processor):
    batch = _rec_batch(box_processor, box_model.config)
    with pytest.raises(VPTInputError, match=r"3 <\|perception_box\|> tokens .* but 2 boxes"):
        box_model(**{**batch, "boxes": batch["boxes"][:2]})
    messages = [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": BOX}]
    with pytest.raises(VPTInputError, match="1 <\\|perception_box\\|> tokens but 0 boxes"):
        encode_conversation(box_processor, box_model.config, messages, [shape_image((1, 1), "red")])


def test_a_checkpoint_without_heads_loads_unchanged_and_can_take_fresh_ones(tiny_vpt_dir, box_vpt_dir):
    plain = AutoModelForImageTextToText.from_pretrained(tiny_vpt_dir)
    assert not plain.config.box_heads and not hasattr(plain, "box_heads")
    box_token_id = AutoProcessor.from_pretrained(box_vpt_dir).tokenizer.convert_tokens_to_ids(BOX)
    with_heads = AutoModelForImageTextToText.from_pretrained(box_vpt_dir, box_heads=True, box_token_id=box_token_id)
    assert with_heads.box_heads.decode(torch.randn(2, with_heads.config.text_config.hidden_size)).tolist() == [[0.5] * 4] * 2


def test_generation_decodes_crops_and_feeds_boxes_as_the_reference_does(box_model, box_processor):
    """Continuous regions, boxes written as answers and boxes in prompts: one-call loop == re-run reference."""
    model, processor = box_model, box_processor
    images = [shape_image((k + 1, 5 - k), colour) for k, colour in enumerate(["red", "blue", "green", "red"])]
    questions = ["Row 0. Which colour?", "Row 1. Where is it?", f"Row 2. What is in {BOX}?", "Row 3. Which colour?"]
    prompts = []
    for question, image in zip(questions, images):
        boxes = [[0.2, 0.2, 0.6, 0.7]] if BOX in question else None
        prompts.append(encode_conversation(processor, model.config, [{"role": "user", "content": "<image>" + question}],
                                           [image], add_generation_prompt=True, boxes=boxes))
    batch = collate_prompts(prompts, processor.tokenizer.pad_token_id)
    batch.update(prompts=[p["input_ids"] for p in prompts], image_token_id=model.config.image_token_id)
    prompt_boxes = torch.tensor([[0.2, 0.2, 0.6, 0.7]])
    script = ScriptedTurns(processor.tokenizer)
    script.add(batch["prompts"][0], {0: RS + BOX + RE + END})  # continuous Region Selection
    script.add(batch["prompts"][1], {0: "here " + BOX})  # a box as the answer, then free text
    script.add(batch["prompts"][3], {0: RS + BOX + RE + END, 1: BOX})  # a region, then a box in the answer
    answers, traces = generate(model, processor, {**batch, "boxes": prompt_boxes}, script, images)

    for k in range(len(questions)):
        ref_answer, ref_trace = reference(model, processor, batch, script, images, k,
                                          boxes=prompt_boxes if k == 2 else None)
        assert answers[k] == ref_answer, f"row {k}"
        assert traces[k] == ref_trace.to_dict(), f"row {k}"
    for k in (0, 3):
        (round_,) = traces[k]["rounds"]
        assert round_["kind"] == "region" and len(round_["boxes"]) == 1 and "grid_boxes" not in round_
        assert round_["pixel_boxes"] == [list(box_crop_pixels(round_["boxes"][0], *images[k].size))]
    assert len(traces[1]["answer_boxes"]) == 1 and len(traces[3]["answer_boxes"]) == 1
    assert not traces[2]["rounds"] and not traces[2].get("answer_boxes")


def test_vpt_init_box_heads_without_branches(tmp_path):
    from vpt_plugin.cli import main as vpt_main

    vpt_main(["init", "--tiny", "qwen3_vl", "--output", str(tmp_path / "rec"), "--branches", "", "--box-heads",
              "--num-inner-forward-run", "1"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "rec")
    tokenizer = AutoProcessor.from_pretrained(tmp_path / "rec").tokenizer
    assert model.config.vision_encoder_ls == [] and model.config.box_token_id == tokenizer.convert_tokens_to_ids(BOX)
    assert model.box_heads.decode(torch.randn(1, model.config.text_config.hidden_size)).tolist() == [[0.5] * 4]


def test_a_box_written_before_a_branch_action_is_dropped_with_its_turn(box_model, box_processor):
    """A branch's turn is replayed as its action sequence: a box the turn wrote goes with it."""
    model, processor = box_model, box_processor
    images = [shape_image((3, 3), "red")]
    prompts = [encode_conversation(processor, model.config, [{"role": "user", "content": "<image>Row 0. Which colour?"}],
                                   images, add_generation_prompt=True)]
    batch = collate_prompts(prompts, processor.tokenizer.pad_token_id)
    batch.update(prompts=[p["input_ids"] for p in prompts], image_token_id=model.config.image_token_id)
    script = ScriptedTurns(processor.tokenizer)
    script.add(batch["prompts"][0], {0: BOX + "<|clip_action_start|>"})
    answers, traces = generate(model, processor, batch, script, images)
    ref_answer, ref_trace = reference(model, processor, batch, script, images, 0)
    assert answers[0] == ref_answer and traces[0] == ref_trace.to_dict()
    assert traces[0]["rounds"][0]["kind"] == "clip"


def test_reading_a_turn_without_its_decoded_boxes_does_not_raise(box_model, box_processor):
    from vpt_plugin.perception import PerceptionVocabulary, read_perception

    vocab = PerceptionVocabulary.from_model(box_model.config, box_processor.tokenizer)
    ids = box_processor.tokenizer.encode(RS + BOX + RE, add_special_tokens=False)
    assert read_perception(ids, vocab, ["clip"], True).kind is None


def test_questions_with_boxes_reach_generation_through_answer_questions(box_model, box_processor, tmp_path):
    """A region-input question (its box in the question): `answer_questions`, as evaluation and
    `vpt infer` call it, gives generation the question's boxes."""
    import json

    from vpt_plugin.evaluation.runner import read_items
    from vpt_plugin.inference import answer_questions

    model, processor = box_model, box_processor
    image = shape_image((2, 2), "red")
    image.save(tmp_path / "image.png")
    row = {"messages": [{"role": "user", "content": f"<image>What is in {BOX}?"}, {"role": "assistant", "content": "red"}],
           "images": ["image.png"], "boxes": [[0.25, 0.25, 0.5, 0.5]]}
    (tmp_path / "rows.json").write_text(json.dumps([row]))
    (item,) = read_items(tmp_path / "rows.json", tmp_path, None)
    assert item["question_boxes"] == [[0.25, 0.25, 0.5, 0.5]] and "reference_boxes" not in item

    question = (str(tmp_path / "image.png"), item["question"], item["question_boxes"])
    (answer,) = answer_questions(model, processor, [question, (str(tmp_path / "image.png"), "Which colour?")],
                                 max_new_tokens=4)[:1]
    prompt = encode_conversation(processor, model.config, [{"role": "user", "content": item["question"]}],
                                 [image], add_generation_prompt=True, boxes=item["question_boxes"])
    direct = model.generate(**collate_prompts([prompt], processor.tokenizer.pad_token_id), processor=processor,
                            vpt_images=[image], do_sample=False, max_new_tokens=4, return_dict_in_generate=True)
    assert answer.trace == direct.traces[0]
    with pytest.raises(VPTInputError, match="1 <\\|perception_box\\|> tokens but 0 boxes"):
        answer_questions(model, processor, [(question[0], question[1])], max_new_tokens=4)
