"""``python evaluation/evaluation.py``: outputs, the no-VPT comparison, and resuming after a kill."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RS, RE = "<|region_token_start|>", "<|region_token_end|>"
ENV = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def run_evaluation(model_dir, output_dir, cwd=REPO, extra=()):
    return subprocess.Popen(
        [sys.executable, str(REPO / "evaluation" / "evaluation.py"), "--model", f"tiny={model_dir}",
         "--dataset", "vpt_demo_clip_test", "--dataset", "vpt_demo_detection_test", "--limit", "6",
         "--batch-size", "2", "--max-new-tokens", "12", "--compare-no-perception", "--output-dir", str(output_dir), *extra],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finished(process) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def results(output_dir: Path) -> dict:
    found = {}
    for path in sorted(output_dir.rglob("*.jsonl")) + sorted(output_dir.rglob("scores.json")):
        found[str(path.relative_to(output_dir))] = path.read_text()
    found["summary.csv"] = (output_dir / "summary.csv").read_text()
    return found


def test_evaluation_writes_predictions_scores_table_and_chart(tiny_vpt_dir, tmp_path):
    out = tmp_path / "eval"
    output = finished(run_evaluation(tiny_vpt_dir, out, cwd=REPO / "evaluation"))  # runs from inside evaluation/
    assert "| model | vpt_demo_clip_test | vpt_demo_detection_test | Average |" in output
    with open(out / "summary.csv") as table:
        rows = list(csv.reader(table))
    assert rows[0] == ["model", "vpt_demo_clip_test", "vpt_demo_detection_test", "Average"]
    assert [row[0] for row in rows[1:]] == ["tiny", "tiny (no VPT)"]
    assert (out / "summary.png").stat().st_size > 1000
    predictions = [json.loads(line) for line in (out / "tiny/vpt/vpt_demo_clip_test/predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in predictions] == list(range(6))
    plain = [json.loads(line) for line in (out / "tiny/no_vpt/vpt_demo_clip_test/predictions.jsonl").read_text().splitlines()]
    assert all(p["trace"]["rounds"] == [] for p in plain)
    scores = json.loads((out / "tiny/vpt/vpt_demo_clip_test/scores.json").read_text())
    assert scores["items"] == 6 and scores["metric"] == "relaxed_match" and 0 <= scores["metric_mean"] <= 1


def test_interrupted_evaluation_resumes_to_identical_results(tiny_vpt_dir, tmp_path):
    whole = tmp_path / "whole"
    finished(run_evaluation(tiny_vpt_dir, whole))

    cut = tmp_path / "cut"
    first = run_evaluation(tiny_vpt_dir, cut)
    predictions = cut / "tiny" / "vpt" / "vpt_demo_clip_test" / "predictions.jsonl"
    deadline = time.time() + 300
    while not (predictions.is_file() and predictions.read_text().count("\n") >= 2):
        assert first.poll() is None and time.time() < deadline, "the first run ended before it could be interrupted"
        time.sleep(0.2)
    first.kill()
    first.wait()
    with open(predictions, "a") as out:
        out.write('{"index": 5, "question": "cut sh')  # a line the kill cut short
    done_before = predictions.read_text().count("\n")
    assert done_before < 6
    finished(run_evaluation(tiny_vpt_dir, cut))
    assert results(cut) == results(whole)


def test_config_paths_are_relative_to_the_repository(tiny_vpt_dir, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"tiny": str(tiny_vpt_dir)}, "datasets": ["demo/vpt_demo_seg_test.json"], "limit": 2,
        "output_dir": str(tmp_path / "out"), "metric": "exact_match", "generation": {"max_new_tokens": 4},
    }))
    process = subprocess.Popen([sys.executable, "evaluation.py", "--config", str(config)], cwd=REPO / "evaluation",
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finished(process)
    scores = json.loads((tmp_path / "out/tiny/vpt/vpt_demo_seg_test/scores.json").read_text())
    assert scores["items"] == 2 and scores["metric"] == "exact_match"


def test_vpt_infer_answers_and_draws_the_regions(tiny_vpt_dir, tmp_path, capsys):
    from PIL import Image

    from vpt_plugin.cli import main

    image = tmp_path / "shapes.png"
    Image.new("RGB", (224, 224), (120, 120, 120)).save(image)
    main(["infer", "--model", str(tiny_vpt_dir), "--image", str(image), "--max-new-tokens", "8", "Where is it?"])
    printed = capsys.readouterr().out
    drawn = tmp_path / "shapes_regions.png"
    assert printed.strip(), "an answer is printed"
    if "pixels" in printed:  # the random model chose a region: it is drawn on a copy
        assert Image.open(drawn).size == (224, 224)
        assert Image.open(image).getcolors() == [(224 * 224, (120, 120, 120))]
    main(["infer", "--model", str(tiny_vpt_dir), "--image", str(image), "--max-new-tokens", "8", "--no-perception", "Hi?"])
    assert "perception 0" not in capsys.readouterr().out


def test_region_scores_count_reference_cells_and_whole_objects(tmp_path):
    from vpt_plugin.evaluation.runner import read_items, region_scores

    rows = [
        {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": RS + "<|x_2|><|y_4|><|x_3|><|y_5|>" + RE},
                      {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}],
         "images": ["a.png", "a.png_32,96,160,224"], "box": [66, 130, 126, 190]},
        {"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "<|clip_action_start|>"},
                      {"role": "user", "content": "<clip_image>"}, {"role": "assistant", "content": "b"}], "images": ["a.png"]},
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    first, second = read_items(tmp_path / "rows.json", tmp_path, None)
    assert first["reference_region"] == [2, 4, 3, 5] and first["box"] == [66, 130, 126, 190]
    assert "reference_region" not in second and "box" not in second

    def answered(item, rounds):
        return {**item, "trace": {"rounds": rounds}}

    region = lambda grid, pixels: {"kind": "region", "grid_boxes": [grid], "pixel_boxes": [pixels]}  # noqa: E731
    predictions = [
        answered(first, [region([2, 4, 3, 5], [32, 96, 160, 224])]),  # the right cells: holds the object
        answered(first, [region([3, 4, 3, 5], [64, 96, 160, 224])]),  # one cell off: still holds it
        answered(first, [region([4, 4, 4, 5], [96, 96, 192, 224])]),  # two cells off: cuts the object
        answered(first, []),  # no look
        answered(second, [{"kind": "clip"}]),  # no reference region: not counted
    ]
    assert region_scores(predictions) == {"region_items": 4, "region_cell_hits": 1, "region_object_items": 4,
                                          "region_object_hits": 2}
