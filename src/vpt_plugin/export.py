"""Hub-ready VPT models: a folder that loads wherever transformers does (``trust_remote_code``).

An exported folder holds the weights (safetensors), tokenizer, processor, generation config and
``config.json`` as ``save_pretrained`` writes them, plus what transformers needs to load the
model without vpt-plugin: the model code as one flat file (``modeling_vpt.py``: config, model
and processor classes of the model's base) named in ``auto_map``, and a model card (``README.md``). ``llamafactory-cli export`` writes one for a VPT model
(patches/llamafactory_train_tuner.py), and so does ``vpt export SRC OUT`` for any VPT
checkpoint (``vpt init``, ``vpt convert``, a training output).

Hugging Face remote code is flat sibling files; ours is a package (``branches/`` and ``bases/``
with registries, the vocabulary, generation). :func:`assemble_remote_code` builds the flat file from
the package's own source, like transformers' "modular" converter: it takes a file's root
modules and every module they import relatively, in dependency order, each module's code
verbatim except for its imports (absolute ones are gathered at the top of the file, relative
ones dropped, names from another exported file imported from it), the branch and base
auto-discovery (the branch modules and the model's base module are listed instead) and ``__all__``. It refuses two modules that define
one top-level name differently, and any code left importing ``vpt_plugin``.
"""

import ast
import importlib.util
import inspect
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

PACKAGE = "vpt_plugin"
# One file: each base module defines its config, model and processor classes together.
MODELING_FILE = "modeling_vpt.py"

# Package-internal definitions that do not travel: the branch and base auto-discovery (the
# exported file holds every branch module and the model's base module itself).
NOT_EXPORTED = {"vpt_plugin.branches": {"_import_branch_modules"}, "vpt_plugin.bases": {"_import_base_modules"}}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ExportError(ValueError):
    """The package source or the folder cannot make a Hub-ready model."""


def remote_code_roots(model_type: str) -> dict[str, tuple[str, ...]]:
    """Exported file -> the package modules it starts from (their relative imports come along)."""
    from .bases import get_base
    from .branches import BRANCHES

    branch_modules = sorted({type(branch).__module__ for branch in BRANCHES.values()})
    base_module = get_base(model_type).model_class.__module__
    outside = [name for name in branch_modules if not name.startswith(f"{PACKAGE}.branches.")]
    outside += [] if base_module.startswith(f"{PACKAGE}.bases.") else [base_module]
    if outside:
        raise ExportError(f"branches or bases defined outside {PACKAGE}.branches / .bases cannot be exported: {outside}")
    # The branches right after their registry, so the registry is full before any config is made.
    return {MODELING_FILE: (*branch_modules, base_module)}


# ---------------------------------------------------------------------------- reading modules


@dataclass
class SourceModule:
    name: str
    path: Path
    source: str
    tree: ast.Module

    @classmethod
    def load(cls, name: str) -> "SourceModule":
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ExportError(f"cannot find the source of module {name}")
        path = Path(spec.origin)
        source = path.read_text(encoding="utf-8")
        return cls(name, path, source, ast.parse(source, str(path)))

    @property
    def relative_path(self) -> str:
        """E.g. ``vpt_plugin/branches/__init__.py``."""
        package = self.name.split(".") if self.path.name == "__init__.py" else self.name.split(".")[:-1]
        return "/".join(package + [self.path.name])

    def target(self, node: ast.ImportFrom) -> str:
        """The module a relative import names."""
        package = self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]
        return importlib.util.resolve_name("." * node.level + (node.module or ""), package)

    def relative_imports(self, top_level: bool) -> list[ast.ImportFrom]:
        nodes = self.tree.body if top_level else [n for s in self.tree.body for n in ast.walk(s) if n is not s]
        found = [node for node in nodes if isinstance(node, ast.ImportFrom) and node.level > 0]
        for node in found:
            renamed = [f"{a.name} as {a.asname}" for a in node.names if a.asname and a.asname != a.name]
            if renamed:
                raise ExportError(f"{self.relative_path}:{node.lineno}: the export cannot carry renamed imports {renamed}")
        return found

    def docstring_node(self):
        first = self.tree.body[0] if self.tree.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            return first
        return None


