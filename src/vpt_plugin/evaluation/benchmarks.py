"""High-resolution multiple-choice benchmarks: V* Bench, HR-Bench 4K/8K, MME-RealWorld (and Lite).

The benchmarks today's "look closer" systems report (DeepEyes, Mini-o3, Chain-of-Focus, Pixel
Reasoner, ZoomEye), read from the files their hub datasets hold, as the user downloads them:

- V* Bench (``craigwu/vstar_bench``): ``test_questions.jsonl`` (``image``, ``text``, ``label``,
  ``category``, ``question_id``); the options are lines ``(A) ...`` of ``text``, the label a letter.
  Categories ``direct_attributes`` (attribute) and ``relative_position`` (spatial); overall accuracy
  over all questions, as V*'s and DeepEyes' evaluations count it.
- HR-Bench (``DreamMr/HR-Bench``): ``hr_bench_4k.tsv`` / ``hr_bench_8k.tsv`` or their ``.parquet``
  twins (``index``, ``question``, ``answer``, ``category``, ``A``..``D``, ``cycle_category``, ``image``
  base64). Categories ``single`` and ``cross`` (FSP and FCP); overall is their mean. Each question
  appears once per option order (``cycle_category``); HR-Bench averages accuracy over those groups,
  which equals the mean over rows when the groups are of one size, as in the released files.
- MME-RealWorld (``yifanzhang114/MME-RealWorld``, ``-Lite``): ``MME_RealWorld.json`` /
  ``MME-RealWorld-Lite.json`` (``Question_id``, ``Image``, ``Text``, ``Answer choices`` as ``(A) ...``,
  ``Ground truth``, ``Task``, ``Subtask``, ``Category``) with its image folders; or the base64 TSV
  of ``MME-RealWorld-Base64`` (``index``, ``image``, ``question``, ``multi-choice options``,
  ``answer``, ``category``, ``l2-category``). Categories: ``Task/Subtask`` (Perception or
  Reasoning, five subtasks); overall accuracy over all questions, as its own evaluation counts it.

Each question becomes an evaluation item: the prompt the benchmark's evaluators use (stated per
benchmark in :data:`PROMPTS`), the image's path (base64 images are written once to a cache folder),
the options and the reference letter. :func:`extract_choice` reads the letter from an answer.
"""

import base64
import csv
import hashlib
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..dataset import VPTDataError

LETTERS = "ABCDE"

