"""``python -m vpt_plugin.demo``: a tiny model learns to look again, and the second look measurably helps.

Offline and on CPU, through the unmodified ``llamafactory-cli train``. The task
(``data/make_detail_data.py``) asks for the fine texture of a small purple square: at the base
image's pixel budget every texture blurs to the same purple, so only a second look can answer. One
tiny Qwen3-VL (``vpt tiny``) learns both second looks from ``configs/demo/look_again.yaml``:
Region Selection (it names the square's cell, the crop is shown at full resolution) and Vision
Re-Encoding with DINOv2 (which sees the image at 224x224). Then ``evaluation/demo.yaml``
answers the test questions with VPT and with perception suppressed, and the demo prints, per
test split, both scores, how often the model asked for a second look and how often its region
was the right cell; it draws some test images with the chosen and the true regions beside the
score chart (``outputs/demo/look_again.png``).

``--box`` compares the two ways of naming the region on the same task: PerceptionGPT's continuous
box token (``configs/demo/box_region.yaml``, which also learns grounding: "where is the purple square?"
answered with a box) against the six grid tokens (``configs/demo/grid_region.yaml``), trained alike;
both are evaluated with VPT and with perception suppressed (``evaluation/box_region.yaml``).

``--masks`` trains PerceptionGPT's mask decoder beside the box token on the grounding task
(``configs/demo/box_mask.yaml``) and scores the answer boxes (REC accuracy, mean IoU, against a
centre-box baseline) and the answer masks (cIoU, gIoU) with ``evaluation/box_mask.yaml``.

``--tour`` runs the recipe tour instead: every branch's alignment and VPT stage, the clip branch
from a plain Qwen2-VL and its LoRA variant (``configs/demo``), each checked to learn, save and reload.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

PROOF_RECIPE = "look_again"

# (recipe, what it shows); stage 2 of a branch starts from its stage 1 output.
TOUR_RECIPES = (
    ("dino_1_alignment", "DINOv2 branch: projector alignment (one pass), model built from a plain Qwen2-VL"),
    ("dino_2_vpt", "DINOv2 branch: VPT tuning (two passes, para mask), vision encoders frozen"),
    ("sam_1_alignment", "SAM branch: projector alignment"),
    ("sam_2_vpt", "SAM branch: VPT tuning"),
    ("clip_vpt", "clip branch: VPT tuning from a plain Qwen2-VL (published freefreeze keys)"),
    ("clip_vpt_lora", "clip branch: LoRA on the LLM + projector, lm_head, embeddings"),
)


def run_recipe(recipe: Path, log: Path, extra_args: tuple[str, ...] = (), env: dict | None = None) -> None:
    """``llamafactory-cli train recipe`` in a subprocess, its output in ``log``; raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # This interpreter's scripts first: llamafactory-cli, and the bare `torchrun` its launcher calls.
    scripts = str(Path(sys.executable).parent)
    path = {"PATH": scripts + os.pathsep + os.environ.get("PATH", "")}
    with open(log, "w") as out:
        result = subprocess.run(
            ["llamafactory-cli", "train", str(recipe), *extra_args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **path, **(env or {})},
        )
    if result.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"llamafactory-cli train {recipe} failed (exit {result.returncode}); {log} ends:\n{tail}")


def training_losses(output_dir: Path) -> list[float]:
    """The logged training losses of a finished run (``trainer_state.json``)."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def final_eval_loss(output_dir: Path) -> float | None:
    """The evaluation loss logged at the run's last step, if it evaluated then."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    evals = [entry for entry in state["log_history"] if "eval_loss" in entry]
    return evals[-1]["eval_loss"] if evals and evals[-1]["step"] == state["global_step"] else None


def reload_and_evaluate(recipe: Path, log: Path, extra_args: tuple[str, ...] = ()) -> float:
    """Load a finished run's saved model through LLaMA-Factory (no training); its test-split loss.

    ``extra_args`` are the overrides the run itself was given (``output_dir=...`` among them).
    """
    settings = yaml.safe_load(recipe.read_text())
    settings.update(arg.split("=", 1) for arg in extra_args)
    output_dir = settings["output_dir"]
    args = [*extra_args, "do_train=false", "do_eval=true", f"output_dir={output_dir}/reload_check",
            f"eval_dataset={settings.get('eval_dataset', settings['dataset'])}"]
    # A full run saved a VPT checkpoint; a LoRA run saved an adapter for the recipe's base.
    args.append(f"{'adapter_name_or_path' if settings['finetuning_type'] == 'lora' else 'model_name_or_path'}={output_dir}")
    run_recipe(recipe, log, tuple(args))
    metrics = json.loads((Path(output_dir) / "reload_check" / "eval_results.json").read_text())
    return metrics["eval_loss"]


