"""``vpt data propose``: a box for each VQA row from Grounding DINO, so rows without boxes can become VPT rows.

``vpt data convert`` needs a box per row (the region the second look crops). Most VQA data has
none, so this command asks an open-vocabulary detector (transformers' Grounding DINO, default
``IDEA-Research/grounding-dino-tiny``) where the question (``--phrase``) points, and keeps its best
box above ``--box-threshold`` that names a word above ``--text-threshold``.

Input: a JSON list or JSONL of ``{"image", "question", "answer", ...}``; image paths relative to
``--media-dir`` (default: the input file's folder; :func:`~vpt_plugin.dataset.resolve_media`).

Files written, for ``--output OUT.jsonl``:

- ``OUT.jsonl``: one row per line, the input row (every field kept) plus ``source_index`` (its index
  in the input), ``box`` (``[x0, y0, x1, y1]`` in pixels of the image, clipped to it),
  ``box_score`` (the detector's score) and ``box_phrase`` (the words the box matched). With
  ``--no-box keep`` a row without a box is written too, as the input row plus ``source_index``.
  These rows are what ``vpt data convert --box-format pixels`` reads (a row without a box becomes a
  plain row there: question and answer, no second look).
- ``OUT.skipped.jsonl`` (the sidecar): ``{"source_index", "status": "bad", "reason"}`` for each
  bad row, ``{"source_index", "status": "no box"}`` for each row dropped by ``--no-box drop``.
  Every row of the shard is in exactly one of the two files once it is done.
- ``OUT.report/``: ``report.md`` (counts, settings, bad rows), ``scores.png`` (histogram of the
  boxes' scores), ``contact_sheet.png`` (the first ``--contact-sheet`` boxes drawn on their images).

Both jsonl files are appended to and flushed after every batch. A rerun skips every row already in
either file, so an interrupted run resumes where it stopped; a last line cut short by a kill is
removed and its row done again. ``--shard i/n`` does the rows whose index % n == i; give each
shard its own ``--output``.
"""

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from .branches.gdino import detection_caption
from .dataset import VPTDataError, resolve_media
from .dataset_tools import REQUIRED_KEYS, read_rows

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
# Grounding DINO's own demo thresholds.
DEFAULT_BOX_THRESHOLD = 0.35
DEFAULT_TEXT_THRESHOLD = 0.25
PHRASE_SOURCES = ("question", "answer", "both")
NO_BOX_MODES = ("keep", "drop")
STATUS_BAD = "bad"
STATUS_NO_BOX = "no box"
SHEET_CELL = 256  # pixels of the longer side of each image on the contact sheet
SHEET_CAPTION = 30  # pixels below each image for its row, score and phrase


@dataclass
class ProposalRun:
    """What one ``propose_boxes`` call found, over all runs on the same ``output`` (for the report)."""

    source: Path
    output: Path
    rows_in: int
    shard: tuple[int, int]
    shard_rows: int
    done_before: int
    done_this_run: int
    proposals: list[dict] = field(default_factory=list)  # output rows with a box, by source_index
    no_box: int = 0
    bad_rows: dict[int, str] = field(default_factory=dict)  # source_index -> reason
    settings: dict = field(default_factory=dict)

    @property
    def report_dir(self) -> Path:
        return report_dir(self.output)


def sidecar_path(output: Path) -> Path:
    """``OUT.jsonl`` -> ``OUT.skipped.jsonl``: the rows done that are not in OUT."""
    return output.with_suffix(".skipped.jsonl")


def report_dir(output: Path) -> Path:
    """``OUT.jsonl`` -> ``OUT.report/``."""
    return output.with_suffix(".report")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; argparse shows the error as written here."""
    parts = text.split("/")
    try:
        index, count = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not i/n (two integers, e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: need n >= 1 and 0 <= i < n (shards of n=4 are 0/4 .. 3/4)")
    return index, count


def int_at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {minimum}")
        return value

    return parse


def read_done(path: Path) -> list[dict]:
    """The records of one of this command's jsonl files. A last line without its newline was cut
    short by a kill: it is removed from the file, so its row is done again and appending stays clean."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as file:
            file.truncate(len(complete))
    records = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise VPTDataError(f"{path}, line {number}: not JSON ({error}); not written by vpt data propose?") from error
        if not isinstance(record, dict) or not isinstance(record.get("source_index"), int):
            raise VPTDataError(f"{path}, line {number}: no integer source_index; not written by vpt data propose?")
        records.append(record)
    return records


def detection_text(row: dict, phrase: str) -> str:
    """What Grounding DINO reads for a row: its question, answer or both, each as a caption (its
    own phrase, ending with a full stop). The full stop also keeps the processor from taking a
    batch's texts for one image's candidate labels, which it would merge."""
    parts = {"question": [row["question"]], "answer": [row["answer"]], "both": [row["question"], row["answer"]]}[phrase]
    return " ".join(detection_caption(str(part)) for part in parts)


