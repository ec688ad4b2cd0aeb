"""`vpt data` (own data -> VPT rows, dataset checks) and the committed demo dataset."""

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vpt_plugin.cli import main as vpt
from vpt_plugin.dataset import VPTDataError, open_image, split_crop
from vpt_plugin.dataset_tools import convert_rows, validate_file
from vpt_plugin.vocabulary import crop_pixels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def image_dir(tmp_path):
    Image.new("RGB", (400, 200), (10, 20, 30)).save(tmp_path / "photo.png")
    return tmp_path


def test_vqa_rows_with_boxes_become_vpt_rows(image_dir):
    source = image_dir / "mine.jsonl"
    rows = [
        {"image": "photo.png", "question": "What is on the sign?", "answer": "stop", "box": [110, 60, 190, 110]},
        {"image": "photo.png", "question": "Colour?", "answer": "red", "box": [0.275, 0.3, 0.475, 0.55]},
    ]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    out = image_dir / "vpt.json"
    vpt(["data", "convert", str(source), "--output", str(out), "--branches", "dino", "--media-dir", str(image_dir)])
    written = json.loads(out.read_text())
    assert len(written) == 4  # a region row and a dino row per source row
    region = written[0]
    # x 110..190 of 400 -> cells 2..3; y 60..110 of 200 -> cells 2..4
    assert region["messages"][1]["content"] == (
        "<|region_token_start|><|x_2|><|y_2|><|x_3|><|y_4|><|region_token_end|>"
    )
    assert region["images"][1] == "photo.png_{},{},{},{}".format(*crop_pixels((2, 2, 3, 4), 400, 200))
    assert written[1]["detection_images"] == ["photo.png"]
    assert written[1]["messages"][1]["content"] == "<|detection_action_start|><|detection_action|><|detection_action_end|>"
    assert validate_file(out, str(image_dir)) == []

    normalised = image_dir / "normalised.json"
    source.write_text("\n".join(json.dumps({**r, "box": [b / s for b, s in zip(r["box"], (400, 200, 400, 200))]})
                                for r in rows[:1]))
    convert_rows(source, normalised, "normalized", [], str(image_dir))
    assert json.loads(normalised.read_text())[0]["messages"][1] == region["messages"][1]


def test_bad_source_rows_are_all_named_and_nothing_is_written(image_dir, capsys):
    source = image_dir / "mine.json"
    source.write_text(json.dumps([
        {"image": "photo.png", "question": "q", "answer": "a", "box": [0, 0, 10, 10]},
        {"image": "photo.png", "question": "q", "box": [0, 0, 10, 10]},
        {"image": "gone.png", "question": "q", "answer": "a", "box": [0, 0, 10, 10]},
        {"image": "photo.png", "question": "q", "answer": "a", "box": [300, 0, 500, 10]},
    ]))
    out = image_dir / "vpt.json"
    with pytest.raises(SystemExit):
        vpt(["data", "convert", str(source), "--output", str(out), "--media-dir", str(image_dir)])
    error = capsys.readouterr().err
    assert "3 bad row(s), nothing written" in error
    assert "row 1: missing keys ['answer']" in error
    assert "row 2, image: gone.png: image file not found" in error
    assert "row 3, box: [300, 0, 500, 10] is empty or outside the 400x200 image" in error
    assert not out.exists()


def test_validate_reports_every_bad_row_by_index(image_dir, capsys):
    good = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}], "images": ["photo.png"]}
    rows = [
        good,
        {**good, "images": []},
        {**good, "images": ["photo.png_0,0,500,10"]},
        {"messages": [{"role": "user", "content": "<image><seg_image>Q"}, {"role": "assistant", "content": "<|y_9|>"}],
         "images": ["photo.png"], "seg_images": ["photo.png_1,2"]},
    ]
    path = image_dir / "data.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match="3 bad row"):
        vpt(["data", "validate", str(path), "--media-dir", str(image_dir)])
    reported = capsys.readouterr().out.splitlines()[1:]  # after the line saying where paths resolve
    assert len(reported) == 3  # one line per bad row, each problem of the row on it
    assert reported[0] == f"{path}: row 1: images: 1 <image> placeholder(s) in the messages but 0 image(s)"
    assert reported[1].startswith(f"{path}: row 2: images[0]:") and "is outside the 400x200 image" in reported[1]
    assert reported[2].startswith(f"{path}: row 3: messages[1].content: grid token <|y_9|> is outside 0..7; ")
    assert "seg_images[0]:" in reported[2] and "crop suffix '1,2' is not four integers" in reported[2]


def test_crop_suffix_loads_that_crop(image_dir):
    path = str(image_dir / "photo.png")
    assert split_crop(path) == (path, None)
    assert split_crop(path + "_10,20,110,70") == (path, (10, 20, 110, 70))
    assert open_image(path + "_10,20,110,70").size == (100, 50)
    with pytest.raises(VPTDataError, match="has no area"):
        open_image(path + "_10,20,10,70")


def test_demo_dataset_regenerates_byte_for_byte(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(REPO / "data" / "make_demo_data.py"), "--output", str(out)], check=True,
                   capture_output=True)
    committed = REPO / "data" / "demo"
    names = sorted(p.name for p in committed.glob("*.json"))
    assert names == sorted(p.name for p in out.glob("*.json")) and names
    match, mismatch, errors = filecmp.cmpfiles(committed, out, names, shallow=False)
    assert not mismatch and not errors
    images = sorted(p.name for p in (committed / "images").iterdir())
    match, mismatch, errors = filecmp.cmpfiles(committed / "images", out / "images", images, shallow=False)
    assert not mismatch and not errors and len(match) == len(images)
    for name in names:
        assert validate_file(committed / name, str(REPO / "data")) == [], name


