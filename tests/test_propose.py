"""`vpt data propose`: Grounding DINO boxes for VQA rows, resumable, sharded, with a report.

The detector is the tiny random one of the gdino branch (offline): its boxes mean nothing, so the
tests use thresholds 0 to get a box for every row, and check what the command does with them.
"""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vpt_plugin.branches import get_branch
from vpt_plugin.cli import main as vpt_main
from vpt_plugin.dataset import VPTDataError
from vpt_plugin.dataset_tools import convert_rows, read_rows
from vpt_plugin.proposals import (
    checked_row,
    detection_text,
    propose_boxes,
    report_dir,
    sidecar_path,
)

COLOURS = ("red", "green", "blue", "yellow")
QUESTIONS = ("What colour is the square?", "Which colour is the small square?", "what is the colour of the square in the image?")
ROWS = 12
DEMO_IMAGES = Path(__file__).resolve().parents[1] / "data" / "demo" / "images"
SIDE = 224  # the demo images' size
# Bad rows by index -> what the command must say about them.
BAD_ROWS = {
    2: "image 'missing.png' not found under",
    7: "question is empty",
    10: "image 'broken.png' cannot be read",
    11: "missing keys ['answer']",
}
GOOD_ROWS = sorted(set(range(ROWS)) - set(BAD_ROWS))

# Runs `vpt data propose` in a fresh process that kills itself (SIGKILL: no cleanup, no report)
# when the detector is called for the third time, i.e. after two batches were written.
KILLED_RUN = """
import os, signal, sys
from transformers import GroundingDinoForObjectDetection
from vpt_plugin.cli import main

forward, calls = GroundingDinoForObjectDetection.forward, []
def forward_until_killed(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, *args, **kwargs)
GroundingDinoForObjectDetection.forward = forward_until_killed
main(["data", *sys.argv[1:]])
"""


def propose(*argv: str) -> None:
    """``vpt data propose ARGV``."""
    vpt_main(["data", "propose", *argv])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_index(records: list[dict]) -> dict[int, dict]:
    indices = [record["source_index"] for record in records]
    assert len(indices) == len(set(indices)), f"rows written more than once: {indices}"
    return {record["source_index"]: record for record in records}