# ---------------------------------------------------------------------------- the proof


def write_detail_data(data: Path) -> None:
    """The texture task's files (data/make_detail_data.py: deterministic, a few seconds)."""
    subprocess.run([sys.executable, str(data / "make_detail_data.py"), "--output", str(data / "detail")], check=True,
                   stdout=subprocess.DEVNULL)


def train_demo_model(recipe: Path, what: str) -> Path:
    """Train one demo recipe, printing what it learns and its loss; returns its output folder."""
    output_dir = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    print(f"== {recipe.stem}: a tiny Qwen3-VL learns {what} on the texture task", flush=True)
    started = time.perf_counter()
    run_recipe(recipe, output_dir.with_suffix(".log"))
    losses = training_losses(output_dir)
    print(f"   loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} logs in {time.perf_counter() - started:.0f}s",
          flush=True)
    return output_dir


def fresh_evaluation_settings(evaluation: Path) -> dict:
    """The evaluation config's settings, its earlier answers removed: the evaluation resumes from
    them, and the demo's models were just retrained."""
    from .evaluation.runner import load_settings, main_parser

    print("== evaluation: the test questions with VPT and with perception suppressed", flush=True)
    settings = load_settings(main_parser().parse_args(["--config", str(evaluation)]), repo=Path.cwd())
    shutil.rmtree(settings["output_dir"], ignore_errors=True)
    return settings


def look_again(configs: Path, evaluation: Path, data: Path) -> dict:
    """Train the look-again model, evaluate it with and without VPT; returns the evaluation table."""
    from .evaluation.runner import evaluate

    write_detail_data(data)
    train_demo_model(configs / f"{PROOF_RECIPE}.yaml", "Region Selection and DINOv2 re-encoding")
    settings = fresh_evaluation_settings(evaluation)
    table = evaluate(settings)
    print(proof_table(table))
    picture = Path(settings["output_dir"]).parent / f"{PROOF_RECIPE}.png"
    draw_proof(table, Path(settings["output_dir"]), Path(settings["dataset_dir"]), picture)
    print(f"picture of test answers and the score chart: {picture}")
    return table


def box_comparison(configs: Path, evaluation: Path, data: Path) -> dict:
    """Train continuous and grid Region Selection alike, evaluate both; returns the evaluation table."""
    from .evaluation.runner import evaluate

    write_detail_data(data)
    grid_model = train_demo_model(configs / "grid_region.yaml", "grid Region Selection (six grid tokens)")
    train_demo_model(configs / "box_region.yaml", "continuous Region Selection and grounding (one <|perception_box|>)")
    settings = fresh_evaluation_settings(evaluation)
    table = evaluate(settings)
    table.update(evaluate({**settings, "models": {"grid_region": str(grid_model)}, "datasets": ["detail_region_test"],
                           "output_dir": str(Path(settings["output_dir"]) / "grid")}))
    print(box_comparison_table(table))
    return table


def box_and_mask_grounding(configs: Path, evaluation: Path, data: Path) -> dict:
    """Train the box token with the mask decoder on grounding, evaluate its boxes and masks."""
    from .evaluation.runner import evaluate

    write_detail_data(data)
    train_demo_model(configs / "box_mask.yaml", "grounding answered with one <|perception_box|>, its box and mask decoded")
    table = evaluate(fresh_evaluation_settings(evaluation))
    print(mask_grounding_table(table))
    return table


def mask_grounding_table(table: dict) -> str:
    """Markdown: per model and grounding split, the answer boxes' and masks' scores."""
    lines = ["| model | test split | REC Acc@0.5 | mean IoU | centre box: Acc@0.5 / mean IoU | mask cIoU | mask gIoU |",
             "|---|---|---|---|---|---|---|"]
    for label, per_dataset in table.items():
        for dataset, scores in per_dataset.items():
            lines.append(f"| {label} | {dataset} | {100 * scores['metric_mean']:.1f} | {scores['grounding_iou_mean']:.3f} | "
                         f"{100 * scores['centre_box_hits'] / scores['grounding_items']:.1f} / "
                         f"{scores['centre_box_iou_mean']:.3f} | {100 * scores['mask_ciou']:.1f} | "
                         f"{100 * scores['mask_giou']:.1f} |")
    return "\n".join(lines)


