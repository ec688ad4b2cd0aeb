"""Box rows (PerceptionGPT's ``boxes`` column): checks that name row and field, and box scores."""

import json
from pathlib import Path

import pytest
from PIL import Image
from test_llamafactory import DEMO, cli, overrides

from vpt_plugin.dataset import box_entry, is_box_entry, parse_box_entry, row_boxes
from vpt_plugin.evaluation.runner import continuous_region_scores, grounding_scores, read_items
from vpt_plugin.vocabulary import BOX_TOKEN

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "picture.png"
    Image.new("RGB", (200, 100)).save(path)
    return str(path)


def test_pixel_boxes_are_normalised_by_the_rows_first_image(image_path):
    problems, boxes = row_boxes([f"where? {BOX_TOKEN}", BOX_TOKEN], [[0, 0, 100, 50], [50, 25, 200, 100]], [image_path], "pixels")
    assert problems == [] and boxes == [[0, 0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]
    assert row_boxes([BOX_TOKEN], [[0.1, 0.2, 0.3, 0.4]], None)[1] == [[0.1, 0.2, 0.3, 0.4]]  # normalised: no image needed


@pytest.mark.parametrize("contents, boxes, units, expected", [
    ([BOX_TOKEN, BOX_TOKEN], [[0, 0, 0.5, 0.5]], "normalized", "boxes: 2 <|perception_box|> token(s) in the messages but 1 box(es)"),
    (["no token"], [[0, 0, 0.5, 0.5]], "normalized", "boxes: 0 <|perception_box|> token(s) in the messages but 1 box(es)"),
    ([BOX_TOKEN], [[0, 0, 150, 50]], "normalized", "boxes[0]: [0, 0, 150, 50] is outside [0, 1] (normalised; set \"box_units\": \"pixels\""),
    ([BOX_TOKEN], [[0, 0, 250, 50]], "pixels", "boxes[0]: [0, 0, 250, 50] is outside the 200x100 image"),
    ([BOX_TOKEN], [[40, 10, 40, 50]], "pixels", "boxes[0]: [40, 10, 40, 50] has no area"),
    ([BOX_TOKEN], [[1, 2, 3]], "pixels", "boxes[0]: [1, 2, 3] is not four numbers"),
    ([BOX_TOKEN], [[1, 2, 3, 4]], "inches", "box_units: 'inches' is not one of"),
])
def test_bad_boxes_are_named_by_field(image_path, contents, boxes, units, expected):
    problems, _ = row_boxes(contents, boxes, [image_path], units)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_pixel_boxes_need_a_readable_image(tmp_path):
    problems, _ = row_boxes([BOX_TOKEN], [[1, 2, 3, 4]], [str(tmp_path / "gone.png")], "pixels")
    assert problems == [f"images[0]: {tmp_path / 'gone.png'}: image file not found"]


def test_box_entries_round_trip_exactly():
    box = [0.1, 1 / 3, 0.5, 0.75]
    assert is_box_entry(box_entry(box)) and parse_box_entry(box_entry(box)) == (box, None)
    assert not is_box_entry("detail/images/a.png")


def test_a_bad_box_row_stops_llamafactory_naming_dataset_and_row(tmp_path):
    from vpt_plugin.tiny import build_tiny_fixtures

    tiny = build_tiny_fixtures(tmp_path / "tiny", bases=("qwen3_vl",))
    data_dir = tmp_path / "data"
    (data_dir / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(data_dir / "images" / "a.png")
    row = {"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": BOX_TOKEN}],
           "images": ["images/a.png"], "boxes": [[0, 0, 32, 32]]}
    bad = {**row, "boxes": [[0, 0, 32, 32], [1, 1, 2, 2]]}
    info = json.loads((REPO / "data" / "dataset_info.json").read_text())["detail_grounding_train"]
    (data_dir / "dataset_info.json").write_text(json.dumps({"boxes": {**info, "file_name": "rows.json"}}))
    (data_dir / "rows.json").write_text(json.dumps([row, bad]))
    args = overrides(model_name_or_path=tiny["qwen3_vl"], dataset="boxes", dataset_dir=data_dir, output_dir=tmp_path / "out")
    code, out = cli(["llamafactory-cli", "train", str(DEMO / "box_region.yaml"), *args], tmp_path)
    assert code != 0
    assert ("VPTDataError: dataset rows.json, row 1: boxes: 1 <|perception_box|> token(s) in the messages but 2 box(es)"
            in out), out[-3000:]