def assert_same_rows(records: list[dict], reference: list[dict]) -> None:
    """The same rows (each once) with the same boxes, up to float noise of a different batching."""
    got, expected = by_index(records), by_index(reference)
    assert sorted(got) == sorted(expected)
    for index, row in expected.items():
        assert got[index].keys() == row.keys(), index
        assert {k: v for k, v in got[index].items() if k not in ("box", "box_score")} == \
               {k: v for k, v in row.items() if k not in ("box", "box_score")}, index
        if "box" in row:
            assert got[index]["box"] == pytest.approx(row["box"], abs=1e-4), index
            assert got[index]["box_score"] == pytest.approx(row["box_score"], abs=1e-4), index


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """12 VQA rows (a JSON list) on the demo's images (224x224), four of them bad; images beside the file."""
    folder = tmp_path_factory.mktemp("vqa")
    rows = []
    for index, demo_image in enumerate(sorted(DEMO_IMAGES.glob("*.png"))[:ROWS]):
        colour = COLOURS[index % len(COLOURS)]
        shutil.copy(demo_image, folder / f"square{index}.png")
        rows.append({"image": f"square{index}.png", "question": QUESTIONS[index % len(QUESTIONS)], "answer": colour,
                     "id": f"q{index}"})
    rows[2]["image"] = "missing.png"
    rows[7]["question"] = "  "
    (folder / "broken.png").write_text("not an image")
    rows[10]["image"] = "broken.png"
    del rows[11]["answer"]
    (folder / "vqa.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> str:
    return str(get_branch("gdino").save_tiny_encoder(tmp_path_factory.mktemp("gdino") / "gdino", seed=0))


@pytest.fixture(scope="module")
def reference(data_dir, detector, tmp_path_factory):
    """One uninterrupted, unsharded run with thresholds 0 (every good row gets a box)."""
    output = tmp_path_factory.mktemp("reference") / "proposals.jsonl"
    run = propose_boxes(data_dir / "vqa.json", output, detector, box_threshold=0.0, text_threshold=0.0, batch_size=4,
                        device="cpu")
    return run, read_jsonl(output), read_jsonl(sidecar_path(output))


def test_proposed_rows_are_rows_vpt_data_convert_reads(reference, data_dir, tmp_path):
    run, rows, _ = reference
    assert [row["source_index"] for row in rows] == GOOD_ROWS
    for row in rows:
        source = read_rows(data_dir / "vqa.json")[row["source_index"]]
        assert {k: row[k] for k in source} == source  # every input field kept
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 < x1 <= SIDE and 0 <= y0 < y1 <= SIDE, row["box"]
        assert 0 <= row["box_score"] <= 1 and row["box_phrase"]
    # One Region Selection row per source row (no re-encoding branches), nothing rejected.
    assert convert_rows(run.output, tmp_path / "vpt.json", "pixels", [], str(data_dir)) == len(GOOD_ROWS)


def test_thresholds_filter_boxes(data_dir, detector, tmp_path):
    for box_threshold, text_threshold in ((1.01, 0.0), (0.0, 1.01)):
        output = tmp_path / f"box{box_threshold}-text{text_threshold}.jsonl"
        run = propose_boxes(data_dir / "vqa.json", output, detector, box_threshold=box_threshold,
                            text_threshold=text_threshold, device="cpu")
        assert run.proposals == [] and run.no_box == len(GOOD_ROWS)
        assert all("box" not in row for row in read_jsonl(output))


def test_a_killed_run_resumes_without_redoing_or_losing_rows(reference, data_dir, detector, tmp_path):
    _, reference_rows, reference_skipped = reference
    output = tmp_path / "proposals.jsonl"
    argv = ["propose", str(data_dir / "vqa.json"), "--output", str(output), "--detector", detector,
            "--box-threshold", "0", "--text-threshold", "0", "--batch-size", "2", "--device", "cpu"]
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, *argv], check=False, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Two batches of two were done: rows 0, 1, 3 with boxes, row 2 (missing image) in the sidecar.
    assert [row["source_index"] for row in read_jsonl(output)] == [0, 1, 3]
    assert [row["source_index"] for row in read_jsonl(sidecar_path(output))] == [2]
    assert not report_dir(output).exists()
    # A kill during a write leaves half a line: that row must be done again, not lost or kept broken.
    with output.open("a") as file:
        file.write(json.dumps(reference_rows[3])[:40])

    run = propose_boxes(data_dir / "vqa.json", output, detector, box_threshold=0.0, text_threshold=0.0,
                        batch_size=2, device="cpu")
    assert (run.done_before, run.done_this_run) == (4, ROWS - 4)
    assert "rows done before this run: 4; done this run: 8" in (report_dir(output) / "report.md").read_text()
    assert_same_rows(read_jsonl(output), reference_rows)
    assert_same_rows(read_jsonl(sidecar_path(output)), reference_skipped)

    again = propose_boxes(data_dir / "vqa.json", output, detector, box_threshold=0.0, text_threshold=0.0, device="cpu")
    assert (again.done_before, again.done_this_run) == (ROWS, 0)
    assert_same_rows(read_jsonl(output), reference_rows)


