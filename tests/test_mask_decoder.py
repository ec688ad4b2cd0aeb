"""PerceptionGPT's mask decoder: losses, the forward, generation and the data's ``masks`` column."""

import pytest
import torch
from PIL import Image
from scripted import ScriptedTurns
from test_generation import END, RE, RS, generate, reference
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import shape_image
from vpt_plugin.box_heads import MaskDecoder, mask_from_logits, mask_losses, mask_to_runs, runs_to_mask
from vpt_plugin.branches import VPTInputError
from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.conversation import collate, collate_prompts, encode_conversation
from vpt_plugin.dataset import box_entry, load_mask, parse_box_entry, row_masks
from vpt_plugin.vocabulary import BOX_TOKEN

BOX = BOX_TOKEN


@pytest.fixture(scope="module")
def mask_vpt_dir(tiny_base_dir, tmp_path_factory):
    return init_vpt_checkpoint(str(tiny_base_dir), tmp_path_factory.mktemp("tiny-mask"), ["clip"], box_heads=True,
                               mask_decoder=True, mask_decoder_size=32)


@pytest.fixture
def mask_model(mask_vpt_dir):
    model = AutoModelForImageTextToText.from_pretrained(mask_vpt_dir).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # heads that decode something other than the centre point
        for p in model.box_heads.decoder[-1].parameters():
            p.normal_(0, 0.5)
    return model


@pytest.fixture
def mask_processor(mask_vpt_dir):
    return AutoProcessor.from_pretrained(mask_vpt_dir)


