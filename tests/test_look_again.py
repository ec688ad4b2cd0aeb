"""The look-again task, small: a second look measurably helps a model trained with the plugin.

The equality tests prove the plugin computes what the published code computes; this one proves
that crops, their positions and their placement among the model's images reach the answer the
way the method needs. Through the unmodified ``llamafactory-cli``, a tiny Qwen3-VL learns Region
Selection on a small version of the demo's texture task (data/make_detail_data.py: the texture
is blurred away at the base image's pixel budget, the crop shows it at full resolution), then
answers the test questions with VPT and with perception suppressed. A regression that garbles
the crop, where it is placed or how it is encoded leaves the VPT answers at chance too.
(``make demo`` trains the full task, the DINOv2 branch included.)
"""

import os
import subprocess
import sys
from pathlib import Path

from vpt_plugin.demo import run_recipe
from vpt_plugin.evaluation.runner import evaluate
from vpt_plugin.tiny import build_tiny_fixtures

REPO = Path(__file__).resolve().parents[1]


def test_region_selection_beats_suppressed_perception_by_a_clear_margin(tmp_path):
    tiny = build_tiny_fixtures(tmp_path / "tiny", bases=("qwen3_vl",))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "dataset_info.json").write_bytes((REPO / "data" / "dataset_info.json").read_bytes())
    subprocess.run([sys.executable, str(REPO / "data" / "make_detail_data.py"), "--output", str(data_dir / "detail"),
                    "--train-images", "200", "--test-images", "32"], check=True, capture_output=True)
    out = tmp_path / "look_again"
    args = (f"model_name_or_path={tiny['qwen3_vl']}", f"vision_encoder_paths=dino={tiny['dino']}",
            "dataset=detail_region_train", f"dataset_dir={data_dir}", f"output_dir={out}", "max_steps=200")
    scripts = {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    run_recipe(REPO / "configs" / "demo" / "look_again.yaml", tmp_path / "train.log", args, env=scripts)

    table = evaluate({
        "models": {"look_again": str(out)}, "datasets": ["detail_region_test"], "dataset_dir": str(data_dir),
        "output_dir": str(tmp_path / "evaluation"), "compare_no_perception": True, "image_max_pixels": 128 * 128,
        "batch_size": 16, "generation": {"max_new_tokens": 12}, "metric": "exact_match",
    })
    with_vpt = table["look_again"]["detail_region_test"]
    suppressed = table["look_again (no VPT)"]["detail_region_test"]
    # Four textures: chance is 25%; without the second look the model can do no better.
    assert suppressed["metric_mean"] <= 0.45, suppressed
    assert with_vpt["metric_mean"] >= suppressed["metric_mean"] + 0.3, (with_vpt, suppressed)
    assert with_vpt["perceived"] == with_vpt["items"] == 32
    assert with_vpt["region_cell_hits"] >= 0.8 * with_vpt["region_items"], with_vpt