def test_shards_cover_every_row_once_and_equal_the_unsharded_run(reference, data_dir, detector, tmp_path, capsys):
    _, reference_rows, reference_skipped = reference
    rows, skipped = [], []
    for shard in range(3):
        output = tmp_path / f"shard{shard}.jsonl"
        propose(str(data_dir / "vqa.json"), "--output", str(output), "--detector", detector, "--box-threshold", "0",
                "--text-threshold", "0", "--batch-size", "3", "--shard", f"{shard}/3", "--contact-sheet", "2")
        shard_records = read_jsonl(output) + read_jsonl(sidecar_path(output))
        assert {record["source_index"] % 3 for record in shard_records} == {shard}
        rows += read_jsonl(output)
        skipped += read_jsonl(sidecar_path(output))
        with Image.open(report_dir(output) / "contact_sheet.png") as sheet:
            assert sheet.width == 2 * 256  # two proposals drawn, side by side
    assert_same_rows(rows, reference_rows)
    assert_same_rows(skipped, reference_skipped)

    # A shard's output resumed as another shard is refused: its rows are not that shard's.
    with pytest.raises(SystemExit):
        propose(str(data_dir / "vqa.json"), "--output", str(tmp_path / "shard0.jsonl"), "--detector", detector,
                "--shard", "1/3")
    assert "holds row 0, which is not a row of shard 1/3" in capsys.readouterr().err


@pytest.mark.parametrize("shard, message", [
    ("3/3", "'3/3': need n >= 1 and 0 <= i < n"),
    ("0/0", "'0/0': need n >= 1 and 0 <= i < n"),
    ("-1/2", "'-1/2': need n >= 1 and 0 <= i < n"),
    ("1", "'1' is not i/n"),
    ("a/b", "'a/b' is not i/n"),
])
def test_a_bad_shard_is_named(shard, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        propose(str(tmp_path / "in.json"), "--output", str(tmp_path / "out.jsonl"), f"--shard={shard}")
    assert message in capsys.readouterr().err


def test_report_scores_and_contact_sheet_are_written(reference):
    run, rows, _ = reference
    folder = report_dir(run.output)
    report = (folder / "report.md").read_text()
    for line in (f"`{run.source}`, {ROWS} rows", "rows done before this run: 0; done this run: 12",
                 f"boxes proposed: {len(GOOD_ROWS)}", "rows without a box: 0", f"bad rows: {len(BAD_ROWS)}",
                 "box threshold 0.0, text threshold 0.0", f"detector `{run.settings['detector']}`"):
        assert line in report
    with Image.open(folder / "scores.png") as scores:
        scores.load()
    with Image.open(folder / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * 256, 3 * (256 + 30))  # 8 proposals (default up to 16) in a 3x3 grid
        # The first proposal's box is drawn on its image: red, lined with black outside.
        x0, y0 = (round(v * 256 / SIDE) for v in rows[0]["box"][:2])
        assert sheet.convert("RGB").getpixel((x0, y0)) == (0, 0, 0)
        assert sheet.convert("RGB").getpixel((x0 + 3, y0 + 3)) == (255, 0, 0)


def test_bad_rows_are_reported_by_index_and_skipped(data_dir, detector, tmp_path, capsys):
    output = tmp_path / "proposals.jsonl"
    propose(str(data_dir / "vqa.json"), "--output", str(output), "--detector", detector, "--box-threshold", "0",
            "--text-threshold", "0")
    stdout = capsys.readouterr().out
    for index, message in BAD_ROWS.items():
        assert f"row {index}: {message}" in stdout
        assert f"- row {index}: {message}" in (report_dir(output) / "report.md").read_text()
    assert f"{ROWS} rows done this run, 0 before; {len(GOOD_ROWS)} boxes, 0 rows without a box, {len(BAD_ROWS)} bad rows" in stdout
    assert [row["source_index"] for row in read_jsonl(output)] == GOOD_ROWS
    skipped = read_jsonl(sidecar_path(output))
    assert [(r["source_index"], r["status"]) for r in skipped] == [(index, "bad") for index in BAD_ROWS]
    assert f"image 'missing.png' not found under {data_dir}" in skipped[0]["reason"]


def test_a_box_does_not_depend_on_the_images_batched_with_it(detector):
    from vpt_plugin.proposals import detect, load_detector

    model, processor = load_detector(detector, "cpu")
    wide, tall = Image.new("RGB", (120, 80), (128, 128, 128)), Image.new("RGB", (80, 120), (128, 128, 128))
    ImageDraw.Draw(wide).rectangle([10, 10, 40, 40], fill="red")
    ImageDraw.Draw(tall).rectangle([30, 60, 60, 90], fill="blue")
    texts = ["red square.", "blue square."]
    together = detect(model, processor, [wide, tall], texts, 0.0, 0.0)
    alone = [detect(model, processor, [image], [text], 0.0, 0.0)[0] for image, text in zip((wide, tall), texts)]
    for found, expected in zip(together, alone):
        assert found["box"] == pytest.approx(expected["box"], abs=1e-4)


def test_the_phrase_is_the_question_the_answer_or_both(data_dir):
    row = {"image": "square0.png", "question": "What colour is the square?", "answer": "Red"}
    assert detection_text(row, "question") == "what colour is the square?."
    assert detection_text(row, "answer") == "red."
    assert detection_text(row, "both") == "what colour is the square?. red."
    assert checked_row(row, "both", str(data_dir))[1] == "what colour is the square?. red."
    with pytest.raises(VPTDataError, match="answer is empty"):
        checked_row({**row, "answer": " "}, "answer", str(data_dir))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ('{"image": "a.png"}', "expected a JSON list of rows, found a JSON dict"),
])
def test_a_bad_input_file_is_named(content, message, tmp_path, capsys):
    source = tmp_path / "rows.json"
    source.write_text(content)
    with pytest.raises(SystemExit):
        propose(str(source), "--output", str(tmp_path / "out.jsonl"))
    assert f"vpt data: {source}: {message}" in capsys.readouterr().err