def top_level_names(statement: ast.stmt) -> list[str]:
    """Names a top-level statement defines (imports aside)."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [statement.name]
    if isinstance(statement, ast.Assign):
        return [t.id for t in statement.targets if isinstance(t, ast.Name)]
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return [statement.target.id]
    return []


def first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators])


# ---------------------------------------------------------------------------- assembling


@dataclass
class _FlatFile:
    """One exported file being assembled."""

    name: str
    modules: list  # SourceModule, in dependency order
    imports: dict = field(default_factory=dict)  # bound name -> absolute import, hoisted to the top
    sibling_imports: dict = field(default_factory=dict)  # sibling file -> names imported from it
    local_imports: set = field(default_factory=set)  # names relatively imported from modules of this file
    definitions: dict = field(default_factory=dict)  # name -> (module name, source text)
    sections: list = field(default_factory=list)  # each module's code, in order


def assemble_remote_code(model_type: str) -> dict[str, str]:
    """The exported files (name -> source) of a VPT model type, built from this package's modules."""
    return assemble(remote_code_roots(model_type), PACKAGE)


def assemble(roots: dict[str, tuple[str, ...]], package: str) -> dict[str, str]:
    """Flat files (name -> source) from the modules of ``package``: each file holds its root modules
    and the modules they import relatively that no earlier file holds."""
    loaded: dict[str, SourceModule] = {}

    def load(name):
        if name not in loaded:
            loaded[name] = SourceModule.load(name)
        return loaded[name]

    placement: dict[str, str] = {}  # module name -> exported file holding it
    files = []
    for file_name, file_roots in roots.items():
        order = _dependency_order(file_roots, load, placement, package)
        for name in order:
            placement[name] = file_name
        files.append(_FlatFile(file_name, [load(n) for n in order]))
    for flat in files:
        for module in flat.modules:
            _add_module(flat, module, placement, package)
    texts = {}
    for flat in files:
        undefined = sorted(flat.local_imports - set(flat.definitions))
        if undefined:
            raise ExportError(f"{flat.name}: modules import {undefined}, which no module of the file defines")
        for sibling, names in flat.sibling_imports.items():
            defined = next(f.definitions for f in files if f.name == sibling)
            missing = sorted(set(names) - set(defined))
            if missing:
                raise ExportError(f"{flat.name} imports {missing} from {sibling}, which does not define them")
            clashing = sorted(set(names) & set(flat.definitions))
            if clashing:
                raise ExportError(f"{flat.name} defines {clashing} and imports them from {sibling}")
        texts[flat.name] = _render(flat)
    return texts


def _dependency_order(roots, load, placed: dict, package: str) -> list[str]:
    """Modules of one file: each after the modules it imports at module level; lazily imported ones follow."""
    order, visiting = [], set()

    def visit(name):
        if name in placed or name in order:
            return
        if not name.startswith(f"{package}.") and name != package:
            raise ExportError(f"{name} is outside {package}")
        if name in visiting:
            raise ExportError(f"import cycle through {name}")
        visiting.add(name)
        module = load(name)
        for node in module.relative_imports(top_level=True):
            visit(module.target(node))
        visiting.discard(name)
        order.append(name)
        for node in module.relative_imports(top_level=False):  # e.g. the lazy import inside generate()
            visit(module.target(node))

    for root in roots:
        visit(root)
    return order


def _add_module(flat: _FlatFile, module: SourceModule, placement: dict, package: str) -> None:
    """Gather the module's imports and definitions into ``flat``; keep its code minus what does not travel."""
    dropped_lines = set()

    def drop(node):
        dropped_lines.update(range(first_line(node), node.end_lineno + 1))

    docstring = module.docstring_node()
    if docstring is not None:
        drop(docstring)
    not_exported = NOT_EXPORTED.get(module.name, set())
    for statement in module.tree.body:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            drop(statement)
            if isinstance(statement, ast.ImportFrom) and statement.level > 0:
                continue
            _hoist(flat, module, statement, package)
        elif _calls_or_defines(statement, not_exported) or top_level_names(statement) == ["__all__"]:
            drop(statement)
        else:
            for name in top_level_names(statement):
                text = ast.get_source_segment(module.source, statement)
                if _define(flat, name, module.name, text):
                    drop(statement)  # the same definition from an earlier module
    for node in module.relative_imports(top_level=True) + module.relative_imports(top_level=False):
        drop(node)
        target_file = placement[module.target(node)]
        if target_file == flat.name:
            flat.local_imports.update(alias.name for alias in node.names)
        else:
            names = flat.sibling_imports.setdefault(target_file, [])
            names += [alias.name for alias in node.names if alias.name not in names]
    lines = module.source.splitlines()
    code = "\n".join(line for number, line in enumerate(lines, start=1) if number not in dropped_lines)
    try:
        compile(code, module.relative_path, "exec")
    except SyntaxError as error:
        raise ExportError(f"{module.relative_path}: without its imports the code is not valid Python ({error})") from error
    header = [f"# {'=' * 70} {module.relative_path}"]
    if docstring is not None:
        header += [f"# {line}".rstrip() for line in docstring.value.value.strip().splitlines()]
    flat.sections.append("\n".join(header) + "\n\n" + code.strip())


