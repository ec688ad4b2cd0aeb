"""``python evaluation/evaluation.py``: the VPT evaluation, as the paper reports it.

For every model (and, with ``compare_no_perception``, the same model forced to answer
without Visual Perception Tokens) and every dataset: answer each test question with the
one-call loop, in batches; score it offline (exact match / VQA accuracy / ANLS / relaxed
match) and, when a judge is configured, with the paper's LLM judge. Writes under
``output_dir``:
- ``<model>/<variant>/<dataset>/predictions.jsonl``: question, answer, reference, trace;
- ``.../judge.jsonl``: the judge's score or why the answer is unscored;
- ``.../scores.json``: the score, how often the model asked for a second look and, on rows whose
  reference first turn names a region, how often its region was that cell (and, when the row gives
  the object's ``box``, how often its crop held the whole object); for a continuous region
  (``<|perception_box|>``), the IoU of its decoded box with the reference box. On rows whose answer
  is a box (grounding, PerceptionGPT's REC), the score is REC accuracy (IoU > 0.5), with the mean
  IoU beside it and the centre-box baseline (a box of the split's mean reference size, centred);
  where the dataset_info.json entry maps a ``masks`` column and the model has a mask decoder, the
  answer masks' cIoU (total intersection over total union) and gIoU (mean per-answer IoU);
- ``summary.md``, ``summary.csv`` (one column per dataset plus the average, as the paper's
  tables; ``summary.md`` also tabulates the second looks) and ``summary.png`` (a bar chart).

``benchmarks`` (``benchmarks.py``: V* Bench, HR-Bench 4K/8K, MME-RealWorld) are multiple-choice:
scored by the option the answer names, per benchmark and per category, with every setting that
changes a score in ``scores.json`` (``settings``) and ``summary.md``, and the published figures
of ``anchors`` printed and charted beside the models'.
Everything is appended item by item, so an interrupted run resumes where it stopped and
finishes with the same results.
"""

import argparse
import csv
import json
import logging
import os
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..box_heads import paired_iou, runs_to_mask
from ..dataset import BOXES, MASKS, VPTDataError, load_mask, open_image, split_crop
from ..vocabulary import BOX_TOKEN, REENCODING_PROMPT, REGION_PROMPT, REGION_START, grid_box, grid_indices_in_text
from .benchmarks import PROMPTS, get_benchmark, image_cache_for, load_items, multiple_choice_scores
from .judge import JudgeConfig, judge_answers, summarize
from .metrics import default_metric, score

logger = logging.getLogger(__name__)

VARIANTS = {"vpt": True, "no_vpt": False}  # variant name -> allow_perception
# What ``perception_prompt`` appends to a benchmark question: the published VPT instructions.
PERCEPTION_PROMPTS = {"none": None, "region": REGION_PROMPT, "reencoding": REENCODING_PROMPT}
# Text the released test splits add to the reference answer (the published evaluation strips it).
REFERENCE_PREFIX = "Now answer the question.\n"


