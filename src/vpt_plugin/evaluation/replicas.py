"""Tiny synthetic replicas of the high-resolution benchmarks' files, for offline tests and a dry run.

``python -m vpt_plugin.evaluation.replicas --output data/benchmark_replicas`` writes, deterministically,
a few questions per benchmark in the exact layout of its hub download (``benchmarks.py`` says which):

- ``vstar_bench/``: ``test_questions.jsonl`` and the images in ``direct_attributes/`` and ``relative_position/``;
- ``HR-Bench/``: ``hr_bench_4k.tsv``, ``hr_bench_8k.tsv`` (base64 images; in the 8K one the last row
  names row 0 for its image, as VLMEvalKit's files share an image) and ``hr_bench_4k.parquet``;
- ``MME-RealWorld-Lite/``: ``data/MME-RealWorld-Lite.json`` with ``data/imgs/``; and
  ``MME-RealWorld-Base64/mme_realworld_lite.tsv``.

Each image is a grey canvas with one small coloured square; the questions ask its colour (attribute,
single instance), or where two squares are relative to each other (spatial, cross instance). The
correct letter varies from row to row, so a model that always answers "A" does not score 100.
"""

import argparse
import base64
import csv
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
ROWS = 6
SIZE = (480, 320)  # small: the replicas test formats and scoring, not resolution


def _picture(rng: random.Random) -> tuple[Image.Image, str, str]:
    """An image with two squares; the colour of the first, and whether the second is left or right of it."""
    image = Image.new("RGB", SIZE, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    first, second = rng.sample(sorted(COLOURS), 2)
    x0, x1 = rng.sample(range(20, SIZE[0] - 40, 40), 2)
    for colour, x in ((first, x0), (second, x1)):
        y = rng.randrange(20, SIZE[1] - 40)
        draw.rectangle((x, y, x + 16, y + 16), fill=COLOURS[colour])
    return image, first, ("left" if x1 < x0 else "right")


def _questions(seed: int):
    """``(image, question, options (letters in order), answer letter, kind)`` per replica row."""
    rng = random.Random(seed)
    for row in range(ROWS):
        image, colour, side = _picture(rng)
        if row % 2 == 0:
            options = rng.sample(sorted(COLOURS), 4)
            question, answer, kind = "What is the colour of the first square?", options.index(colour), "attribute"
        else:
            options = ["left", "right"] if rng.random() < 0.5 else ["right", "left"]
            question, answer, kind = "Is the second square on the left or right of the first one?", options.index(side), "spatial"
        yield image, question, options, "ABCDE"[answer], kind


def _base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_vstar(folder: Path) -> None:
    lines = []
    for number, (image, question, options, answer, kind) in enumerate(_questions(1)):
        category = {"attribute": "direct_attributes", "spatial": "relative_position"}[kind]
        (folder / category).mkdir(parents=True, exist_ok=True)
        image.save(folder / category / f"sa_{number}.jpg")
        text = "\n".join([question, *(f"({'ABCD'[k]}) {option}" for k, option in enumerate(options)),
                          "Answer with the option's letter from the given choices directly."])
        lines.append(json.dumps({"image": f"{category}/sa_{number}.jpg", "text": text, "category": category,
                                 "question_id": number, "label": answer}))
    (folder / "test_questions.jsonl").write_text("\n".join(lines) + "\n")


def hrbench_rows(seed: int, shared_image: bool = False) -> list[dict]:
    """HR-Bench rows; with ``shared_image`` the last row holds row 0's index instead of an image, as
    VLMEvalKit's TSVs write an image that several rows share."""
    rows = []
    for number, (image, question, options, answer, kind) in enumerate(_questions(seed)):
        padded = options + [""] * (4 - len(options))
        rows.append({"index": number, "question": question, "answer": answer,
                     "category": {"attribute": "single", "spatial": "cross"}[kind],
                     **dict(zip("ABCD", padded)), "cycle_category": f"cycle_{number % 2}", "image": _base64(image)})
    if shared_image:
        rows[-1]["image"] = "0"
    return rows


def write_tsv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def write_hrbench(folder: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    write_tsv(folder / "hr_bench_4k.tsv", hrbench_rows(2))
    write_tsv(folder / "hr_bench_8k.tsv", hrbench_rows(3, shared_image=True))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(hrbench_rows(2)), folder / "hr_bench_4k.parquet")


def mme_rows(seed: int):
    for number, (image, question, options, answer, kind) in enumerate(_questions(seed)):
        choices = [f"({'ABCDE'[k]}) {option}" for k, option in enumerate(options)]
        choices.append(f"({'ABCDE'[len(options)]}) All the above answers are wrong.")
        task, subtask = ("Perception", "Monitoring") if kind == "attribute" else ("Reasoning", "Remote Sensing")
        yield number, image, question, choices, answer, task, subtask


def write_mme_realworld(lite: Path, base64_folder: Path) -> None:
    (lite / "data" / "imgs").mkdir(parents=True, exist_ok=True)
    records, tsv = [], []
    for number, image, question, choices, answer, task, subtask in mme_rows(4):
        image.save(lite / "data" / "imgs" / f"{number}.jpg")
        records.append({"Question_id": f"{task}/{subtask}/Colours/{number:04d}", "Question Type": "Multiple Choice",
                        "Image": f"{number}.jpg", "Text": question, "Answer choices": choices, "Ground truth": answer,
                        "Task": task, "Subtask": subtask, "Category": "Colours", "Dataset": "replica"})
        tsv.append({"index": number, "image": _base64(image), "question": question,
                    "multi-choice options": "The choices are listed below:\n" + "\n".join(choices),
                    "answer": answer, "category": subtask,
                    "l2-category": f"{task}/{subtask}"})
    (lite / "data" / "MME-RealWorld-Lite.json").write_text(json.dumps(records, indent=1))
    write_tsv(base64_folder / "mme_realworld_lite.tsv", tsv)


def write_replicas(output: Path) -> Path:
    output = Path(output)
    write_vstar(output / "vstar_bench")
    write_hrbench(output / "HR-Bench")
    write_mme_realworld(output / "MME-RealWorld-Lite", output / "MME-RealWorld-Base64")
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("data/benchmark_replicas"))
    print(f"benchmark replicas written to {write_replicas(parser.parse_args().output)}")


if __name__ == "__main__":
    main()