def checked_row(row, phrase: str, media_dir: str) -> tuple[Image.Image, str]:
    """A row's image (RGB) and detector text; raises :class:`VPTDataError` saying what is wrong."""
    if not isinstance(row, dict):
        raise VPTDataError("not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in row]
    if missing:
        raise VPTDataError(f"missing keys {missing}")
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise VPTDataError(f"question is empty or not text: {row['question']!r}")
    if phrase != "question" and not str(row["answer"]).strip():
        raise VPTDataError(f"answer is empty (--phrase {phrase} reads it)")
    if not isinstance(row["image"], str):
        raise VPTDataError(f"image is not a path: {row['image']!r}")
    file = resolve_media(row["image"], media_dir)
    if not os.path.isfile(file):
        raise VPTDataError(f"image {row['image']!r} not found under {media_dir}")
    try:
        with Image.open(file) as image:
            image = image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise VPTDataError(f"image {row['image']!r} cannot be read: {error}") from error
    return image, detection_text(row, phrase)


@functools.lru_cache(maxsize=1)
def load_detector(detector: str, device: str):
    """Grounding DINO and its processor, kept for the next call: a process that proposes several
    files (or shards, or tests) loads the detector once."""
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    model = GroundingDinoForObjectDetection.from_pretrained(detector).to(device).eval()
    return model, AutoProcessor.from_pretrained(detector)


def best_box(result: dict, width: int, height: int) -> dict | None:
    """The highest-scoring box of one image's post-processed detections, clipped to the image
    (``vpt data convert`` rejects a box outside it), that keeps an area and names a word above the
    text threshold (an empty phrase: nothing in the text matched); None if there is none."""
    best = None
    for score, box, label in zip(result["scores"].tolist(), result["boxes"].tolist(), result["text_labels"]):
        x0, y0 = max(0.0, box[0]), max(0.0, box[1])
        x1, y1 = min(float(width), box[2]), min(float(height), box[3])
        if x0 < x1 and y0 < y1 and label.strip() and (best is None or score > best["box_score"]):
            best = {"box": [x0, y0, x1, y1], "box_score": score, "box_phrase": label.strip()}
    return best


@torch.no_grad()
def detect(model, processor, images: list[Image.Image], texts: list[str], box_threshold: float,
           text_threshold: float) -> list[dict | None]:
    """One batch through the detector: the best box of each image for its text (or None).

    Images of one size go through together: the processor pads a batch to its largest image, and the
    detector is not blind to padding, so mixing sizes would make a box depend on its batch (and so on
    --batch-size, --shard and where a resumed run starts)."""
    found = [None] * len(images)
    by_size = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.size, []).append(index)
    for members in by_size.values():
        group = [images[i] for i in members]
        inputs = processor(images=group, text=[texts[i] for i in members], padding="longest", truncation=True,
                           max_length=model.config.max_text_len, return_tensors="pt").to(model.device)
        outputs = model(**inputs)
        results = processor.post_process_grounded_object_detection(
            outputs, inputs.input_ids, threshold=box_threshold, text_threshold=text_threshold,
            target_sizes=[(image.height, image.width) for image in group])
        for index, result, image in zip(members, results, group):
            found[index] = best_box(result, image.width, image.height)
    return found