def test_mask_losses_equal_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [-2.0, 0.0]])
    target = torch.tensor([[False, True], [False, True]])
    losses = mask_losses([logits], [target])
    p = torch.sigmoid(logits)
    bce = -(target * p.log() + (~target) * (1 - p).log()).mean()
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert losses["mask_bce"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert losses["mask_dice"].item() == pytest.approx(dice.item(), rel=1e-5)
    # Logits at a quarter of the target's size are resized to it: a constant stays constant.
    assert mask_losses([torch.full((2, 2), 3.0)], [torch.ones(8, 8, dtype=torch.bool)])["mask_bce"].item() == \
        pytest.approx(torch.nn.functional.softplus(torch.tensor(-3.0)).item(), rel=1e-5)


def test_masks_round_trip_through_runs():
    torch.manual_seed(0)
    for mask in (torch.rand(7, 9) > 0.5, torch.zeros(3, 4, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)):
        runs = mask_to_runs(mask)
        assert torch.equal(runs_to_mask(runs), mask) and runs["size"] == list(mask.shape)
    assert mask_to_runs(torch.tensor([[True, False, False]]))["counts"] == [0, 1, 2]
    assert mask_from_logits(torch.tensor([[1.0, -1.0]]), (1, 4)).tolist() == [[True, True, False, False]]


def test_decoder_masks_have_four_times_the_feature_grid():
    decoder = MaskDecoder(hidden_size=16, size=16)
    decoder.reset_parameters()
    masks = decoder(torch.randn(2, 16), [torch.randn(3, 5, 16), torch.randn(2, 2, 16)])
    assert [tuple(m.shape) for m in masks] == [(12, 20), (8, 8)]


def _square_mask(size=224):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[56:112, 28:84] = True
    return mask


def _rec_batch(processor, config):
    examples = []
    for k in range(2):
        messages = [{"role": "user", "content": f"<image>Where is square {k}?"},
                    {"role": "assistant", "content": f"Here {BOX}."}]
        examples.append(encode_conversation(processor, config, messages, [shape_image((k, 2), "red")],
                                            boxes=[[0.1, 0.2, 0.4, 0.5]]))
    return collate(examples, processor.tokenizer.pad_token_id)


def test_the_mask_loss_trains_the_decoder_on_rows_with_masks(mask_model, mask_processor):
    model = mask_model.train()
    batch = _rec_batch(mask_processor, model.config)
    out = model(**batch, masks=[_square_mask(), None])
    assert len(out.pred_masks) == 2 and all(m.shape == (16, 16) for m in out.pred_masks)  # 64 px / 16 px * 4
    expected = mask_losses(out.pred_masks[:1], [_square_mask()])  # row 1 has no mask
    assert out.mask_bce.item() == pytest.approx(expected["mask_bce"].item())
    parts = out.lm_loss + out.box_l1 + out.box_giou + out.mask_bce + out.mask_dice
    assert out.loss.item() == pytest.approx(parts.item(), rel=1e-6)
    out.loss.backward()
    assert model.mask_decoder.prompt_proj.weight.grad.abs().sum() > 0
    # Without masks the loss has no mask part, and the decoder still predicts.
    plain = model(**batch)
    assert plain.mask_bce is None and plain.pred_masks[0] is not None


def test_mask_inputs_that_do_not_fit_are_named(mask_model, mask_processor, tiny_vpt_dir):
    batch = _rec_batch(mask_processor, mask_model.config)
    with pytest.raises(VPTInputError, match="1 masks given for 2 <\\|perception_box\\|> tokens"):
        mask_model(**batch, masks=[_square_mask()])


def test_a_saved_decoder_loads_unchanged(mask_model, mask_vpt_dir):
    again = AutoModelForImageTextToText.from_pretrained(mask_vpt_dir)
    for key, value in mask_model.mask_decoder.state_dict().items():
        assert torch.equal(value, again.mask_decoder.state_dict()[key]), key  # SAM's random positions too


def test_generation_writes_answer_masks_as_the_reference_does(mask_model, mask_processor):
    model, processor = mask_model, mask_processor
    images = [shape_image((2, 3), "red", size=224), shape_image((5, 1), "blue", size=224).resize((224, 168))]
    prompts = [encode_conversation(processor, model.config, [{"role": "user", "content": f"<image>Row {k}. Where?"}],
                                   [image], add_generation_prompt=True) for k, image in enumerate(images)]
    batch = collate_prompts(prompts, processor.tokenizer.pad_token_id)
    batch.update(prompts=[p["input_ids"] for p in prompts], image_token_id=model.config.image_token_id)
    script = ScriptedTurns(processor.tokenizer)
    script.add(batch["prompts"][0], {0: "here " + BOX + END})
    script.add(batch["prompts"][1], {0: RS + BOX + RE + END, 1: BOX + END})  # a continuous region, then a box answer
    answers, traces = generate(model, processor, batch, script, images)
    for k, image in enumerate(images):
        ref_answer, ref_trace = reference(model, processor, batch, script, images, k)
        assert answers[k] == ref_answer
        assert traces[k]["answer_boxes"] == ref_trace.answer_boxes
        (mask,), (ref_mask,) = traces[k]["answer_masks"], ref_trace.answer_masks
        assert mask["size"] == [image.height, image.width]
        same = (runs_to_mask(mask) == runs_to_mask(ref_mask)).float().mean().item()
        assert same > 0.999, f"row {k}: masks agree on {same:.4f} of pixels"  # float noise at the threshold only
    assert "answer_masks" not in traces[1]["rounds"][0]  # the region's box has no mask


def test_row_masks_checks_name_the_field(tmp_path):
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30)).save(image)
    good, small, broken = tmp_path / "good.png", tmp_path / "small.png", tmp_path / "broken.png"
    Image.new("L", (40, 30)).save(good)
    Image.new("L", (20, 30)).save(small)
    broken.write_bytes(b"not a png")
    assert row_masks([str(good), None], 2, [str(image)]) == ([], [str(good), None])
    assert row_masks(None, 2, [str(image)]) == ([], [None, None])
    cases = [
        ([str(good)], "masks: 2 box(es) but 1 mask(s); give null for a box without a mask"),
        ([str(small), None], f"masks[0]: mask {small} is 20x30 but the row's image is 40x30"),
        ([None, str(broken)], f"masks[1]: cannot read mask {broken}"),
        ([None, str(tmp_path / "gone.png")], "masks[1]: cannot read mask"),
        ([3, None], "masks[0]: 3 is not a mask image path (or null)"),
    ]
    for masks, expected in cases:
        problems, _ = row_masks(masks, 2, [str(image)])
        assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_mask_files_load_as_bool_and_ride_with_their_box(tmp_path):
    for values, name in (((0, 255), "eight_bit.png"), ((0, 1), "zero_one.png")):
        mask = Image.new("L", (4, 2), values[0])
        mask.putpixel((1, 0), values[1])
        mask.save(tmp_path / name)
        assert load_mask(str(tmp_path / name)).tolist() == [[False, True, False, False], [False] * 4]
    entry = box_entry([0.1, 0.2, 0.3, 0.4], "/data/masks/a|b.png")
    assert parse_box_entry(entry) == ([0.1, 0.2, 0.3, 0.4], "/data/masks/a|b.png")