def load_settings(args, repo: Path) -> dict:
    """The YAML config (paths in it relative to the repository root ``repo``), overridden by flags."""
    settings = {}
    if args.config:
        settings = yaml.safe_load(Path(args.config).read_text()) or {}
        for key in ("output_dir", "dataset_dir", "benchmark_dir"):
            if key in settings:
                settings[key] = str(_from_repo(settings[key], repo))
        settings["models"] = {name: str(_from_repo(path, repo)) for name, path in (settings.get("models") or {}).items()}
    if args.model:
        settings["models"] = {}  # the command line's models replace the config's
    for option in args.model or []:
        name, _, path = option.partition("=")
        if not path:
            raise SystemExit(f"--model takes NAME=PATH, got {option!r}")
        settings["models"][name] = path
    if args.dataset:
        settings["datasets"] = args.dataset
    if args.benchmark:
        settings["benchmarks"] = args.benchmark
    for key in ("output_dir", "limit", "batch_size", "device", "image_max_pixels", "benchmark_dir"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.compare_no_perception:
        settings["compare_no_perception"] = True
    if args.retry_unscored:
        settings["retry_unscored"] = True
    if args.max_new_tokens is not None:
        settings["generation"] = {**(settings.get("generation") or {}), "max_new_tokens": args.max_new_tokens}
    settings.setdefault("dataset_dir", str(repo / "data"))
    settings.setdefault("output_dir", "outputs/evaluation")
    settings.setdefault("batch_size", 8)
    settings.setdefault("image_max_pixels", 512 * 512)
    missing = [key for key in ("models",) if not settings.get(key)]
    if not settings.get("datasets") and not settings.get("benchmarks"):
        missing.append("datasets or benchmarks")
    if missing:
        raise SystemExit(f"evaluation: no {' and no '.join(missing)} (give --config or --model/--dataset)")
    if settings.get("perception_prompt", "none") not in PERCEPTION_PROMPTS:
        raise SystemExit(f"evaluation: perception_prompt {settings['perception_prompt']!r} is not one of "
                         f"{sorted(PERCEPTION_PROMPTS)}")
    for name in settings.get("benchmarks") or []:
        get_benchmark(name)  # an unknown name fails before any model loads
    for anchor in settings.get("anchors") or []:
        for key in ("system", "source", "scores"):
            if key not in anchor:
                raise SystemExit(f"evaluation: an anchor lacks {key!r}: {anchor}")
        for name in anchor["scores"]:
            get_benchmark(name)
    return settings


def _from_repo(path: str, repo: Path) -> Path:
    return Path(path) if Path(path).is_absolute() else repo / path


def dataset_entry(name: str, dataset_dir: Path) -> tuple[Path, str, str | None]:
    """The file of a dataset, its boxes' units (``box_units`` of its dataset_info.json entry) and
    the column its entry maps as ``masks`` (None: no masks)."""
    if Path(name).suffix in (".json", ".jsonl"):
        return (Path(name) if Path(name).is_file() else dataset_dir / name), "normalized", None
    info = json.loads((dataset_dir / "dataset_info.json").read_text())
    if name not in info:
        raise SystemExit(f"dataset {name!r} is neither a file nor a name in {dataset_dir / 'dataset_info.json'}")
    entry = info[name]
    return dataset_dir / entry["file_name"], entry.get("box_units", "normalized"), entry.get("columns", {}).get(MASKS)


def read_items(path: Path, dataset_dir: Path, limit: int | None, box_units: str = "normalized",
               mask_column: str | None = None) -> list[dict]:
    """Test questions of a released-format file: first user turn, its first image, final answer.

    Rows with a ``boxes`` column also give the reference box of a continuous region (the first
    assistant turn's) and of a box answer (the final answer's), normalised with ``box_units``;
    with ``mask_column``, the box answer's mask files (``reference_masks``)."""
    if not path.is_file():
        raise SystemExit(f"dataset file {path} not found (released splits: see configs/README.md for the download)")
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    items = []
    for index, row in enumerate(rows[:limit] if limit else rows):
        messages = row.get("messages") or []
        if len(messages) < 2 or messages[0].get("role") != "user":
            raise VPTDataError(f"{path}, row {index}: messages: needs a user question and a final answer")
        images = row.get("images") or []
        image = None
        if images:
            file, _ = split_crop(images[0])
            image = str(dataset_dir / images[0]) if (dataset_dir / file).is_file() else images[0]
        reference = messages[-1]["content"].replace(REFERENCE_PREFIX, "")
        item = {"index": index, "question": messages[0]["content"], "image": image, "reference": reference}
        if len(messages) >= 4 and messages[1].get("role") == "assistant":
            xs, ys = grid_indices_in_text(messages[1]["content"])
            if xs and ys:
                item["reference_region"] = list(grid_box(xs, ys))
        if row.get("box"):
            item["box"] = list(row["box"])
        if row.get(BOXES):
            item.update(_reference_boxes(row, messages, image, box_units, f"{path}, row {index}"))
        if mask_column and row.get(mask_column) and "reference_boxes" in item:
            masks = row[mask_column][len(row[mask_column]) - len(item["reference_boxes"]) :]
            item["reference_masks"] = [None if m is None else str(dataset_dir / m) if (dataset_dir / m).is_file() else m
                                       for m in masks]
        items.append(item)
    return items


def _reference_boxes(row, messages, image, box_units, where) -> dict:
    boxes = [list(map(float, box)) for box in row[BOXES]]
    if box_units == "normalized" and any(v > 1 for box in boxes for v in box):
        raise VPTDataError(f"{where}: {BOXES}: {boxes} are not normalised; give the dataset by its dataset_info.json "
                           "name, whose entry says \"box_units\": \"pixels\"")
    if box_units == "pixels":
        if image is None:
            raise VPTDataError(f"{where}: {BOXES}: pixel boxes need the row's image")
        width, height = open_image(image).size
        boxes = [[x0 / width, y0 / height, x1 / width, y1 / height] for x0, y0, x1, y1 in boxes]
    found = {}
    asked = messages[0]["content"].count(BOX_TOKEN)
    if asked:
        found["question_boxes"] = boxes[:asked]  # the question's box tokens take them as input
    first, answer = messages[1]["content"] if len(messages) >= 4 else "", messages[-1]["content"]
    if REGION_START + BOX_TOKEN in first:
        found["reference_region_box"] = boxes[sum(m["content"].count(BOX_TOKEN) for m in messages[:1])]
    if BOX_TOKEN in answer:
        found["reference_boxes"] = boxes[len(boxes) - answer.count(BOX_TOKEN) :]
    return found


def read_jsonl(path: Path) -> dict[int, dict]:
    """Lines already written, by item index; a line cut short by an interruption is dropped."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["index"]] = record
    return done


def append_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()


def _rewrite_complete(path: Path, done: dict) -> None:
    """One line per item (a line cut short by an interruption, or superseded, dropped), replaced
    atomically so a kill while rewriting loses nothing."""
    if path.is_file():
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()), encoding="utf-8")
        os.replace(partial, path)


def predict(model, processor, items, out: Path, settings: dict, allow_perception: bool, desc: str) -> list[dict]:
    from ..inference import answer_questions

    done = read_jsonl(out)
    _rewrite_complete(out, done)
    todo = [item for item in items if item["index"] not in done]
    size = settings["batch_size"]
    generation = settings.get("generation") or {}
    for start in tqdm(range(0, len(todo), size), desc=desc, unit="batch"):
        chunk = todo[start : start + size]
        questions = [(i["image"], i["question"], i.get("question_boxes")) for i in chunk]
        answers = answer_questions(model, processor, questions, batch_size=size,
                                   allow_perception=allow_perception, image_max_pixels=settings["image_max_pixels"],
                                   **generation)
        records = [{**item, "answer": answer.text, "trace": answer.trace} for item, answer in zip(chunk, answers)]
        append_jsonl(out, records)
        done.update((r["index"], r) for r in records)
    return [done[item["index"]] for item in items]


def judge(predictions: list[dict], out: Path, config: JudgeConfig, retry_unscored: bool = False) -> list[dict]:
    """The judge's verdict on each prediction, appended to ``out`` as it arrives: a re-run asks only
    what has no line yet, and with ``retry_unscored`` the answers the judge could not score; the
    file is left with one line per answer."""
    done = read_jsonl(out)
    _rewrite_complete(out, done)
    todo = [p for p in predictions if p["index"] not in done or (retry_unscored and done[p["index"]]["score"] is None)]
    retried = any(p["index"] in done for p in todo)

    def write(position: int, result) -> None:
        record = {"index": todo[position]["index"], "score": result.score, "error": result.error,
                  "attempts": result.attempts}
        append_jsonl(out, [record])
        done[record["index"]] = record

    judge_answers([{k: p[k] for k in ("question", "answer", "reference")} for p in todo], config, on_result=write)
    if retried:
        _rewrite_complete(out, done)  # each retried answer left its earlier line behind
    return [done[p["index"]] for p in predictions]


def evaluate(settings: dict) -> dict:
    """Run every model, variant and dataset; returns ``{row label: {dataset: scores.json's content}}``."""
    from ..inference import load_vpt_model

    output_dir = Path(settings["output_dir"])
    dataset_dir = Path(settings["dataset_dir"])
    judge_config = JudgeConfig.from_settings(settings["judge"]) if settings.get("judge") else None
    variants = VARIANTS if settings.get("compare_no_perception") else {"vpt": True}
    benchmark_items = {name: benchmark_questions(name, settings) for name in settings.get("benchmarks") or []}
    table = {}
    for model_name, model_path in settings["models"].items():
        model, processor = load_vpt_model(model_path, device=settings.get("device"))
        for variant, allow_perception in variants.items():
            label = model_name if variant == "vpt" else f"{model_name} (no VPT)"
            table[label] = {}
            for name, (items, path) in benchmark_items.items():
                out = output_dir / model_name / variant / name
                out.mkdir(parents=True, exist_ok=True)
                answer_settings = run_settings(settings, name, path, allow_perception, model)
                check_resumed_settings(out, answer_settings)
                predictions = predict(model, processor, items, out / "predictions.jsonl", settings, allow_perception,
                                      f"{label} / {name}")
                scores = {"items": len(predictions), **multiple_choice_scores(predictions, get_benchmark(name).format),
                          "perceived": sum(bool(p["trace"]["rounds"]) for p in predictions),
                          "malformed": sum(bool(p["trace"]["problem"]) for p in predictions),
                          "settings": answer_settings}
                (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
                table[label][name] = scores
            for dataset in settings.get("datasets") or []:
                name = Path(dataset).stem
                out = output_dir / model_name / variant / name
                out.mkdir(parents=True, exist_ok=True)
                file, box_units, mask_column = dataset_entry(dataset, dataset_dir)
                items = read_items(file, dataset_dir, settings.get("limit"), box_units,
                                   mask_column if model.config.mask_decoder else None)
                predictions = predict(model, processor, items, out / "predictions.jsonl", settings, allow_perception,
                                      f"{label} / {name}")
                scores = score_predictions(predictions, name, settings, judge_config, out)
                (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
                table[label][name] = scores
    write_summary(table, output_dir, "judge_mean" if judge_config else "metric_mean", settings.get("anchors"))
    return table


def benchmark_questions(name: str, settings: dict) -> tuple[list[dict], Path]:
    """A benchmark's items (with the ``perception_prompt`` appended) and the question file they come from."""
    benchmark = get_benchmark(name)
    local = Path(settings["benchmark_dir"]) / benchmark.hub_id.split("/")[1] if settings.get("benchmark_dir") else None
    path = benchmark.locate(local)
    items = load_items(benchmark, path, image_cache_for(Path(settings["output_dir"]), benchmark, path), settings.get("limit"))
    instruction = PERCEPTION_PROMPTS[settings.get("perception_prompt", "none")]
    if instruction:
        items = [{**item, "question": f"{item['question']}\n{instruction}"} for item in items]
    return items, path


def run_settings(settings: dict, benchmark: str, path: Path, allow_perception: bool, model) -> dict:
    """Every setting that changes a benchmark score, as ``scores.json`` and the summary record it."""
    from ..inference import DEFAULT_GENERATION

    generation = {**DEFAULT_GENERATION, **(settings.get("generation") or {})}
    instruction = PERCEPTION_PROMPTS[settings.get("perception_prompt", "none")]
    return {
        "image_max_pixels": settings["image_max_pixels"],
        "crops_from": CROPS_FROM,
        "max_new_tokens": generation.pop("max_new_tokens"),
        "max_perception_rounds": generation.pop("max_perception_rounds"),
        "perception": "allowed" if allow_perception else "suppressed",
        "perception_prompt": settings.get("perception_prompt", "none"),
        "prompt": PROMPTS[get_benchmark(benchmark).format] + (f"\n{instruction}" if instruction else ""),
        "sampling": generation,
        "questions": str(path),
        "limit": settings.get("limit"),
        "batch_size": settings["batch_size"],
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
    }


# Where a second look's pixels come from (generation.PerceptionInputs, inference.answer_questions).
CROPS_FROM = ("cut from the full-resolution original, each crop then shown within image_max_pixels; branch encoders "
              "read the original at their own resolution")

# Settings whose change makes earlier predictions another run's (device, batch size and the limit do not).
ANSWER_SETTINGS = ("image_max_pixels", "max_new_tokens", "max_perception_rounds", "perception", "perception_prompt",
                   "prompt", "sampling", "questions", "dtype")


def check_resumed_settings(out: Path, found: dict) -> None:
    """Record the answer settings beside the predictions; refuse to resume predictions made with others."""
    path = out / "settings.json"
    wanted = {key: found[key] for key in ANSWER_SETTINGS}
    if path.is_file() and (out / "predictions.jsonl").is_file():
        earlier = json.loads(path.read_text())
        changed = [key for key in ANSWER_SETTINGS if earlier.get(key) != wanted[key]]
        if changed:
            details = ", ".join(f"{key} {earlier.get(key)!r} -> {wanted[key]!r}" for key in changed)
            raise SystemExit(f"evaluation: {out / 'predictions.jsonl'} was answered with other settings ({details}); "
                             "give another output_dir, or delete that folder to answer again")
    path.write_text(json.dumps(wanted, indent=1) + "\n")


def score_predictions(predictions, dataset_name, settings, judge_config, out: Path) -> dict:
    metric = settings.get("metric") or default_metric(dataset_name)
    per_item = [score(metric, p["answer"], p["reference"]) for p in predictions]
    scores = {
        "items": len(predictions),
        "metric": metric,
        "metric_mean": sum(per_item) / len(per_item) if per_item else None,
        "perceived": sum(bool(p["trace"]["rounds"]) for p in predictions),
        "malformed": sum(bool(p["trace"]["problem"]) for p in predictions),
        **region_scores(predictions),
        **continuous_region_scores(predictions),
        **grounding_scores(predictions),
        **mask_scores(predictions),
    }
    if predictions and scores.get("grounding_items") == len(predictions):
        # Every answer is a box: the score is REC accuracy, as PerceptionGPT reports it.
        scores.update(metric="rec_accuracy", metric_mean=scores["grounding_hits"] / len(predictions))
    if judge_config:
        from .judge import JudgeResult

        judged = judge(predictions, out / "judge.jsonl", judge_config, bool(settings.get("retry_unscored")))
        summary = summarize([JudgeResult(j["score"], None, j["error"], j["attempts"]) for j in judged])
        scores.update(judge_mean=summary["mean_score"], judge_scored=summary["scored"],
                      judge_unscored=summary["unscored"], judge_errors=summary["errors"])
    return scores


def region_scores(predictions: list[dict]) -> dict:
    """Second looks at a region, on rows whose reference names one: the model's first region is the
    reference cell (``region_cell_hits``); its crop holds the whole object box (``region_object_hits``)."""
    with_region = [p for p in predictions if p.get("reference_region")]
    if not with_region:
        return {}
    cell_hits = object_hits = with_box = 0
    for p in with_region:
        chosen = next((r for r in p["trace"]["rounds"] if r.get("grid_boxes")), None)
        chosen_box = chosen["grid_boxes"][0] if chosen else None
        cell_hits += chosen_box == p["reference_region"]
        with_box += bool(p.get("box"))
        object_hits += _crop_holds_object(chosen, p)
    scores = {"region_items": len(with_region), "region_cell_hits": cell_hits}
    if with_box:
        scores.update(region_object_items=with_box, region_object_hits=object_hits)
    return scores


def _crop_holds_object(chosen_round: dict | None, prediction: dict) -> bool:
    """Whether the first crop of a region round holds the row's whole object ``box`` (pixels)."""
    if chosen_round is None or not prediction.get("box"):
        return False
    left, top, right, bottom = chosen_round["pixel_boxes"][0]
    x0, y0, x1, y1 = prediction["box"]
    return left <= x0 and top <= y0 and x1 <= right and y1 <= bottom


def continuous_region_scores(predictions: list[dict]) -> dict:
    """Continuous regions, on rows whose reference first turn is one: mean IoU of the model's first
    decoded region box with the reference box, and how often it is above 0.5 (no region: IoU 0);
    how often the crop held the whole object box."""
    with_region = [p for p in predictions if p.get("reference_region_box")]
    if not with_region:
        return {}
    ious, object_hits, with_box = [], 0, 0
    for p in with_region:
        chosen = next((r for r in p["trace"]["rounds"] if r.get("boxes")), None)
        ious.append(_iou(chosen["boxes"][0], p["reference_region_box"]) if chosen else 0.0)
        with_box += bool(p.get("box"))
        object_hits += _crop_holds_object(chosen, p)
    found = {"region_box_items": len(with_region), "region_box_iou_mean": sum(ious) / len(ious),
             "region_box_hits": sum(iou > 0.5 for iou in ious)}
    if with_box:
        found.update(region_box_object_items=with_box, region_box_object_hits=object_hits)
    return found


def grounding_scores(predictions: list[dict]) -> dict:
    """Box answers (REC): the answer's first decoded box against the reference's first box.

    ``grounding_hits``: IoU > 0.5 (no box written: a miss); ``grounding_iou_mean``; and the same
    for the centre-box baseline, a box of the split's mean reference width and height centred in the image."""
    with_boxes = [p for p in predictions if p.get("reference_boxes")]
    if not with_boxes:
        return {}
    references = [p["reference_boxes"][0] for p in with_boxes]
    ious = [_iou(p["trace"]["answer_boxes"][0], ref) if p["trace"].get("answer_boxes") else 0.0
            for p, ref in zip(with_boxes, references)]
    width = sum(x1 - x0 for x0, _, x1, _ in references) / len(references)
    height = sum(y1 - y0 for _, y0, _, y1 in references) / len(references)
    centre = [0.5 - width / 2, 0.5 - height / 2, 0.5 + width / 2, 0.5 + height / 2]
    centre_ious = [_iou(centre, ref) for ref in references]
    return {
        "grounding_items": len(with_boxes),
        "grounding_hits": sum(iou > 0.5 for iou in ious),
        "grounding_iou_mean": sum(ious) / len(ious),
        "centre_box_hits": sum(iou > 0.5 for iou in centre_ious),
        "centre_box_iou_mean": sum(centre_ious) / len(centre_ious),
    }


def mask_scores(predictions: list[dict]) -> dict:
    """Answer masks against the reference masks (rows whose first answer box has one): ``mask_ciou``,
    total intersection over total union; ``mask_giou``, the mean per-answer IoU (no mask written:
    IoU 0)."""
    with_masks = [p for p in predictions if p.get("reference_masks") and p["reference_masks"][0]]
    if not with_masks:
        return {}
    intersections, unions = [], []
    for p in with_masks:
        reference = load_mask(p["reference_masks"][0])
        written = p["trace"].get("answer_masks")
        predicted = runs_to_mask(written[0]) if written else torch.zeros_like(reference)
        if predicted.shape != reference.shape:
            raise VPTDataError(f"row {p['index']}: the answer mask is {tuple(predicted.shape)} but the reference "
                               f"{p['reference_masks'][0]} is {tuple(reference.shape)}")
        intersections.append(int((predicted & reference).sum()))
        unions.append(int((predicted | reference).sum()))
    ious = [i / u if u else 1.0 for i, u in zip(intersections, unions)]
    return {"mask_items": len(with_masks), "mask_ciou": sum(intersections) / max(sum(unions), 1),
            "mask_giou": sum(ious) / len(ious)}


def _iou(box, reference) -> float:
    return float(paired_iou(torch.tensor([box], dtype=torch.float64), torch.tensor([reference], dtype=torch.float64))[0])


SCORE_NAMES = {"judge_mean": "LLM judge", "metric_mean": "offline metric"}


def write_summary(table: dict, output_dir: Path, score_key: str, anchors: list[dict] | None = None) -> None:
    """The paper's layout: one row per model, one column per dataset (and per category of a benchmark
    that has them), then the average over datasets; the published ``anchors`` below them; then the
    settings the benchmark scores were made with, and how often each model asked for a second look."""
    what = SCORE_NAMES[score_key]
    datasets = list(dict.fromkeys(d for row in table.values() for d in row))
    columns = []  # (header, dataset, category or None)
    for dataset in datasets:
        columns.append((dataset, dataset, None))
        categories = dict.fromkeys(c for row in table.values() for c in row.get(dataset, {}).get("categories", {}))
        columns += [(f"{dataset} {category}", dataset, category) for category in categories]
    rows = []
    for label, scores in table.items():
        values = [_cell(scores.get(dataset), category, score_key) for _, dataset, category in columns]
        known = [scores[d][score_key] for d in datasets if d in scores and scores[d][score_key] is not None]
        rows.append([label, *values, sum(known) / len(known) if known else None])
    for anchor in anchors or []:
        published = {name: value / 100 for name, value in anchor["scores"].items()}
        rows.append([f"{anchor['system']} (published)",
                     *(published.get(dataset) if category is None else None for _, dataset, category in columns), None])
    header = ["model", *(name for name, _, _ in columns), "Average"]
    show = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([row[0], *map(show, row[1:])]) + " |" for row in rows]
    markdown = (f"Scores ({what}, x100)\n\n" + "\n".join(lines) + "\n\n" + anchors_table(anchors)
                + anchors_not_shown(anchors, datasets)
                + settings_table(table) + judge_coverage_table(table) + looks_table(table))
    (output_dir / "summary.md").write_text(markdown)
    with open(output_dir / "summary.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows([[row[0], *("" if v is None else f"{v:.6f}" for v in row[1:])] for row in rows])
    _bar_chart(rows, header, output_dir / "summary.png", what)
    print(markdown)


def _cell(scores: dict | None, category: str | None, score_key: str):
    if scores is None:
        return None
    return scores[score_key] if category is None else scores.get("categories", {}).get(category)


def anchors_table(anchors: list[dict] | None) -> str:
    """Markdown: where each published figure comes from (empty without anchors)."""
    if not anchors:
        return ""
    lines = ["Published figures (rows marked \"published\"), as their sources report them; settings differ "
             "between evaluations, which is why this run's are listed below.", "", "| system | source |", "|---|---|"]
    lines += [f"| {anchor['system']} | {anchor['source']} |" for anchor in anchors]
    return "\n".join(lines) + "\n\n"


def anchors_not_shown(anchors: list[dict] | None, datasets: list[str]) -> str:
    """Markdown: the published figures of benchmarks this run did not answer (so the table has no column)."""
    hidden = [f"{anchor['system']}: " + ", ".join(f"{name} {value}" for name, value in anchor["scores"].items()
                                                   if name not in datasets)
              for anchor in anchors or [] if set(anchor["scores"]) - set(datasets)]
    if not hidden:
        return ""
    return ("Published figures of benchmarks not in this run (x100; e.g. the full MME-RealWorld beside a Lite run, "
            "which are not the same questions): " + "; ".join(hidden) + ".\n\n")


def settings_table(table: dict) -> str:
    """Markdown: the settings each benchmark score was made with (empty without benchmarks)."""
    lines = []
    for label, per_dataset in table.items():
        for dataset, scores in per_dataset.items():
            found = scores.get("settings")
            if found is None:
                continue
            prompt = found["prompt"].replace("\n", "⏎").replace("|", "\\|")
            lines.append(f"| {label} | {dataset} | {found['image_max_pixels']} | {found['max_new_tokens']} | "
                         f"{found['perception']} | {found['perception_prompt']} | {found['max_perception_rounds']} | "
                         f"{found['dtype']} | {prompt} |")
    if not lines:
        return ""
    header = [f"Settings of the benchmark scores (image_max_pixels: the pixel budget of the image shown to the model; "
              f"crops are {CROPS_FROM})", "",
              "| model | benchmark | image_max_pixels | max_new_tokens | perception | perception prompt | "
              "perception rounds | dtype | prompt (⏎: new line) |", "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(header + lines) + "\n\n"


def judge_coverage_table(table: dict) -> str:
    """Markdown: per model and dataset, how many answers the judge mean covers and why the rest are
    unscored (empty without a judge)."""
    lines = []
    for label, per_dataset in table.items():
        for dataset, scores in per_dataset.items():
            if "judge_scored" not in scores:
                continue
            why = ", ".join(f"{kind}: {count}" for kind, count in scores["judge_errors"].items()) or "-"
            mean = "n/a" if scores["judge_mean"] is None else f"{100 * scores['judge_mean']:.1f}"
            lines.append(f"| {label} | {dataset} | {mean} | {scores['judge_scored']} of {scores['items']} | {why} |")
    if not lines:
        return ""
    header = ["Judge coverage (the mean is over scored answers only)", "",
              "| model | dataset | judge mean | answers scored | unscored, by reason |", "|---|---|---|---|---|"]
    return "\n".join(header + lines) + "\n\n"


def looks_table(table: dict) -> str:
    """Markdown: per model and dataset, the share of answers after a second look and, where the
    reference names a region, the share whose region was that cell (and whose crop held the object)."""
    percent = lambda hits, count: f"{100 * hits / count:.0f}% ({hits}/{count})" if count else "-"  # noqa: E731
    lines = ["Second looks", "", "| model | dataset | asked for a look | region = reference cell | crop holds the object |",
             "|---|---|---|---|---|"]
    for label, per_dataset in table.items():
        for dataset, scores in per_dataset.items():
            lines.append(f"| {label} | {dataset} | {percent(scores['perceived'], scores['items'])} | "
                         f"{percent(scores.get('region_cell_hits', 0), scores.get('region_items', 0))} | "
                         f"{percent(*_object_hits(scores))} |")
    return "\n".join(lines) + "\n" + boxes_table(table)


def _object_hits(scores: dict) -> tuple[int, int]:
    """How often a region's crop held the whole object, and of how many rows: grid or continuous regions."""
    for prefix in ("region_object", "region_box_object"):
        if f"{prefix}_items" in scores:
            return scores[f"{prefix}_hits"], scores[f"{prefix}_items"]
    return 0, 0


def boxes_table(table: dict) -> str:
    """Markdown: per model and dataset with boxes, the continuous regions' and box answers' IoU figures."""
    lines = []
    for label, per_dataset in table.items():
        for dataset, scores in per_dataset.items():
            if "region_box_items" in scores:
                count = scores["region_box_items"]
                lines.append(f"| {label} | {dataset} | continuous region | {100 * scores['region_box_hits'] / count:.1f} | "
                             f"{scores['region_box_iou_mean']:.3f} | - |")
            if "grounding_items" in scores:
                count = scores["grounding_items"]
                lines.append(f"| {label} | {dataset} | box answer | {100 * scores['grounding_hits'] / count:.1f} | "
                             f"{scores['grounding_iou_mean']:.3f} | {100 * scores['centre_box_hits'] / count:.1f} / "
                             f"{scores['centre_box_iou_mean']:.3f} |")
    if not lines:
        return ""
    header = ["", "Boxes", "", "| model | dataset | box | Acc@0.5 (x100) | mean IoU | centre box: Acc / IoU |",
              "|---|---|---|---|---|---|"]
    return "\n".join(header + lines) + "\n" + masks_table(table)


def masks_table(table: dict) -> str:
    """Markdown: per model and dataset with reference masks, the answer masks' cIoU and gIoU."""
    lines = [f"| {label} | {dataset} | {scores['mask_items']} | {100 * scores['mask_ciou']:.1f} | "
             f"{100 * scores['mask_giou']:.1f} |"
             for label, per_dataset in table.items() for dataset, scores in per_dataset.items() if "mask_items" in scores]
    if not lines:
        return ""
    header = ["", "Masks", "", "| model | dataset | answers | cIoU (x100) | gIoU (x100) |", "|---|---|---|---|---|"]
    return "\n".join(header + lines) + "\n"


def _bar_chart(rows, header, path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = header[1:]
    width = 0.8 / max(len(rows), 1)
    # About a fifth of an inch per bar, within a page-wide figure.
    figure, axes = plt.subplots(figsize=(min(24, max(6, 0.2 * len(groups) * max(len(rows), 1) + 2)), 4.5))
    for k, row in enumerate(rows):
        values = [float("nan") if v is None else 100 * v for v in row[1:]]  # no bar where there is no figure
        axes.bar([g + k * width for g in range(len(groups))], values, width, label=row[0])
    axes.set_xticks([g + width * (len(rows) - 1) / 2 for g in range(len(groups))], groups, rotation=20, ha="right")
    axes.set_ylabel(f"score ({what}, x100)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate VPT models (two-round VPT answers, scored)")
    parser.add_argument("--config", help="YAML with models, datasets and settings (see evaluation/evaluation.yaml)")
    parser.add_argument("--model", action="append",
                        help="NAME=PATH of a VPT checkpoint; repeatable; replaces the config's models")
    parser.add_argument("--dataset", action="append", help="dataset_info.json name or released-format file; repeatable")
    parser.add_argument("--benchmark", action="append",
                        help="vstar, hrbench_4k, hrbench_8k, mme_realworld, mme_realworld_lite; repeatable")
    parser.add_argument("--benchmark-dir", dest="benchmark_dir",
                        help="folder holding the benchmark downloads, each in a folder named as its hub repository")
    parser.add_argument("--output-dir", dest="output_dir")
    parser.add_argument("--limit", type=int, help="first N questions of each dataset")
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--image-max-pixels", dest="image_max_pixels", type=int)
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, help="per turn (default 128)")
    parser.add_argument("--device")
    parser.add_argument("--compare-no-perception", action="store_true",
                        help="also answer with perception tokens suppressed, to measure what VPT adds")
    parser.add_argument("--retry-unscored", action="store_true",
                        help="ask the judge again about answers it could not score in an earlier run")
    return parser


def main(argv: list[str] | None = None, repo: Path = Path.cwd()) -> None:
    logging.basicConfig(level=logging.WARNING)
    evaluate(load_settings(main_parser().parse_args(argv), repo))