def propose_boxes(source: Path, output: Path, detector: str = DEFAULT_DETECTOR, phrase: str = "question",
                  box_threshold: float = DEFAULT_BOX_THRESHOLD, text_threshold: float = DEFAULT_TEXT_THRESHOLD,
                  no_box: str = "keep", batch_size: int = 8, device: str | None = None,
                  shard: tuple[int, int] = (0, 1), media_dir: Path | None = None,
                  contact_sheet: int = 16) -> ProposalRun:
    """Propose a box for every row of ``source`` in ``shard`` not yet done in ``output`` (module
    docstring: the files), then write the report. Bad rows are recorded and skipped, not fatal."""
    source, output = Path(source), Path(output)
    if phrase not in PHRASE_SOURCES:
        raise VPTDataError(f"phrase {phrase!r} is not one of {PHRASE_SOURCES}")
    if no_box not in NO_BOX_MODES:
        raise VPTDataError(f"no_box {no_box!r} is not one of {NO_BOX_MODES}")
    if output.suffix != ".jsonl":
        raise VPTDataError(f"--output {output}: give a .jsonl file (rows are appended one per line as they are done)")
    if output.resolve() == source.resolve():
        raise VPTDataError(f"--output {output} is the input file; give another file")
    rows = read_rows(source)
    media_dir = str(media_dir or source.resolve().parent)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shard_index, shard_count = shard
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise VPTDataError(f"shard {shard_index}/{shard_count}: need n >= 1 and 0 <= i < n")
    shard_rows = range(shard_index, len(rows), shard_count)
    output.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(output)

    written, skipped = read_done(output), read_done(sidecar)
    done = set()
    for path, records in ((output, written), (sidecar, skipped)):
        for record in records:
            index = record["source_index"]
            if index not in shard_rows:
                raise VPTDataError(f"{path} holds row {index}, which is not a row of shard {shard_index}/{shard_count} "
                                   f"of {source} ({len(rows)} rows): give each shard and input its own --output")
            done.add(index)
    pending = [index for index in shard_rows if index not in done]
    settings = {"detector": detector, "device": device, "phrase": phrase, "box_threshold": box_threshold,
                "text_threshold": text_threshold, "no_box": no_box, "batch_size": batch_size, "media_dir": media_dir}
    if done:
        print(f"{output}: {len(done)} rows already done, {len(pending)} to do (delete {output.name} and "
              f"{sidecar.name} to start over)")

    model, processor = load_detector(detector, device) if pending else (None, None)
    with output.open("a", encoding="utf-8") as out_file, sidecar.open("a", encoding="utf-8") as sidecar_file, \
            tqdm(total=len(pending), desc="propose", unit="row") as progress:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            good, problems = {}, {}
            for index in batch:
                try:
                    good[index] = checked_row(rows[index], phrase, media_dir)
                except VPTDataError as error:
                    problems[index] = str(error)
                    progress.write(f"row {index}: {error}")
            images, texts = [image for image, _ in good.values()], [text for _, text in good.values()]
            found = dict(zip(good, detect(model, processor, images, texts, box_threshold, text_threshold) if good else []))
            for index in batch:
                if index in problems:
                    file, record = sidecar_file, {"source_index": index, "status": STATUS_BAD, "reason": problems[index]}
                elif found[index] is None and no_box == "drop":
                    file, record = sidecar_file, {"source_index": index, "status": STATUS_NO_BOX}
                else:
                    file, record = out_file, {**rows[index], "source_index": index, **(found[index] or {})}
                file.write(json.dumps(record) + "\n")
                (written if file is out_file else skipped).append(record)
            out_file.flush()
            sidecar_file.flush()
            progress.update(len(batch))

    run = ProposalRun(
        source=source, output=output, rows_in=len(rows), shard=shard, shard_rows=len(shard_rows),
        done_before=len(done), done_this_run=len(pending),
        proposals=sorted((record for record in written if "box" in record), key=lambda record: record["source_index"]),
        no_box=sum("box" not in record for record in written) + sum(r["status"] == STATUS_NO_BOX for r in skipped),
        bad_rows={r["source_index"]: r["reason"] for r in sorted(skipped, key=lambda r: r["source_index"])
                  if r["status"] == STATUS_BAD},
        settings=settings,
    )
    write_report(run, contact_sheet)
    return run


