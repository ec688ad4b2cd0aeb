"""High-resolution benchmarks (V* Bench, HR-Bench 4K/8K, MME-RealWorld): loaders on the replicas of their
files, the multiple-choice answer rule, per-category accuracy, and ``evaluation/anchors.yaml`` end to end."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_evaluation import ENV, REPO, finished

from vpt_plugin.dataset import VPTDataError
from vpt_plugin.evaluation.benchmarks import (
    BENCHMARKS,
    extract_choice,
    get_benchmark,
    load_items,
    multiple_choice_scores,
)
from vpt_plugin.evaluation.replicas import ROWS, _questions, write_replicas


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    return write_replicas(tmp_path_factory.mktemp("replicas"))


def expected_rows(seed: int) -> list[tuple]:
    """What the generator put in each row: (question, options in order, answer letter, kind)."""
    return [(question, options, answer, kind) for _, question, options, answer, kind in _questions(seed)]


# ----------------------------------------------------------------------------- loaders


def test_vstar_loader_reads_questions_options_images_and_categories(replicas, tmp_path):
    benchmark = get_benchmark("vstar")
    items = load_items(benchmark, benchmark.locate(replicas / "vstar_bench"), tmp_path)
    assert len(items) == ROWS
    for item, (question, options, answer, kind) in zip(items, expected_rows(1)):
        assert list(item["options"]) == list("ABCD"[: len(options)]) and list(item["options"].values()) == options
        assert item["reference"] == answer and item["category"] == kind
        assert item["question"].startswith(question + "\n(A) " + options[0] + "\n(B) " + options[1])
        assert item["question"].endswith("Answer with the option's letter from the given choices directly.")
        folder = {"attribute": "direct_attributes", "spatial": "relative_position"}[kind]
        assert Path(item["image"]).parent == replicas / "vstar_bench" / folder and Path(item["image"]).is_file()
    assert {item["category"] for item in items} == {"attribute", "spatial"}


@pytest.mark.parametrize("name, seed, file", [("hrbench_4k", 2, "hr_bench_4k.tsv"), ("hrbench_8k", 3, "hr_bench_8k.tsv"),
                                              ("hrbench_4k", 2, "hr_bench_4k.parquet")])
def test_hrbench_loader_decodes_images_once_and_keeps_option_order(replicas, tmp_path, name, seed, file):
    items = load_items(get_benchmark(name), replicas / "HR-Bench" / file, tmp_path / "cache")
    assert len(items) == ROWS
    for item, (question, options, answer, kind) in zip(items, expected_rows(seed)):
        assert list(item["options"].values()) == options and item["reference"] == answer
        assert item["category"] == {"attribute": "single", "spatial": "cross"}[kind]
        assert item["question"] == question + "\n" + "\n".join(
            f"{letter}. {text}" for letter, text in zip("ABCD", options)) + "\nAnswer the option letter directly."
        assert Image.open(item["image"]).size == (480, 320)
    if name == "hrbench_8k":  # its last row names row 0's image
        assert items[-1]["image"] == items[0]["image"] and len(list((tmp_path / "cache").iterdir())) == ROWS - 1
    written = sorted(path.stat().st_mtime_ns for path in (tmp_path / "cache").iterdir())
    again = load_items(get_benchmark(name), replicas / "HR-Bench" / file, tmp_path / "cache")
    assert [i["image"] for i in again] == [i["image"] for i in items]
    assert sorted(path.stat().st_mtime_ns for path in (tmp_path / "cache").iterdir()) == written  # not rewritten


@pytest.mark.parametrize("name, file", [("mme_realworld_lite", "MME-RealWorld-Lite/data/MME-RealWorld-Lite.json"),
                                        ("mme_realworld_lite_tsv", "MME-RealWorld-Base64/mme_realworld_lite.tsv")])
def test_mme_realworld_loader_reads_five_options_and_task_categories(replicas, tmp_path, name, file):
    benchmark = get_benchmark(name)
    items = load_items(benchmark, benchmark.locate(replicas / file.split("/")[0]), tmp_path)
    assert len(items) == ROWS
    for item, (question, options, answer, kind) in zip(items, expected_rows(4)):
        letters = "ABCDE"[: len(options) + 1]
        assert list(item["options"]) == list(letters)
        assert list(item["options"].values()) == [*options, "All the above answers are wrong."]
        assert item["reference"] == answer
        assert item["category"] == {"attribute": "Perception/Monitoring", "spatial": "Reasoning/Remote Sensing"}[kind]
        assert item["question"].startswith(question + " The choices are listed below:\n(A) ")
        assert item["question"].endswith("The best answer is:") and Path(item["image"]).is_file()


def test_an_image_cut_short_by_a_kill_is_written_again(replicas, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "0.png.partial").write_bytes(b"\x89PNG cut")  # a kill while the first image was written
    items = load_items(get_benchmark("hrbench_4k"), replicas / "HR-Bench" / "hr_bench_4k.tsv", cache)
    assert items[0]["image"] == str(cache / "0.png") and Image.open(items[0]["image"]).size == (480, 320)


def test_a_missing_download_and_a_bad_row_say_what_and_where(replicas, tmp_path):
    with pytest.raises(VPTDataError, match=r"benchmark vstar: .*test_questions.jsonl not found; download craigwu/vstar_bench"):
        get_benchmark("vstar").locate(tmp_path)
    broken = tmp_path / "test_questions.jsonl"
    broken.write_text(json.dumps({"image": "x.jpg", "text": "What?\n(A) a\n(B) b", "category": "direct_attributes",
                                  "label": "C"}) + "\n")
    (tmp_path / "x.jpg").write_bytes((replicas / "vstar_bench" / "direct_attributes" / "sa_0.jpg").read_bytes())
    with pytest.raises(VPTDataError, match=r"test_questions.jsonl, row 0: the answer 'C' is not one of the options \['A', 'B'\]"):
        load_items(get_benchmark("vstar"), broken, tmp_path)


# ----------------------------------------------------------------------------- the answer's letter

OPTIONS = {"A": "white", "B": "black", "C": "dark red", "D": "red"}
VERDICTS = [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("b", None), ("B. black", "B"), ("(B) black", "B"),
    ("The answer is C.", "C"), ("The best answer is: (D)", "D"), ("Answer: A", "A"), ("Option B", "B"),
    ("black", "B"), ("Black.", "B"), ("The bag is black.", "B"), ("dark red", "C"), ("red", "D"),
    ("A red bag", "D"),             # an article, not a letter; the option text decides
    ("A or B", None), ("(A) or (B)", None), ("white or black", None), ("B. white", "B"),
    ("I cannot tell.", None), ("", None),
    ("<|region_token_start|>", None),  # what is left if a perception turn were taken for the answer
    ("The bag is black, so the answer is (B).", "B"), ("It is not black; it is white. So the answer is (A).", "A"),
    ("The car is dark red.", "C"),  # "red" is in "dark red": the option holding the other wins
    ("I think it's B", "B"), ("The most likely answer is D", "D"), ("B is correct", "B"), ("My answer: B", "B"),
    ("**B**", "B"), ("<answer>C</answer>", "C"), ("B<|im_end|>", "B"), ("b.", None),  # capitals only
]


@pytest.mark.parametrize("answer, expected", VERDICTS)
def test_the_choice_an_answer_names(answer, expected):
    assert extract_choice(answer, OPTIONS) == expected


def test_per_category_accuracy_by_hand():
    options = {"A": "left", "B": "right"}
    predictions = [
        {"answer": "A", "options": options, "reference": "A", "category": "single"},
        {"answer": "right", "options": options, "reference": "B", "category": "single"},
        {"answer": "B", "options": options, "reference": "A", "category": "single"},
        {"answer": "A or B", "options": options, "reference": "A", "category": "cross"},
        {"answer": "(A)", "options": options, "reference": "A", "category": "cross"},
    ]
    hr = multiple_choice_scores(predictions, "hrbench")
    assert hr["categories"] == {"cross": 0.5, "single": 2 / 3} and hr["category_items"] == {"cross": 2, "single": 3}
    assert hr["metric_mean"] == pytest.approx((0.5 + 2 / 3) / 2)  # HR-Bench: the mean of its two categories
    assert hr["no_choice"] == 1
    assert multiple_choice_scores(predictions, "vstar")["metric_mean"] == pytest.approx(3 / 5)  # over all questions


# ----------------------------------------------------------------------------- anchors.yaml end to end


LIMIT = 3  # questions per benchmark in the end-to-end runs: enough for a batch before the kill and one after


def run_anchors(model_dir, replicas, output_dir, *extra):
    return subprocess.Popen(
        [sys.executable, str(REPO / "evaluation" / "evaluation.py"), "--config", str(REPO / "evaluation" / "anchors.yaml"),
         "--model", f"tiny={model_dir}", "--benchmark-dir", str(replicas), "--output-dir", str(output_dir),
         "--batch-size", "2", "--max-new-tokens", "6", "--limit", str(LIMIT), "--device", "cpu", *extra],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_anchors_config_runs_on_the_replicas_resumes_and_writes_the_settings(tiny_vpt_dir, replicas, tmp_path):
    config = yaml.safe_load((REPO / "evaluation" / "anchors.yaml").read_text())
    assert set(config["benchmarks"]) <= set(BENCHMARKS)
    whole = tmp_path / "whole"
    output = finished(run_anchors(tiny_vpt_dir, replicas, whole))
    assert "| model | vstar | vstar attribute | vstar spatial |" in output

    cut = tmp_path / "cut"
    first = run_anchors(tiny_vpt_dir, replicas, cut)
    predictions = cut / "tiny" / "vpt" / "hrbench_4k" / "predictions.jsonl"
    deadline = time.time() + 300
    while not (predictions.is_file() and predictions.read_text().count("\n") >= 2):
        assert first.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.1)
    first.kill()
    first.wait()
    finished(run_anchors(tiny_vpt_dir, replicas, cut))
    for path in sorted(whole.rglob("predictions.jsonl")) + sorted(whole.rglob("scores.json")):
        # The same lines (base64 images are cached under each run's own output folder).
        assert (cut / path.relative_to(whole)).read_text() == path.read_text().replace(str(whole), str(cut)), path

    scores = json.loads((whole / "tiny" / "vpt" / "vstar" / "scores.json").read_text())
    assert scores["items"] == LIMIT and set(scores["categories"]) == {"attribute", "spatial"}
    settings = scores["settings"]
    assert settings["image_max_pixels"] == config["image_max_pixels"] and settings["max_new_tokens"] == 6
    assert settings["perception"] == "allowed" and settings["max_perception_rounds"] == config["generation"]["max_perception_rounds"]
    assert settings["crops_from"].startswith("cut from the full-resolution original")
    assert json.loads((whole / "tiny" / "vpt" / "vstar" / "settings.json").read_text())["max_new_tokens"] == 6
    # Resuming with a setting that changes the answers is refused, naming it.
    again = run_anchors(tiny_vpt_dir, replicas, whole, "--image-max-pixels", "4096")
    output, _ = again.communicate(timeout=600)
    assert again.returncode != 0 and "was answered with other settings (image_max_pixels 1003520 -> 4096)" in output
    assert "Answer with the option's letter" in settings["prompt"]
    summary = (whole / "summary.md").read_text()
    assert "Published figures" in summary and "Mini-o3" in summary
    assert "Published figures of benchmarks not in this run" in summary and "mme_realworld 57.3" in summary
    assert "image_max_pixels" in summary and (whole / "summary.png").stat().st_size > 1000