# The prompts the benchmarks' evaluators use ({question}, {options}: one line per option).
PROMPTS = {
    # V*'s test_questions.jsonl text, verbatim: the question, "(A) ..." lines and this instruction.
    "vstar": "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
    # lmms-eval's and ZoomEye's HR-Bench prompt.
    "hrbench": "{question}\n{options}\nAnswer the option letter directly.",
    # MME-RealWorld's README prompt.
    "mme_realworld": ("{question} The choices are listed below:\n{options}\nSelect the best answer to the above "
                      "multiple-choice question based on the image. Respond with only the letter (A, B, C, D, or E) "
                      "of the correct option.\nThe best answer is:"),
}
OPTION_LINE = {"vstar": "({letter}) {text}", "hrbench": "{letter}. {text}", "mme_realworld": "({letter}) {text}"}
OVERALL = {"vstar": "micro", "hrbench": "category_mean", "mme_realworld": "micro"}
CATEGORY_NAMES = {"direct_attributes": "attribute", "relative_position": "spatial"}
LETTERED_OPTION = re.compile(r"^\(([A-E])\)\s*(.+)$")  # "(A) red", as V* and MME-RealWorld write options


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its format (a :data:`PROMPTS` key), the hub dataset it comes from and the file in it."""

    name: str
    format: str
    hub_id: str
    file: str  # inside the download: the question file

    def locate(self, local: Path | None) -> Path:
        """The question file: under ``local`` (a download of the hub dataset) if given, else from the Hub."""
        if local is not None:
            path = Path(local) / self.file
            if not path.is_file():
                raise VPTDataError(f"benchmark {self.name}: {path} not found; download {self.hub_id} there "
                                   f"(huggingface-cli download --repo-type dataset {self.hub_id} --local-dir {local})")
            return path
        from huggingface_hub import hf_hub_download, snapshot_download

        if self.format == "vstar":  # the images are files beside the questions
            return Path(snapshot_download(self.hub_id, repo_type="dataset")) / self.file
        if self.file.endswith(".tsv"):  # one file, images inside
            return Path(hf_hub_download(self.hub_id, self.file, repo_type="dataset"))
        raise VPTDataError(f"benchmark {self.name}: its images come as archives; download {self.hub_id}, extract "
                           "it and give the folder (benchmark_dir, --benchmark-dir)")


BENCHMARKS = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark("vstar", "vstar", "craigwu/vstar_bench", "test_questions.jsonl"),
        Benchmark("hrbench_4k", "hrbench", "DreamMr/HR-Bench", "hr_bench_4k.tsv"),
        Benchmark("hrbench_8k", "hrbench", "DreamMr/HR-Bench", "hr_bench_8k.tsv"),
        Benchmark("mme_realworld", "mme_realworld", "yifanzhang114/MME-RealWorld", "MME_RealWorld.json"),
        Benchmark("mme_realworld_lite", "mme_realworld", "yifanzhang114/MME-RealWorld-Lite", "data/MME-RealWorld-Lite.json"),
        # The same questions with base64 images in one file (VLMEvalKit's layout): from the Hub directly.
        Benchmark("mme_realworld_lite_tsv", "mme_realworld", "yifanzhang114/MME-RealWorld-Base64", "mme_realworld_lite.tsv"),
    )
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise VPTDataError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def prompt_of(format: str, question: str, options: dict[str, str]) -> str:
    lines = "\n".join(OPTION_LINE[format].format(letter=letter, text=text) for letter, text in options.items())
    return PROMPTS[format].format(question=question.strip(), options=lines)


def load_items(benchmark: Benchmark, path: Path, image_cache: Path, limit: int | None = None) -> list[dict]:
    """The benchmark's questions as evaluation items: ``index``, ``question`` (the prompt), ``image``,
    ``options`` (letter -> text), ``reference`` (the letter), ``category``."""
    read = {"vstar": _vstar_rows, "hrbench": _hrbench_rows, "mme_realworld": _mme_realworld_rows}[benchmark.format]
    items = []
    for index, (question, options, answer, category, image) in enumerate(read(Path(path), Path(image_cache))):
        where = f"{path}, row {index}"
        if answer not in options:
            raise VPTDataError(f"{where}: the answer {answer!r} is not one of the options {sorted(options)}")
        items.append({"index": index, "question": prompt_of(benchmark.format, question, options), "image": image,
                      "options": options, "reference": answer, "category": category})
        if limit and len(items) == limit:
            break
    return items


def _vstar_rows(path: Path, image_cache: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        where = f"{path}, line {number + 1}"
        _require(row, ("image", "text", "label", "category"), where)
        stem, options = [], {}
        for text_line in row["text"].splitlines():
            option = LETTERED_OPTION.match(text_line.strip())
            if option:
                options[option[1]] = option[2].strip()
            elif not options:
                stem.append(text_line)
        if not options:
            raise VPTDataError(f"{where}: text has no '(A) ...' option lines")
        image = path.parent / row["image"]
        if not image.is_file():
            raise VPTDataError(f"{where}: image {row['image']} not found under {path.parent}")
        yield "\n".join(stem), options, row["label"].strip(), CATEGORY_NAMES.get(row["category"], row["category"]), str(image)


def _hrbench_rows(path: Path, image_cache: Path):
    images = {}  # row index -> cached image path
    for number, row in enumerate(_table_rows(path)):
        where = f"{path}, row {number}"
        _require(row, ("index", "question", "answer", "category", "image"), where)
        options = {letter: str(row[letter]) for letter in "ABCD" if row.get(letter) not in (None, "")}
        image = _row_image(row, images, image_cache, where)
        yield row["question"], options, str(row["answer"]).strip(), row["category"], image


def _mme_realworld_rows(path: Path, image_cache: Path):
    if path.suffix == ".tsv":
        images = {}
        for number, row in enumerate(_table_rows(path)):
            where = f"{path}, row {number}"
            _require(row, ("index", "question", "multi-choice options", "answer", "category", "image"), where)
            image = _row_image(row, images, image_cache, where)
            category = f"{row.get('l2-category') or row['category']}"
            yield (row["question"], _lettered(row["multi-choice options"], where), str(row["answer"]).strip(),
                   category, image)
        return
    rows = json.loads(path.read_text(encoding="utf-8"))
    for number, row in enumerate(rows):
        where = f"{path}, row {number}"
        _require(row, ("Image", "Text", "Answer choices", "Ground truth", "Task", "Subtask"), where)
        image = path.parent / row["Image"]
        if not image.is_file():
            image = path.parent / "imgs" / row["Image"]  # the Lite download keeps them in data/imgs/
        if not image.is_file():
            raise VPTDataError(f"{where}: image {row['Image']} not found under {path.parent}")
        yield (row["Text"], _lettered(row["Answer choices"], where), row["Ground truth"].strip(),
               f"{row['Task']}/{row['Subtask']}", str(image))


def _lettered(choices, where: str) -> dict[str, str]:
    """``["(A) red", "(B) blue"]`` -> ``{"A": "red", "B": "blue"}``. A TSV gives the list as JSON text, or as
    one text with an option per line (``"The choices are listed below:\n(A) red\n(B) blue"``)."""
    if isinstance(choices, str):
        choices = json.loads(choices) if choices.lstrip().startswith("[") else choices.splitlines()
    options = {}
    for choice in choices:
        found = LETTERED_OPTION.match(str(choice).strip())
        if found:
            options[found[1]] = found[2].strip()
    if not options:
        raise VPTDataError(f"{where}: no answer choices written '(X) text' in {choices!r}")
    return options


def _table_rows(path: Path):
    """Rows of a TSV (base64 images make fields far longer than csv's default limit) or a parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as parquet

        for batch in parquet.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()
        return
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as file:
        yield from csv.DictReader(file, delimiter="\t")


# VLMEvalKit's TSVs write a repeated image once: other rows hold the index of the row that has it.
_IMAGE_REFERENCE_LENGTH = 64


def _row_image(row: dict, images: dict, image_cache: Path, where: str) -> str:
    """The cached image of a TSV row (``images``: row index -> path, of the rows read so far)."""
    data = str(row["image"])
    if len(data) <= _IMAGE_REFERENCE_LENGTH:
        if data not in images:
            raise VPTDataError(f"{where}: image: {data!r} names row {data}, which holds no image before this row")
        path = images[data]
    else:
        path = _cached_image(data, image_cache / str(row["index"]), where)
    images[str(row["index"])] = path
    return path


def _cached_image(data: str, stem: Path, where: str) -> str:
    """A base64 image written once to ``stem`` + its format's suffix; its path."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    found = [path for path in stem.parent.glob(stem.name + ".*") if not path.name.endswith(".partial")]
    if found:
        return str(found[0])
    try:
        raw = base64.b64decode(data, validate=False)
        suffix = "." + Image.open(io.BytesIO(raw)).format.lower()
    except (ValueError, OSError) as error:
        raise VPTDataError(f"{where}: image: not a base64 image ({error})") from error
    path = stem.with_suffix(suffix)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(raw)
    partial.replace(path)  # a kill mid-write leaves no truncated image behind
    return str(path)


def _require(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in row]
    if missing:
        raise VPTDataError(f"{where}: missing fields {missing}")


# ----------------------------------------------------------------------------- the answer's letter

_MARKUP = re.compile(r"\*\*|</?answer>|<\|[^|>]*\|>")  # bold, answer tags, special tokens
_PREFIXES = re.compile(r"^(?:the\s+)?(?:best\s+|correct\s+|final\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*",
                       re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\(?([A-E])\)?(?:[.:)\]]|\s*$)")
_LEADING_CLAIM = re.compile(r"^\(?([A-E])\)?\s+is\b")  # "B is correct"
_STATED_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*\(?([A-E])\)?(?!\w)")
_MARKED_LETTER = re.compile(r"(?:\(([A-E])\))|(?:\b([A-E])[.:)\]](?!\w))")
_TRAILING_LETTER = re.compile(r"(?:^|\s)\(?([A-E])\)?[.!]?$")  # "I think it's B"


def extract_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer names, or None when it names none or several.

    The rule, in order (the answer is the final turn: after a perception round, the text of the
    turn that answers; option letters are read in capitals only, as VLMEvalKit reads them):
    1. Markup is dropped (``**``, ``<answer>`` tags, special tokens), then leading phrases "The
       answer is", "Best answer:", "Option", ...
    2. The answer starts with a letter of the options alone or marked: ``B``, ``(B)``, ``B.``,
       ``B)``, ``B:`` -> that letter, unless another letter is marked later ("(A) or (B)": None);
       also ``B`` followed by that option's text, and ``B is ...``.
    3. A letter stated anywhere ("so the answer is (B)", "My answer: B"): exactly one distinct -> it.
    4. The answer, or a phrase within it, is the text of exactly one option (case, articles and
       punctuation ignored; whole words) -> that option; when several match and one of them holds
       all the others ("dark red" and "red"), that one; otherwise None.
    5. Letters marked anywhere (``(B)``, ``B.``): exactly one distinct -> it; several -> None.
    6. A letter standing alone at the end ("I think it's B"), the only one standing alone -> it.
    A bare capital inside a sentence ("A red bag") is not read as a choice.
    """
    text = _PREFIXES.sub("", _MARKUP.sub("", answer).strip()).strip()
    marked = {a or b for a, b in _MARKED_LETTER.findall(text)} & set(options)
    leading = _LEADING_LETTER.match(text)
    if leading and leading[1] in options:
        return leading[1] if marked <= {leading[1]} else None
    first_word = re.match(r"^\(?([A-E])\)?\s+(.+)$", text, re.DOTALL)
    if first_word and first_word[1] in options and _normal(first_word[2]) == _normal(options[first_word[1]]):
        return first_word[1]
    claim = _LEADING_CLAIM.match(text)
    if claim and claim[1] in options:
        return claim[1]
    stated = set(_STATED_LETTER.findall(text)) & set(options)
    if len(stated) == 1:
        return stated.pop()
    if stated:
        return None
    said = _normal(text)
    exact = [letter for letter, option in options.items() if _normal(option) == said]
    if len(exact) == 1:
        return exact[0]
    within = [letter for letter, option in options.items()
              if _normal(option) and re.search(rf"(?:^| ){re.escape(_normal(option))}(?: |$)", said)]
    holding_all = [letter for letter in within
                   if all(_normal(options[other]) in _normal(options[letter]) for other in within)]
    if len(within) == 1 or len(holding_all) == 1:
        return (within if len(within) == 1 else holding_all)[0]
    if within:
        return None
    if len(marked) == 1:
        return marked.pop()
    if marked:
        return None
    trailing = _TRAILING_LETTER.search(text)
    alone = set(re.findall(r"(?<!\w)([A-E])(?!\w)", text)) & set(options)
    return trailing[1] if trailing and alone == {trailing[1]} else None


def _normal(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(word for word in words if word not in ("a", "an", "the"))


def multiple_choice_scores(predictions: list[dict], format: str) -> dict:
    """Accuracy (``metric_mean``), per category, and how many answers named no single option."""
    per_category: dict[str, list[int]] = {}
    unreadable = 0
    for prediction in predictions:
        chosen = extract_choice(prediction["answer"], prediction["options"])
        unreadable += chosen is None
        per_category.setdefault(prediction["category"], []).append(int(chosen == prediction["reference"]))
    categories = {name: sum(hits) / len(hits) for name, hits in sorted(per_category.items())}
    hits = [hit for values in per_category.values() for hit in values]
    overall = (sum(categories.values()) / len(categories) if OVERALL[format] == "category_mean" and categories
               else sum(hits) / len(hits) if hits else None)
    return {"metric": "multiple_choice_accuracy", "metric_mean": overall, "overall": OVERALL[format],
            "categories": categories, "category_items": {k: len(v) for k, v in sorted(per_category.items())},
            "no_choice": unreadable}


def image_cache_for(output_dir: Path, benchmark: Benchmark, path: Path) -> Path:
    """Where a benchmark's base64 images are written: one folder per question file (by its path)."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
    return Path(output_dir) / "images" / f"{benchmark.name}-{digest}"
