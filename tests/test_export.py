"""Hub export: an exported VPT folder loads with transformers alone and answers as the model did.

The demo recipes train tiny models through ``llamafactory-cli train`` (full and LoRA) and
``llamafactory-cli export`` writes their folders (the full one also pushed, to a stand-in Hub on
loopback); a checkpoint in the published layout, converted by ``vpt convert``, is exported by
``vpt export`` and by ``llamafactory-cli export``. The models before export run in a process
with the plugin, loaded as the export loads them; the exported folders run in a fresh process
where ``import vpt_plugin`` fails. Both compute the same logits and the same greedy VPT answers
(a region round and a branch round), traces included.
"""

import ast
import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_convert import build_published
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.dynamic_module_utils import check_imports

from vpt_plugin.cli import main as vpt_main
from vpt_plugin.export import ExportError, assemble, finish_hub_folder

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
SCRIPTS = str(Path(sys.executable).parent)
# Processes run two at a time on small machines: one thread each, or they spin waiting for each other.
ENV = {**os.environ, "PATH": SCRIPTS + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
CODE_FILES = {"modeling_vpt.py"}
BASE_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
HUB_REPO = "vpt-tests/tiny-clip-vpt"

# Runs in both processes: the logits of two prompts and their greedy VPT answers. The first
# assistant turn is forced (a random tiny model writes what the test needs): a region for
# row 0, the model's first branch for row 1; the model decides everything after.
PROBE = r'''
import json, sys
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import LogitsProcessor, LogitsProcessorList


class ForceFirstTurn(LogitsProcessor):
    def __init__(self, tokenizer, prompts, scripts):
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.cases = [(prompt, tokenizer.encode(script, add_special_tokens=False)) for prompt, script in zip(prompts, scripts)]

    def __call__(self, input_ids, scores):
        for b, row in enumerate(input_ids.tolist()):
            row = row[row.index(self.start):]  # without padding
            script = next(script for prompt, script in self.cases if row[: len(prompt)] == prompt)
            h = self.header
            turns = [i + len(h) for i in range(len(row)) if row[i : i + len(h)] == h]
            step = len(row) - turns[-1]
            if len(turns) == 1 and step < len(script):
                scores[b] = float("-inf")
                scores[b, script[step]] = 0.0
        return scores


def image(colour, cell):
    picture = Image.new("RGB", (224, 224), (128, 128, 128))
    x, y = cell
    ImageDraw.Draw(picture).rectangle([x * 28 + 2, y * 28 + 2, x * 28 + 25, y * 28 + 25], fill=colour)
    return picture


def probe(model, processor, out):
    action_start = model.config.branch_ids(model.config.vision_encoder_ls[0])["action_start"]
    images = [image("red", (5, 2)), image("blue", (1, 6))]
    questions = ["Which colour? Identify the region that can help you answer the question, and then answer the question",
                 "What shape? Require additional perception features, and then answer the question"]
    scripts = ["<|region_token_start|><|x_5|><|y_2|><|region_token_end|><|im_end|>", processor.tokenizer.convert_ids_to_tokens(action_start)]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in questions]
    processor.tokenizer.padding_side = "left"  # LLaMA-Factory's export saves "left"; its loader sets "right"
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    force = ForceFirstTurn(processor.tokenizer, prompts, scripts)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, processor=processor, vpt_images=images, do_sample=False, max_new_tokens=6,
                               logits_processor=LogitsProcessorList([force]), return_dict_in_generate=True)
    answers = processor.tokenizer.batch_decode(generated.sequences[:, inputs["input_ids"].shape[1]:])
    save_file({"logits": logits.contiguous()}, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump({"answers": answers, "traces": generated.traces, "model_module": type(model).__module__,
                   "processor_class": type(processor).__name__, "dtype": str(model.dtype),
                   "vpt_plugin_imported": "vpt_plugin" in sys.modules}, f)
'''

# The models as they were before export, in a process with the plugin: loaded by LLaMA-Factory's
# loader from the export's own arguments (what `llamafactory-cli export` saves), or by the Auto classes.
BEFORE_EXPORT = PROBE + r'''
from transformers import AutoModelForImageTextToText, AutoProcessor
for case in json.loads(sys.argv[1]):
    if case["load"] == "llamafactory":
        from llamafactory.data import get_template_and_fix_tokenizer
        from llamafactory.hparams import get_infer_args
        from llamafactory.model import load_model, load_tokenizer
        model_args, data_args, finetuning_args, _ = get_infer_args(case["args"])
        loaded = load_tokenizer(model_args)
        get_template_and_fix_tokenizer(loaded["tokenizer"], data_args)
        model, processor = load_model(loaded["tokenizer"], model_args, finetuning_args), loaded["processor"]
    else:
        import vpt_plugin
        model = AutoModelForImageTextToText.from_pretrained(case["path"]).eval()
        processor = AutoProcessor.from_pretrained(case["path"])
    probe(model, processor, case["out"])
'''

# The exported folders, in a process where vpt_plugin cannot be imported.
EXPORTED = r'''
import sys
sys.path.insert(0, sys.argv[2])  # holds a vpt_plugin package that raises ImportError
try:
    import vpt_plugin
    raise SystemExit("vpt_plugin was importable")
except ImportError:
    pass
''' + PROBE + r'''
from transformers import AutoModelForImageTextToText, AutoProcessor
for case in json.loads(sys.argv[1]):
    model = AutoModelForImageTextToText.from_pretrained(case["path"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(case["path"], trust_remote_code=True)
    probe(model, processor, case["out"])
'''


def run_side_by_side(commands: dict[str, tuple[list[str], dict]], logs: Path) -> None:
    """Run independent commands (name -> (argv, extra environment)) at once; each must succeed."""
    running = {}
    for name, (argv, env) in commands.items():
        log = open(logs / f"{name}.log", "w")
        running[name] = (subprocess.Popen(argv, cwd=REPO, env={**ENV, **env}, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (process, log) in running.items():
        process.wait(timeout=600)
        log.close()
        assert process.returncode == 0, f"{name} failed:\n" + (logs / f"{name}.log").read_text()[-5000:]


class StandInHub(ThreadingHTTPServer):
    """The Hub endpoints ``create_repo`` and ``upload_folder`` call, on loopback; keeps the commits."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubRequests)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.created, self.commits = [], []


class _HubRequests(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            self.server.created.append(repo)
            self._reply({"url": f"{self.server.endpoint}/{repo}"})
        elif path == "/api/validate-yaml":
            self._reply({})
        elif "/preupload/" in path:
            files = json.loads(body)["files"]
            self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}
            self.server.commits.append((path, files))
            repo = path.removeprefix("/api/models/").split("/commit/")[0]
            self._reply({"commitUrl": f"{self.server.endpoint}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
        else:
            self.send_error(404, f"the stand-in Hub does not serve {path}")

    def _reply(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub():
    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def exported(tiny_base_dir, hub, tmp_path_factory):
    """Every export of the module, and what the models computed before and after: name -> case."""
    root = tmp_path_factory.mktemp("export")
    train = {}
    for name, recipe in (("full", "clip_vpt"), ("lora", "clip_vpt_lora")):
        args = dict(model_name_or_path=tiny_base_dir, output_dir=root / f"{name}-trained", max_steps=2, save_steps=100,
                    logging_steps=1, eval_strategy="'no'")
        train[f"train-{name}"] = (["llamafactory-cli", "train", str(DEMO / f"{recipe}.yaml"),
                                   *(f"{k}={v}" for k, v in args.items())], {})
    run_side_by_side(train, root)

    build_published("dino", tiny_base_dir, root / "published")
    vpt_main(["convert", str(root / "published"), str(root / "converted"), "--detection-config", str(root / "dino-config.json")])
    export = dict(template="vpt_qwen2_vl", infer_dtype="float32", export_base_model=BASE_MODEL)
    sources = {
        "full": dict(model_name_or_path=str(root / "full-trained"), export_hub_model_id=HUB_REPO),
        # A LoRA export builds the VPT model around the base as the training recipe did: same VPT keys.
        "lora": dict(model_name_or_path=str(tiny_base_dir), adapter_name_or_path=str(root / "lora-trained"),
                     finetuning_type="lora", customize_model_class="vpt", vision_encoder_ls="clip",
                     num_inner_forward_run=2),
        "converted": dict(model_name_or_path=str(root / "converted")),
    }
    cases, exports = {}, {}
    for name, source in sources.items():
        args = {**source, **export, "export_dir": str(root / f"{name}-exported")}
        (root / f"{name}-export.yaml").write_text(yaml.safe_dump(args))
        exports[f"export-{name}"] = (["llamafactory-cli", "export", str(root / f"{name}-export.yaml")],
                                     {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_stand_in"})
        loader_args = {k: v for k, v in args.items() if k not in ("export_base_model", "export_hub_model_id")}
        cases[name] = {"before": {"load": "llamafactory", "args": loader_args}, "folder": Path(args["export_dir"])}
    run_side_by_side(exports, root)
    vpt_main(["export", str(root / "converted"), str(root / "converted-vpt-exported"), "--base-model", BASE_MODEL])
    cases["converted_by_vpt_export"] = {"before": {"load": "auto", "path": str(root / "converted")},
                                        "folder": root / "converted-vpt-exported"}

    for name, case in cases.items():
        case["before"]["out"] = str(root / f"{name}-before")
        case["after"] = {"path": str(case["folder"]), "out": str(root / f"{name}-after")}
    probe_before_and_after(cases, root)
    return cases


def probe_before_and_after(cases: dict, root: Path) -> None:
    """Run the probe on each case's model before export (with the plugin) and on its exported folder
    (where vpt_plugin cannot be imported), side by side; add what each computed to the case."""
    blocker = root / "blocker" / "vpt_plugin"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('vpt_plugin is not installed here')\n")
    run_side_by_side({
        "before-export": ([sys.executable, "-c", BEFORE_EXPORT, json.dumps([c["before"] for c in cases.values()])], {}),
        "exported": ([sys.executable, "-c", EXPORTED, json.dumps([c["after"] for c in cases.values()]), str(blocker.parent)],
                     {"VPT_PLUGIN_DISABLE": "1", "HF_MODULES_CACHE": str(root / "modules")}),
    }, root)
    for case in cases.values():
        for when in ("before", "after"):
            out = case[when]["out"]
            case[when].update(json.loads(Path(out + ".json").read_text()), logits=load_file(out + ".safetensors")["logits"])


CASES = ["full", "lora", "converted", "converted_by_vpt_export"]


@pytest.mark.parametrize("name", CASES)
def test_exported_model_loads_without_vpt_plugin_and_answers_alike(exported, name):
    before, after = exported[name]["before"], exported[name]["after"]
    assert after["model_module"].startswith("transformers_modules.") and not after["vpt_plugin_imported"]
    assert after["processor_class"] == "VPTQwen2VLProcessor" and after["dtype"] == before["dtype"] == "torch.float32"
    assert torch.equal(after["logits"], before["logits"])
    assert after["answers"] == before["answers"]
    assert after["traces"] == before["traces"]
    kinds = [trace["rounds"][0]["kind"] if trace["rounds"] else None for trace in after["traces"]]
    assert kinds == ["region", "dino" if name.startswith("converted") else "clip"], after["traces"]


@pytest.mark.parametrize("name", CASES)
def test_exported_folder_holds_safetensors_code_and_a_model_card(exported, name):
    folder = exported[name]["folder"]
    files = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"} <= files
    assert {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))} == set()
    assert {name for name in files if name.endswith(".py")} == CODE_FILES
    for code in CODE_FILES:
        check_imports(folder / code)  # every package it imports is installed; raises otherwise
        assert "vpt_plugin" not in {n.split(".")[0] for n in _imported_modules(folder / code)}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl_vpt"
    assert config["auto_map"] == {"AutoConfig": "modeling_vpt.VPTQwen2VLConfig",
                                  "AutoModelForImageTextToText": "modeling_vpt.VPTQwen2VLForConditionalGeneration"}
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "modeling_vpt.VPTQwen2VLProcessor"}
    card = (folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter["base_model"] == BASE_MODEL and front_matter["license"] == "apache-2.0"
    assert front_matter["pipeline_tag"] == "image-text-to-text" and front_matter["library_name"] == "transformers"
    assert "visual-perception-tokens" in front_matter["tags"]
    assert "trust_remote_code=True" in card and "vpt_images=[image]" in card
    branch = "detection" if name.startswith("converted") else "clip"
    assert f"<|{branch}_action_start|><|{branch}_action|><|{branch}_action_end|>" in card
    if name == "lora":  # the arguments LLaMA-Factory exported from
        recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
        assert recipe["finetuning_type"] == "lora" and recipe["adapter_name_or_path"].endswith("lora-trained")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return found | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_export_hub_model_id_pushes_the_finished_folder_in_one_commit(exported, hub):
    folder = exported["full"]["folder"]
    assert hub.created == [HUB_REPO]
    [(path, files)] = hub.commits
    assert path == f"/api/models/{HUB_REPO}/commit/main"
    assert files == {p.name: p.read_bytes() for p in folder.iterdir()}
    card = yaml.safe_load(files["README.md"].decode().split("---\n")[1])
    assert card["base_model"] == BASE_MODEL and f'from_pretrained("{HUB_REPO}"' in files["README.md"].decode()


@pytest.mark.parametrize("trust_remote_code", [True, False])
def test_exported_folder_loads_with_vpt_plugin_too(exported, trust_remote_code):
    import vpt_plugin

    folder = exported["full"]["folder"]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    assert type(model) is vpt_plugin.VPTQwen2VLForConditionalGeneration
    assert type(processor) is vpt_plugin.VPTQwen2VLProcessor


# ----------------------------------------------------------------------------- refusals


def test_a_model_that_is_not_vpt_is_refused(tiny_base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        vpt_main(["export", str(tiny_base_dir), str(tmp_path / "out")])
    assert "model_type 'qwen2_vl' is not a VPT model" in capsys.readouterr().err
    with pytest.raises(ExportError, match="model_type 'qwen2_vl' is not a VPT model"):
        finish_hub_folder(tiny_base_dir)


def test_a_folder_without_processor_or_with_pickles_is_refused(tiny_vpt_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_vpt_dir / name).read_bytes())
    with pytest.raises(ExportError, match=r"model: no processor_config.json: a VPT model exports with its processor"):
        finish_hub_folder(folder)
    (folder / "processor_config.json").write_bytes((tiny_vpt_dir / "processor_config.json").read_bytes())
    (folder / "training_args.bin").write_bytes(b"pickled")
    with pytest.raises(ExportError, match=r"pickled files \['training_args.bin'\]"):
        finish_hub_folder(folder)


def _package(root: Path, name: str, modules: dict[str, str]) -> str:
    """A package ``name`` of the given modules under ``root`` (already on sys.path)."""
    (root / name).mkdir()
    for module, source in {"__init__.py": "", **modules}.items():
        (root / name / module).write_text(source)
    return name


def test_the_assembler_refuses_a_name_two_modules_define_differently(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    package = _package(tmp_path, "conflicting", {
        "first.py": '"""First."""\nLIMIT = 1\n',
        "second.py": '"""Second."""\nfrom .first import LIMIT as FIRST_LIMIT\nLIMIT = 2\n',
        "modeling.py": '"""Model."""\nfrom .first import LIMIT\nfrom .second import FIRST_LIMIT\n',
    })
    with pytest.raises(ExportError, match="renamed imports"):
        assemble({"modeling.py": (f"{package}.modeling",)}, package)
    (tmp_path / package / "second.py").write_text('"""Second."""\nimport torch\nLIMIT = 2\n')
    (tmp_path / package / "modeling.py").write_text('"""Model."""\nfrom .first import LIMIT\nfrom .second import torch\n')
    with pytest.raises(ExportError, match="'LIMIT' is defined differently in conflicting.first and conflicting.second"):
        assemble({"modeling.py": (f"{package}.modeling",)}, package)


def test_the_assembler_keeps_code_verbatim_and_drops_relative_imports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    package = _package(tmp_path, "verbatim", {
        "config.py": '"""Config."""\nimport re\n\nPATTERN = re.compile("x")  # kept\n',
        "model.py": ('"""Model."""\nfrom .config import PATTERN\n\n\ndef run():\n    from .helpers import helper\n'
                     '    return helper(PATTERN)\n'),
        "helpers.py": '"""Helpers."""\nimport json\nimport os\n\n\ndef helper(pattern):\n    return json.dumps(pattern.pattern)\n',
    })
    files = assemble({"config.py": (f"{package}.config",), "model.py": (f"{package}.model",)}, package)
    assert 'PATTERN = re.compile("x")  # kept' in files["config.py"]
    model = files["model.py"]
    assert "from .config import PATTERN" in model and "from .helpers" not in model
    assert "import json" in model and "import os" not in model  # unused imports are not carried
    namespace = {}
    exec(compile(model.replace("from .config import PATTERN", "import re\nPATTERN = re.compile('x')"), "model", "exec"),
         namespace)
    assert namespace["run"]() == '"x"'


def test_export_arguments_in_yaml_and_command_line_form():
    """The push and base-model keys leave the arguments LLaMA-Factory parses; hub tokens never reach the card."""
    from vpt_plugin.llamafactory.export import pop_argument, without_secrets

    assert pop_argument({"export_dir": "out", "export_hub_model_id": "a/b"}, "export_hub_model_id") == ({"export_dir": "out"}, "a/b")
    assert pop_argument(["--export_dir", "out", "--export_hub_model_id", "a/b"], "export_hub_model_id") == (["--export_dir", "out"], "a/b")
    assert pop_argument(["--export_hub_model_id=a/b", "--export_dir=out"], "export_hub_model_id") == (["--export_dir=out"], "a/b")
    assert without_secrets({"export_dir": "out", "hf_hub_token": "hf_secret"}) == {"export_dir": "out"}
    assert without_secrets(["--hf_hub_token", "hf_secret", "--export_dir", "out", "--ms_hub_token=ms_secret"]) == ["--export_dir", "out"]