def box_comparison_table(table: dict) -> str:
    """Markdown: per region mode, exact match with VPT and suppressed, and how good the regions were."""
    lines = ["| region mode | test split | with VPT | perception suppressed | region right | crop holds the square |",
             "|---|---|---|---|---|---|"]
    for mode, label, dataset in (("grid tokens", "grid_region", "detail_region_test"),
                                 ("box token", "box_region", "detail_boxregion_test")):
        scores, suppressed = table[label][dataset], table[f"{label} (no VPT)"][dataset]
        if mode == "grid tokens":
            right = f"{100 * scores['region_cell_hits'] / scores['region_items']:.0f}% (true cells)"
        else:
            right = (f"{100 * scores['region_box_hits'] / scores['region_box_items']:.0f}% (IoU > 0.5; mean IoU "
                     f"{scores['region_box_iou_mean']:.2f})")
        hits, items = (scores["region_object_hits"], scores["region_object_items"]) if mode == "grid tokens" else \
            (scores["region_box_object_hits"], scores["region_box_object_items"])
        holds = 100 * hits / items
        lines.append(f"| {mode} | {dataset} | {100 * scores['metric_mean']:.1f} | {100 * suppressed['metric_mean']:.1f} | "
                     f"{right} | {holds:.0f}% |")
    grounding = table["box_region"]["detail_grounding_test"]
    lines += ["", "| grounding (box answer) | REC Acc@0.5 | mean IoU | centre box: Acc@0.5 / mean IoU |", "|---|---|---|---|",
              f"| box_region on detail_grounding_test | {100 * grounding['metric_mean']:.1f} | "
              f"{grounding['grounding_iou_mean']:.3f} | {100 * grounding['centre_box_hits'] / grounding['grounding_items']:.1f}"
              f" / {grounding['centre_box_iou_mean']:.3f} |"]
    return "\n".join(lines)


def proof_table(table: dict) -> str:
    """Markdown, per model and test split: exact match with VPT and suppressed, looks, region hits."""
    lines = ["| model | test split | with VPT | perception suppressed | asked for a look | region = true cell |",
             "|---|---|---|---|---|---|"]
    for label, per_dataset in table.items():
        if label.endswith(" (no VPT)"):
            continue
        suppressed = table.get(f"{label} (no VPT)", {})
        for dataset, scores in per_dataset.items():
            without = suppressed.get(dataset, {}).get("metric_mean")
            regions = scores.get("region_items", 0)
            hits = f"{100 * scores['region_cell_hits'] / regions:.0f}%" if regions else "-"
            lines.append(f"| {label} | {dataset} | {100 * scores['metric_mean']:.1f} | "
                         f"{'n/a' if without is None else f'{100 * without:.1f}'} | "
                         f"{100 * scores['perceived'] / scores['items']:.0f}% | {hits} |")
    return "\n".join(lines)