def test_rows_without_a_box_are_kept_plain_or_dropped(reference, data_dir, detector, tmp_path):
    _, reference_rows, _ = reference
    # A threshold between the scores: rows whose best box scores above it keep that box.
    scores = sorted(row["box_score"] for row in reference_rows)
    threshold = scores[len(scores) // 2]
    with_box = {row["source_index"] for row in reference_rows if row["box_score"] > threshold}
    assert 0 < len(with_box) < len(GOOD_ROWS)
    runs = {}
    for no_box in ("keep", "drop"):
        output = tmp_path / f"{no_box}.jsonl"
        propose(str(data_dir / "vqa.json"), "--output", str(output), "--detector", detector, "--box-threshold",
                repr(threshold), "--text-threshold", "0", "--batch-size", "4", "--no-box", no_box)
        runs[no_box] = by_index(read_jsonl(output)), by_index(read_jsonl(sidecar_path(output)))
    source = read_rows(data_dir / "vqa.json")

    kept, kept_skipped = runs["keep"]
    assert sorted(kept) == GOOD_ROWS and sorted(kept_skipped) == sorted(BAD_ROWS)
    for index, row in kept.items():
        if index in with_box:
            assert_same_rows([row], [by_index(reference_rows)[index]])
        else:
            assert row == {**source[index], "source_index": index}  # a plain row: no box key

    # `vpt data convert` reads the kept file: rows with a box become VPT rows, the others plain rows.
    assert convert_rows(tmp_path / "keep.jsonl", tmp_path / "vpt.json", "pixels", ["gdino"], str(data_dir)) == \
        2 * len(with_box) + len(GOOD_ROWS) - len(with_box)
    plain = [row for row in json.loads((tmp_path / "vpt.json").read_text()) if len(row["messages"]) == 2]
    assert len(plain) == len(GOOD_ROWS) - len(with_box)
    assert plain[0]["messages"][0]["content"].startswith("<image>") and set(plain[0]) == {"messages", "images"}

    dropped, dropped_skipped = runs["drop"]
    assert sorted(dropped) == sorted(with_box)
    assert {index for index, r in dropped_skipped.items() if r["status"] == "no box"} == set(GOOD_ROWS) - with_box
    report = (report_dir(tmp_path / "drop.jsonl") / "report.md").read_text()
    assert f"rows without a box: {len(GOOD_ROWS) - len(with_box)} (dropped" in report