def test_box_scores_by_hand(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": BOX_TOKEN}],
         "images": ["a.png"], "boxes": [[0, 0, 50, 50]]},
        {"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": BOX_TOKEN}],
         "images": ["a.png"], "boxes": [[50, 50, 100, 100]]},
        {"messages": [{"role": "user", "content": "<image>Which?"},
                      {"role": "assistant", "content": f"<|region_token_start|>{BOX_TOKEN}<|region_token_end|>"},
                      {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "red"}],
         "images": ["a.png", "a.png_0,0,50,50"], "boxes": [[0, 0, 50, 50]], "box": [10, 10, 40, 40]},
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    items = read_items(tmp_path / "rows.json", tmp_path, None, "pixels")
    assert items[0]["reference_boxes"] == [[0, 0, 0.5, 0.5]] and items[2]["reference_region_box"] == [0, 0, 0.5, 0.5]
    # Row 0's box [0, 0, 0.5, 0.25] is half its reference: IoU 0.5, not above 0.5. Row 1's is exact.
    traces = [{"rounds": [], "answer_boxes": [[0, 0, 0.5, 0.25]]}, {"rounds": [], "answer_boxes": [[0.5, 0.5, 1, 1]]},
              {"rounds": [{"kind": "region", "boxes": [[0, 0, 0.25, 0.5]], "pixel_boxes": [[0, 0, 25, 50]]}]}]
    predictions = [{**item, "trace": trace} for item, trace in zip(items, traces)]
    grounding = grounding_scores(predictions)
    assert grounding["grounding_items"] == 2 and grounding["grounding_hits"] == 1
    assert grounding["grounding_iou_mean"] == pytest.approx((0.5 + 1.0) / 2)
    # Centre box: 0.5 x 0.5 centred, [0.25, 0.25, 0.75, 0.75]: IoU 0.0625 / 0.4375 with either reference.
    assert grounding["centre_box_iou_mean"] == pytest.approx(0.0625 / 0.4375) and grounding["centre_box_hits"] == 0
    region = continuous_region_scores(predictions)
    assert region == {"region_box_items": 1, "region_box_iou_mean": pytest.approx(0.5), "region_box_hits": 0,
                      "region_box_object_items": 1, "region_box_object_hits": 0}  # the crop [0, 0, 25, 50] cuts the object


def test_normalised_references_above_one_are_refused(tmp_path):
    from vpt_plugin.dataset import VPTDataError

    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": BOX_TOKEN}],
           "images": ["a.png"], "boxes": [[0, 0, 50, 50]]}
    (tmp_path / "rows.json").write_text(json.dumps([row]))
    with pytest.raises(VPTDataError, match="row 0: boxes: .* are not normalised"):
        read_items(tmp_path / "rows.json", tmp_path, None)


def test_training_rows_need_a_box_token_for_every_box():
    from types import SimpleNamespace

    import llamafactory.data.mm_plugin  # noqa: F401  (LLaMA-Factory first: importing it activates the plugin)

    from vpt_plugin.dataset import VPTDataError
    from vpt_plugin.llamafactory.mm_plugin import VPTPluginMixin

    config = SimpleNamespace(box_heads=True, box_token_id=7, mask_decoder=False)
    entries = [box_entry([0, 0, 0.5, 0.5]), box_entry([0.5, 0.5, 1, 1])]
    ids = [[1, 7, 2]]  # one box token left: a truncation cut the other
    _, _, boxes, _ = VPTPluginMixin._split_boxes(entries, [2], ids, config, generating=True)
    assert boxes.tolist() == [[0, 0, 0.5, 0.5]]  # a prompt holds the question's box tokens only
    with pytest.raises(VPTDataError, match="1 <\\|perception_box\\|> tokens but 2 boxes; if `cutoff_len`"):
        VPTPluginMixin._split_boxes(entries, [2], ids, config, generating=False)