def _calls_or_defines(statement, names: set) -> bool:
    if any(name in names for name in top_level_names(statement)):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
        return getattr(statement.value.func, "id", None) in names
    return False


def _define(flat: _FlatFile, name: str, module_name: str, text: str) -> bool:
    """Record a top-level definition; True when an earlier module defined it identically."""
    if name in flat.imports:
        raise ExportError(f"{flat.name}: {module_name} defines {name!r}, which another module imports")
    if name in flat.definitions:
        other, other_text = flat.definitions[name]
        if other_text != text:
            raise ExportError(f"{flat.name}: {name!r} is defined differently in {other} and {module_name}")
        return True
    flat.definitions[name] = (module_name, text)
    return False


def _hoist(flat: _FlatFile, module: SourceModule, statement, package: str) -> None:
    """Keep an absolute import for the top of the file, refusing one name bound to two things."""
    if isinstance(statement, ast.Import):
        bound = [(alias.asname or alias.name.split(".")[0], ("import", alias.name, alias.asname)) for alias in statement.names]
    else:
        bound = [(alias.asname or alias.name, ("from", statement.module, alias.name, alias.asname)) for alias in statement.names]
    for name, spec in bound:
        if spec[1].split(".")[0] == package:
            raise ExportError(f"{module.relative_path}:{statement.lineno}: exported code cannot import {package}")
        if name in flat.definitions:
            raise ExportError(f"{flat.name}: {module.name} imports {name!r}, which {flat.definitions[name][0]} defines")
        if flat.imports.get(name, spec) != spec:
            raise ExportError(f"{flat.name}: {name!r} is imported from two places ({flat.imports[name]} and {spec})")
        flat.imports[name] = spec


def _render(flat: _FlatFile) -> str:
    body = "\n\n\n".join(flat.sections)
    used = {node.id for node in ast.walk(ast.parse(body)) if isinstance(node, ast.Name)}
    used |= {n for names in flat.sibling_imports.values() for n in names}
    plain, from_imports = set(), {}
    for name, spec in flat.imports.items():
        if name not in used:
            continue  # e.g. importlib and pkgutil, which only the branch auto-discovery used
        if spec[0] == "import":
            plain.add((spec[1], f"import {spec[1]}" + (f" as {spec[2]}" if spec[2] else "")))
        else:
            from_imports.setdefault(spec[1], []).append(spec[2] + (f" as {spec[3]}" if spec[3] else ""))
    absolute = sorted(plain | {(module, _from_import(module, names)) for module, names in from_imports.items()},
                      key=lambda item: (item[0].lower(), item[1]))
    imports = "\n".join(line for _, line in absolute)
    if flat.sibling_imports:
        imports += "\n\n" + "\n".join(_from_import(f".{f[:-3]}", names) for f, names in flat.sibling_imports.items())
    sources = ", ".join(module.relative_path for module in flat.modules)
    # The purpose is that of the module the file is named after (modeling_vpt.py: vpt_plugin.modeling_vpt).
    named_after = [m for m in flat.modules if m.name.rpartition(".")[2] == flat.name.removesuffix(".py")]
    summary = named_after[0].docstring_node().value.value.strip().splitlines()[0] if named_after else "Model code."
    docstring = (
        f'"""{summary}\n\n'
        f"Generated by vpt_plugin.export (vpt-plugin) from {sources}.\n"
        'Change those modules and export again rather than editing this file.\n"""'
    )
    text = re.sub(r"\n{4,}", "\n\n\n", docstring + "\n\n" + imports + "\n\n\n" + body + "\n")
    compile(text, flat.name, "exec")  # a SyntaxError here is a bug of the assembler, not of the sources
    return text


def _from_import(module: str, names: list[str]) -> str:
    line = f"from {module} import {', '.join(sorted(names))}"
    if len(line) <= 110:
        return line
    return f"from {module} import (\n" + "".join(f"    {name},\n" for name in sorted(names)) + ")"


# ---------------------------------------------------------------------------- the folder