def write_report(run: ProposalRun, contact_sheet: int) -> None:
    """``report.md``, ``scores.png`` and (with any boxes) ``contact_sheet.png`` in ``run.report_dir``."""
    folder = run.report_dir
    folder.mkdir(parents=True, exist_ok=True)
    plot_scores([row["box_score"] for row in run.proposals], folder / "scores.png")
    drawn = run.proposals[:contact_sheet]
    if drawn:
        draw_contact_sheet(drawn, run.settings["media_dir"]).save(folder / "contact_sheet.png")
    settings = run.settings
    no_box_where = (f"kept in {run.output.name} without a box" if settings["no_box"] == "keep"
                    else f"dropped, listed in {sidecar_path(run.output).name}")
    lines = [
        f"# Box proposals: {run.output.name}",
        "",
        f"- input: `{run.source}`, {run.rows_in} rows; shard {run.shard[0]}/{run.shard[1]}: {run.shard_rows} rows",
        f"- rows done before this run: {run.done_before}; done this run: {run.done_this_run}",
        f"- boxes proposed: {len(run.proposals)}",
        f"- rows without a box: {run.no_box} ({no_box_where})",
        f"- bad rows: {len(run.bad_rows)} (skipped, listed in {sidecar_path(run.output).name})",
        "",
        "This run's settings (rows done before were done with the settings of their run):",
        (f"detector `{settings['detector']}` on {settings['device']}, text from the {settings['phrase']}, "
         f"box threshold {settings['box_threshold']}, text threshold {settings['text_threshold']}, "
         f"batch size {settings['batch_size']}, images under `{settings['media_dir']}`."),
        "",
    ]
    if run.bad_rows:
        lines += ["## Bad rows", ""] + [f"- row {index}: {reason}" for index, reason in run.bad_rows.items()] + [""]
    lines += ["## Scores of the proposed boxes", "", "![box scores](scores.png)", "", "## Contact sheet", ""]
    lines += ([f"The first {len(drawn)} proposals (row, score, the words the box matched):", "",
               "![contact sheet](contact_sheet.png)"] if drawn else ["No proposals to draw."])
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot_scores(scores: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.hist(scores, bins=20, range=(0, 1))
    axes.set_xlabel("box score")
    axes.set_ylabel("rows")
    axes.set_title(f"{len(scores)} proposed boxes")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_contact_sheet(proposals: list[dict], media_dir: str) -> Image.Image:
    """The proposals drawn on their images (the box; row, score and phrase below), in a square-ish grid."""
    columns = math.ceil(math.sqrt(len(proposals)))
    cell_height = SHEET_CELL + SHEET_CAPTION
    sheet = Image.new("RGB", (columns * SHEET_CELL, math.ceil(len(proposals) / columns) * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for number, row in enumerate(proposals):
        left, top = (number % columns) * SHEET_CELL, (number // columns) * cell_height
        with Image.open(resolve_media(row["image"], media_dir)) as image:
            scale = SHEET_CELL / max(image.size)
            thumbnail = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        sheet.paste(thumbnail, (left, top))
        x0, y0, x1, y1 = (round(v * scale) for v in row["box"])
        # Red lined with black outside (PIL draws the width inwards), to stand out on any colour.
        draw.rectangle([left + x0, top + y0, left + x1, top + y1], outline="red", width=5)
        draw.rectangle([left + x0, top + y0, left + x1, top + y1], outline="black", width=2)
        draw.text((left + 4, top + SHEET_CELL + 2), f"row {row['source_index']}  score {row['box_score']:.3f}", fill="black")
        draw.text((left + 4, top + SHEET_CELL + 15), row["box_phrase"][:40], fill="black")
    return sheet


def _data_propose(args) -> None:
    run = propose_boxes(args.source, args.output, args.detector, args.phrase, args.box_threshold, args.text_threshold,
                        args.no_box, args.batch_size, args.device, args.shard, args.media_dir, args.contact_sheet)
    print(f"{run.output}: {run.done_this_run} rows done this run, {run.done_before} before; {len(run.proposals)} boxes, "
          f"{run.no_box} rows without a box, {len(run.bad_rows)} bad rows (in {sidecar_path(run.output).name})")
    print(f"report: {run.report_dir / 'report.md'}")


def add_propose_parser(data_subparsers) -> argparse.ArgumentParser:
    """Add ``propose`` to the ``vpt data`` subcommands (``data_subparsers``: their add_subparsers object)."""
    propose = data_subparsers.add_parser(
        "propose", help="VQA rows without boxes -> rows with a box proposed by Grounding DINO (for vpt data convert)")
    propose.add_argument("source", type=Path, help="JSON list or JSONL of {image, question, answer}")
    propose.add_argument("--output", type=Path, required=True,
                         help="JSONL to append rows with boxes to (a rerun resumes it); beside it OUT.skipped.jsonl "
                              "(bad and dropped rows) and OUT.report/")
    propose.add_argument("--detector", default=DEFAULT_DETECTOR,
                         help=f"Grounding DINO: hub id or local folder (default {DEFAULT_DETECTOR})")
    propose.add_argument("--phrase", choices=PHRASE_SOURCES, default="question",
                         help="what the detector looks for: the question, the answer or both (default question)")
    propose.add_argument("--box-threshold", type=float, default=DEFAULT_BOX_THRESHOLD,
                         help=f"keep boxes scoring above this (default {DEFAULT_BOX_THRESHOLD})")
    propose.add_argument("--text-threshold", type=float, default=DEFAULT_TEXT_THRESHOLD,
                         help=f"a box must match a word above this (default {DEFAULT_TEXT_THRESHOLD})")
    propose.add_argument("--no-box", choices=NO_BOX_MODES, default="keep",
                         help="rows without a box: keep them in OUT without a box key (vpt data convert makes plain "
                              "rows of them), or drop them (default keep)")
    propose.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per detector call (default 8)")
    propose.add_argument("--device", help="e.g. cuda, cpu (default: cuda if there is one)")
    propose.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                         help="do only the rows whose index %% N == I (N processes, each with its own --output)")
    propose.add_argument("--media-dir", type=Path, help="folder image paths are relative to (default: the input file's)")
    propose.add_argument("--contact-sheet", type=int_at_least(0), default=16, metavar="N",
                         help="draw the first N proposals on their images in the report (default 16)")
    propose.set_defaults(run=_data_propose)
    return propose