def test_continuous_region_rows_name_the_box_with_one_token(image_dir):
    source = image_dir / "mine.json"
    source.write_text(json.dumps([{"image": "photo.png", "question": "Sign?", "answer": "stop", "box": [100, 50, 200, 150]}]))
    out = image_dir / "vpt.json"
    vpt(["data", "convert", str(source), "--output", str(out), "--branches", "", "--media-dir", str(image_dir),
         "--region-mode", "continuous", "--box-crop-margin", "0.5"])
    (row,) = json.loads(out.read_text())
    assert row["messages"][1]["content"] == "<|region_token_start|><|perception_box|><|region_token_end|>"
    assert row["boxes"] == [[0.25, 0.25, 0.5, 0.75]]  # normalised, the dataset_info entry's default units
    assert row["images"] == ["photo.png", "photo.png_50,0,250,200"]  # widened by half the box per side, clamped
    assert validate_file(out, str(image_dir)) == []
    vpt(["data", "convert", str(source), "--output", str(out), "--branches", "", "--media-dir", str(image_dir),
         "--region-mode", "continuous", "--box-crop-margin", "0.5", "--box-crop-grid", "28"])
    (row,) = json.loads(out.read_text())
    # 200 px -> 7 steps of 28 (196); x centred at 52 -> 56 on the grid; y centred at 2 -> 0 (the far edge, 4, is no nearer)
    assert row["images"] == ["photo.png", "photo.png_56,0,252,196"]


def test_validate_checks_boxes_in_their_units(image_dir, capsys):
    row = {"messages": [{"role": "user", "content": "<image>Where?"}, {"role": "assistant", "content": "<|perception_box|>"}],
           "images": ["photo.png"], "boxes": [[0, 0, 300, 100]]}
    path = image_dir / "rows.json"
    path.write_text(json.dumps([row, {**row, "boxes": [[0, 0, 500, 100]]}]))
    with pytest.raises(SystemExit):
        vpt(["data", "validate", str(path), "--media-dir", str(image_dir), "--box-units", "pixels"])
    assert capsys.readouterr().out.splitlines()[1:] == [f"{path}: row 1: boxes[0]: [0, 0, 500, 100] is outside the 400x200 image"]


def test_validate_resolves_images_as_llamafactory_does_from_any_folder(tmp_path, monkeypatch, capsys):
    """Images are relative to the dataset_dir (the dataset_info.json's folder), not to where the command runs."""
    data_dir = tmp_path / "data"
    (data_dir / "split" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 32)).save(data_dir / "split" / "images" / "a.png")
    row = {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
           "images": ["split/images/a.png"]}
    (data_dir / "split" / "rows.json").write_text(json.dumps([row]))
    (data_dir / "dataset_info.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    vpt(["data", "validate", str(data_dir / "split" / "rows.json")])
    out = capsys.readouterr().out
    assert f"resolve against {data_dir}" in out and out.rstrip().endswith("no problems"), out
    (data_dir / "split" / "one.json").write_text(json.dumps([{**row, "images": "split/images/a.png"}]))
    vpt(["data", "validate", str(data_dir / "split" / "one.json")])  # one path, not a list: read as LLaMA-Factory does
    assert capsys.readouterr().out.rstrip().endswith("no problems")
    with pytest.raises(SystemExit, match="1 bad row"):  # --media-dir overrides
        vpt(["data", "validate", str(data_dir / "split" / "rows.json"), "--media-dir", str(elsewhere)])
    assert "row 0: images[0]: split/images/a.png: image file not found" in capsys.readouterr().out


def test_validate_checks_a_dataset_info_entry_with_its_columns(tmp_path, capsys):
    """``--dataset-info FILE --dataset NAME`` reads the rows exactly as a recipe's `dataset: NAME` will:
    the entry's file, column names, tags, box units and masks; each bad row is reported once."""
    data_dir = tmp_path / "data"
    (data_dir / "images").mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(data_dir / "images" / "a.png")
    Image.new("L", (100, 50)).save(data_dir / "images" / "a_mask.png")
    Image.new("L", (10, 10)).save(data_dir / "images" / "small_mask.png")

    def row(box, mask, image="images/a.png"):
        return {"conversations": [{"from": "human", "value": "<image>Where?"}, {"from": "gpt", "value": "<|perception_box|>"}],
                "pictures": [image], "regions": [box], "region_masks": [mask]}

    rows = [row([10, 10, 60, 40], "images/a_mask.png"), row([10, 10, 160, 40], "images/a_mask.png"),
            row([10, 10, 60, 40], "images/small_mask.png"), row([10, 10, 60, 40], None, image="images/gone.png")]
    (data_dir / "grounding.json").write_text(json.dumps(rows))
    entry = {"file_name": "grounding.json", "formatting": "vpt_sharegpt", "box_units": "pixels",
             "columns": {"messages": "conversations", "images": "pictures", "boxes": "regions", "masks": "region_masks"}}
    (data_dir / "dataset_info.json").write_text(json.dumps({"mine": entry}))
    with pytest.raises(SystemExit, match="3 bad row"):
        vpt(["data", "validate", "--dataset-info", str(data_dir / "dataset_info.json"), "--dataset", "mine"])
    reported = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert reported == [
        "row 1: boxes[0]: [10, 10, 160, 40] is outside the 100x50 image",
        f"row 2: masks[0]: mask {data_dir}/images/small_mask.png is 10x10 but the row's image is 100x50",
        "row 3: images[0]: images/gone.png: image file not found",
    ]
    with pytest.raises(SystemExit):
        vpt(["data", "validate", "--dataset-info", str(data_dir / "dataset_info.json"), "--dataset", "other"])
    assert f"{data_dir}/dataset_info.json: no dataset 'other' (it has ['mine'])" in capsys.readouterr().err
