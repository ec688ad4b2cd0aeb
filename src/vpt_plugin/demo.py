"""``python -m vpt_plugin.demo``: every demo recipe through the unmodified ``llamafactory-cli train``.

Offline and on CPU: tiny random models (``vpt tiny``), the demo dataset (``data/demo``), and
the recipes of ``configs/demo`` in order (each branch's alignment, then VPT tuning; full and
LoRA). After each run it checks that the loss fell and reloads the saved model through
LLaMA-Factory's own loader to compute its loss on the test split again. Last, it evaluates
the trained VPT models on the demo test splits (``evaluation/demo.yaml``), with and without
Visual Perception Tokens, and prints the table.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

# (recipe, what it shows); stage 2 of a branch starts from its stage 1 output.
DEMO_RECIPES = (
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=Path("configs/demo"))
    parser.add_argument("--tiny", type=Path, default=Path("outputs/tiny"), help="where `vpt tiny` wrote its models")
    parser.add_argument("--evaluation", type=Path, default=Path("evaluation/demo.yaml"), help="evaluation settings")
    args = parser.parse_args()
    if not (args.tiny / "qwen2-vl" / "config.json").is_file():
        from .tiny import build_tiny_fixtures

        build_tiny_fixtures(args.tiny)
    started = time.perf_counter()
    for name, what in DEMO_RECIPES:
        recipe = args.configs / f"{name}.yaml"
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
    print(f"all {len(DEMO_RECIPES)} demo recipes trained, saved and reloaded in {time.perf_counter() - started:.0f}s")
    print("== evaluation: the trained VPT models on the demo test splits, with VPT and with it suppressed", flush=True)
    from .evaluation.runner import main as evaluate

    evaluate(["--config", str(args.evaluation)], repo=Path.cwd())


if __name__ == "__main__":
    sys.exit(main())