def test_mask_scores_are_ciou_and_giou_by_hand(tmp_path):
    import json

    from vpt_plugin.evaluation.runner import dataset_entry, mask_scores, masks_table, read_items

    Image.new("RGB", (4, 2)).save(tmp_path / "image.png")
    first = Image.new("L", (4, 2), 0)
    for x in range(2):
        first.putpixel((x, 0), 255)  # 2 pixels
    first.save(tmp_path / "first.png")
    second = Image.new("L", (4, 2), 255)  # 8 pixels
    second.save(tmp_path / "second.png")
    rows = [{"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": BOX}],
             "images": ["image.png"], "boxes": [[0, 0, 2, 1]], "segments": [name]} for name in ("first.png", "second.png")]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"rows": {
        "file_name": "rows.json", "formatting": "vpt_sharegpt", "box_units": "pixels",
        "columns": {"messages": "messages", "images": "images", "boxes": "boxes", "masks": "segments"}}}))
    file, units, column = dataset_entry("rows", tmp_path)
    items = read_items(file, tmp_path, None, units, column)
    assert [item["reference_masks"] for item in items] == [[str(tmp_path / "first.png")], [str(tmp_path / "second.png")]]
    # Row 0 answers the left half (4 pixels, 2 shared with its 2-pixel reference): IoU 2/4.
    # Row 1 answers the top row (4 pixels, all inside its 8-pixel reference): IoU 4/8.
    left = torch.tensor([[True, True, False, False], [True, True, False, False]])
    top = torch.tensor([[True] * 4, [False] * 4])
    predictions = [{**item, "trace": {"answer_masks": [mask_to_runs(mask)]}} for item, mask in zip(items, (left, top))]
    scores = mask_scores(predictions)
    assert scores == {"mask_items": 2, "mask_ciou": pytest.approx((2 + 4) / (4 + 8)), "mask_giou": pytest.approx(0.5)}
    # An answer without a mask scores IoU 0 (and adds its reference to the union).
    predictions[1]["trace"] = {}
    assert mask_scores(predictions)["mask_ciou"] == pytest.approx(2 / (4 + 8))
    assert "| m | rows | 2 | 50.0 | 50.0 |" in masks_table({"m": {"rows": scores}})


def test_vpt_infer_takes_question_boxes_and_draws_answer_masks(mask_vpt_dir, tmp_path, capsys):
    from vpt_plugin.cli import main
    from vpt_plugin.inference import draw_regions

    image = tmp_path / "square.png"
    shape_image((2, 2), "red").save(image)
    main(["infer", "--model", str(mask_vpt_dir), "--image", str(image), "--max-new-tokens", "4",
          "--box", "0.25,0.25,0.5,0.5", f"What is in {BOX}?"])
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit, match="--box '0.5,0.5,0.25,0.75': give x0,y0,x1,y1 normalised"):
        main(["infer", "--model", str(mask_vpt_dir), "--image", str(image), "--box", "0.5,0.5,0.25,0.75", f"In {BOX}?"])
    # An answer mask is shaded on the drawing, the image itself untouched.
    mask = torch.zeros(224, 224, dtype=torch.bool)
    mask[:112] = True
    drawn = draw_regions(Image.open(image), {"rounds": [], "answer_masks": [mask_to_runs(mask)]})
    assert drawn.getpixel((200, 10)) != Image.open(image).convert("RGB").getpixel((200, 10))
    assert drawn.getpixel((200, 200)) == Image.open(image).convert("RGB").getpixel((200, 200))