def vpt_model_classes() -> dict[str, tuple[str, str]]:
    """``model_type`` -> (config class name, model class name) of every VPT model type."""
    from .bases import BASES

    return {model.config_class.model_type: (model.config_class.__name__, model.__name__)
            for base in BASES.values() for model in base.model_classes}


def finish_hub_folder(folder, base_model: str | None = None, recipe: str | None = None, made_by: str = "",
                      repo_id: str | None = None) -> Path:
    """Make a saved VPT model folder Hub-ready, in place.

    ``folder`` holds what ``save_pretrained`` wrote for the model and its processor. Adds the model
    code and ``auto_map`` (config, model, processor) and the model card. ``base_model``: the Hub id
    the model derives from (card metadata); ``recipe``: the arguments that made the folder (card);
    ``made_by``: how it was exported (card); ``repo_id``: where it will be pushed (card snippet).
    """
    folder = Path(folder)
    config = _read_json(folder / "config.json", "the model's config.json (save the model first)")
    classes = vpt_model_classes()
    if config.get("model_type") not in classes:
        raise ExportError(
            f"{folder}: model_type {config.get('model_type')!r} is not a VPT model ({', '.join(classes)}); "
            "only VPT models export with VPT model code"
        )
    if not (folder / "processor_config.json").is_file():
        raise ExportError(f"{folder}: no processor_config.json: a VPT model exports with its processor "
                          "(tokenizer and image processor)")
    pickled = sorted(path.name for path in folder.iterdir() if path.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ExportError(f"{folder}: pickled files {pickled}; a Hub-ready folder holds safetensors weights only")
    if not any(folder.glob("*.safetensors")):
        raise ExportError(f"{folder}: no *.safetensors weights")

    from .bases import get_base

    for name, text in assemble_remote_code(config["model_type"]).items():
        (folder / name).write_text(text, encoding="utf-8")
    config_class, model_class = classes[config["model_type"]]
    code = MODELING_FILE[:-3]
    config["auto_map"] = {"AutoConfig": f"{code}.{config_class}", "AutoModelForImageTextToText": f"{code}.{model_class}"}
    _write_json(folder / "config.json", config)

    processor_class = get_base(config["model_type"]).processor_class
    processor = processor_class.from_pretrained(folder)
    processor.save_pretrained(folder)
    processor_config = _read_json(folder / "processor_config.json", "processor_config.json")
    processor_config["auto_map"] = {"AutoProcessor": f"{code}.{processor_class.__name__}"}
    _write_json(folder / "processor_config.json", processor_config)

    if base_model is None:
        logger.warning("model card of %s without base_model: the source is a local directory; name the Hub model it "
                       "derives from (vpt export --base-model, or export_base_model for llamafactory-cli export)", folder)
    card = model_card(config, base_model, recipe, made_by, repo_id or folder.name)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ExportError(f"{path.parent}: no {what}")
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def hub_id_of(source: str | None) -> str | None:
    """The Hub id a model was loaded from: the id itself, or the repository of a Hub cache snapshot."""
    if not source:
        return None
    cached = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", str(source))
    if cached:
        return f"{cached[1]}/{cached[2]}"
    if Path(source).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        return None
    return str(source)


def push_hub_folder(folder, repo_id: str, token: str | None = None) -> str:
    """Push a finished folder to the Hub in one commit; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, token=token, exist_ok=True)
    commit = upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                           commit_message="Upload VPT model (vpt-plugin export)")
    return commit.commit_url


def export_checkpoint(src: str, out, base_model: str | None = None, hub_model_id: str | None = None) -> Path:
    """``vpt export``: a VPT checkpoint (directory or Hub id) -> a Hub-ready folder; pushed with ``hub_model_id``."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

    from .configuration_vpt import VPTConfigMixin

    out = Path(out)
    if Path(src).exists() and out.resolve() == Path(src).resolve():
        raise ExportError(f"{out}: the export goes to another folder than its source")
    config = AutoConfig.from_pretrained(src)
    if not isinstance(config, VPTConfigMixin):
        raise ExportError(f"{src}: model_type {config.model_type!r} is not a VPT model ({', '.join(vpt_model_classes())})")
    processor = AutoProcessor.from_pretrained(src)
    if not isinstance(processor, ProcessorMixin):
        raise ExportError(f"{src}: no processor (processor_config.json); a VPT model exports with its processor")
    model = AutoModelForImageTextToText.from_pretrained(src, dtype="auto")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    base_model = base_model or hub_id_of(src)
    finish_hub_folder(out, base_model, made_by=f"`vpt export {src}`", repo_id=hub_model_id)
    if hub_model_id:
        push_hub_folder(out, hub_model_id)
    return out


# ---------------------------------------------------------------------------- the model card


LICENSE = "apache-2.0"  # vpt-plugin's, and that of most Qwen-VL bases (not Qwen2.5-VL-3B's)


def model_card(config: dict, base_model: str | None, recipe: str | None, made_by: str, repo_id: str) -> str:
    """README.md of an exported folder: Hub metadata, what VPT is, this model's tokens, usage, recipe."""
    from transformers import __version__ as transformers_version

    from .bases import get_base
    from .branches import get_branch
    from .vocabulary import REENCODING_PROMPT, REGION_END, REGION_PROMPT, REGION_START, X_TOKENS, Y_TOKENS

    base = get_base(config["model_type"])
    metadata = {
        **({"base_model": base_model} if base_model else {}),
        "license": LICENSE,
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["visual-perception-tokens", "vpt", base.model_type.replace("_", "-"), "custom_code"]
        + (["llama-factory"] if "LLaMA-Factory" in made_by else []),
    }
    tokens = [
        f"- Region Selection: `{REGION_START}`, `{X_TOKENS[0]}` .. `{X_TOKENS[-1]}`, `{Y_TOKENS[0]}` .. "
        f"`{Y_TOKENS[-1]}`, `{REGION_END}`: a box on the 8x8 grid; the image is cropped there and shown again."
    ]
    for name in config.get("vision_encoder_ls", []):
        branch = get_branch(name)
        ids = ", ".join(f"`{key}` {config.get(key)}" for key in branch.tokens.config_id_keys)
        summary = inspect.getmodule(type(branch)).__doc__.strip().splitlines()[0].replace("``", "`")
        tokens.append(f"- Vision Re-Encoding, branch `{name}`: `{branch.tokens.action_sequence}`, then the image as "
                      f"`{branch.tokens.image_pad}` tokens ({ids}). {summary}")
    if config.get("num_inner_forward_run") != 2:
        tokens.append("- This is an alignment-stage model (one pass): its branches are not yet conditioned on the "
                      "model's state, and it does not act on Vision Re-Encoding tokens.")
    derived = f" It derives from [{base_model}](https://huggingface.co/{base_model})." if base_model else ""
    made = f"Exported with {made_by}."
    if recipe:
        made = f"Exported with {made_by} from these arguments:\n\n```yaml\n{recipe.strip()}\n```"
    front_matter = yaml.safe_dump(metadata, sort_keys=False)
    return f"""---
{front_matter}---

# {repo_id}

A {base.name} model with **Visual Perception Tokens** (VPT; Yu, Ma, Wang, ICCV 2025,
[arXiv 2502.17425](https://arxiv.org/abs/2502.17425)).{derived} Before it
answers, the model may write tokens that ask for a second look at the image: **Region Selection**
tokens name a box on an 8x8 grid, which is cropped and shown again; **Vision Re-Encoding** tokens
send their hidden state to a vision branch, whose projector re-weights that branch's features of
the image. The model then answers with the extra perception in view.

## Tokens of this model

{chr(10).join(tokens)}

## Ask a question

The model code comes with this folder (`trust_remote_code=True`); it needs transformers
{transformers_version} and torch, not vpt-plugin. `generate` runs the whole VPT loop in one call:
it decodes, performs the perception the model asks for on `vpt_images`, and decodes the answer.

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

image = Image.open("photo.jpg").convert("RGB")
question = "What is written on the sign? {REGION_PROMPT}"
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[prompt], images=[image], return_tensors="pt")
out = model.generate(**inputs, processor=processor, vpt_images=[image], max_new_tokens=128, do_sample=False,
                     return_dict_in_generate=True)
print(processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(out.traces[0])  # the perception it asked for: kind, tokens, grid and pixel boxes
```

As in the published data, a question followed by "{REGION_PROMPT}" asks for Region
Selection, and one followed by "{REENCODING_PROMPT}" for Vision Re-Encoding.
`allow_perception=False` answers without VPT. With vpt-plugin installed (`import vpt_plugin`), the
same folder loads without `trust_remote_code`.

## How it was made

{made}

## Files

`{MODELING_FILE}` (config, model and processor classes) is generated from vpt-plugin's modules (it
names its sources); the weights are safetensors. The license field is vpt-plugin's; a model made from a
base under another license (Qwen2.5-VL-3B-Instruct's, for one) takes that one.
"""