def draw_proof(table: dict, evaluation_dir: Path, dataset_dir: Path, path: Path, shown: int = 6) -> None:
    """Test images of the region split with the chosen (red) and true (green) regions and both answers,
    beside the score chart (with VPT, perception suppressed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import ImageDraw

    from .dataset import open_image
    from .evaluation.runner import read_jsonl
    from .inference import draw_regions
    from .vocabulary import crop_pixels

    model = next(label for label in table if not label.endswith(" (no VPT)"))
    split = next(d for d, scores in table[model].items() if scores.get("region_items"))
    with_vpt = read_jsonl(evaluation_dir / model / "vpt" / split / "predictions.jsonl")
    without = read_jsonl(evaluation_dir / model / "no_vpt" / split / "predictions.jsonl")
    figure = plt.figure(figsize=(3 * shown, 6.8))
    grid = figure.add_gridspec(2, shown, height_ratios=[1.1, 1])
    for k, index in enumerate(sorted(with_vpt)[:shown]):
        item = with_vpt[index]
        image = open_image(item["image"] if Path(item["image"]).is_file() else str(dataset_dir / item["image"])).convert("RGB")
        if item.get("reference_region"):  # under the chosen one, wider, so both show where they agree
            ImageDraw.Draw(image).rectangle(crop_pixels(item["reference_region"], *image.size), outline="lime", width=7)
        drawn = draw_regions(image, item["trace"], colour="red")
        axes = figure.add_subplot(grid[0, k])
        axes.imshow(drawn)
        axes.set_axis_off()
        axes.set_title(f"truth: {item['reference']}\nVPT: {item['answer']}\nno VPT: {without[index]['answer']}",
                       fontsize=9)
    axes = figure.add_subplot(grid[1, :])
    splits = [d for d in table[model]]
    suppressed = table.get(f"{model} (no VPT)", {})
    positions = range(len(splits))
    axes.bar([p - 0.2 for p in positions], [100 * table[model][d]["metric_mean"] for d in splits], 0.4,
             label="with VPT", color="tab:red")
    axes.bar([p + 0.2 for p in positions], [100 * suppressed[d]["metric_mean"] if d in suppressed else 0 for d in splits],
             0.4, label="perception suppressed", color="tab:gray")
    axes.set_xticks(list(positions), splits)
    axes.set_ylabel("exact match (x100)")
    axes.set_ylim(0, 100)
    axes.legend()
    figure.suptitle("Region Selection on test images: red, the crop the model chose; green, the crop of the true cells")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------- the recipe tour


def tour(configs: Path) -> None:
    started = time.perf_counter()
    for name, what in TOUR_RECIPES:
        recipe = configs / f"{name}.yaml"
        output_dir = Path(yaml.safe_load(recipe.read_text())["output_dir"])
        print(f"== {name}: {what}", flush=True)
        t0 = time.perf_counter()
        run_recipe(recipe, output_dir.with_suffix(".log"))
        losses = training_losses(output_dir)
        if not losses[-1] < losses[0]:
            raise SystemExit(f"{name}: the training loss did not fall ({losses})")
        reloaded = reload_and_evaluate(recipe, output_dir.with_name(output_dir.name + "_reload.log"))
        in_training = final_eval_loss(output_dir)
        if in_training is not None and abs(in_training - reloaded) > 1e-4:
            raise SystemExit(f"{name}: reloaded test loss {reloaded} differs from the run's own {in_training}")
        print(f"   loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} logs, {time.perf_counter() - t0:.0f}s; "
              f"reloaded from {output_dir}: test loss {reloaded:.3f}", flush=True)
    print(f"all {len(TOUR_RECIPES)} tour recipes trained, saved and reloaded in {time.perf_counter() - started:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=Path("configs/demo"))
    parser.add_argument("--tiny", type=Path, default=Path("outputs/tiny"), help="where `vpt tiny` wrote its models")
    parser.add_argument("--data", type=Path, default=Path("data"), help="dataset_dir (the look-again task goes to detail/)")
    parser.add_argument("--evaluation", type=Path,
                        help="evaluation settings (default: evaluation/demo.yaml; with --box evaluation/box_region.yaml, "
                             "with --masks evaluation/box_mask.yaml)")
    parser.add_argument("--tour", action="store_true", help="run the recipe tour instead of the look-again proof")
    parser.add_argument("--box", action="store_true",
                        help="compare continuous (box token) and grid Region Selection instead of the look-again proof")
    parser.add_argument("--masks", action="store_true",
                        help="train the box token with PerceptionGPT's mask decoder on grounding; score boxes and masks")
    args = parser.parse_args()
    if not all((args.tiny / folder / "config.json").is_file() for folder in ("qwen2-vl", "qwen3-vl", "dinov2")):
        from .tiny import build_tiny_fixtures

        build_tiny_fixtures(args.tiny, bases=("qwen2_vl", "qwen3_vl"))
    if args.tour:
        tour(args.configs)
    elif args.box:
        box_comparison(args.configs, args.evaluation or Path("evaluation/box_region.yaml"), args.data)
    elif args.masks:
        box_and_mask_grounding(args.configs, args.evaluation or Path("evaluation/box_mask.yaml"), args.data)
    else:
        look_again(args.configs, args.evaluation or Path("evaluation/demo.yaml"), args.data)


if __name__ == "__main__":
    sys.exit(main())
