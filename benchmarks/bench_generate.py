"""Answer latency and throughput of VPT generation against plain Qwen2-VL and the re-read flow (issue 5).

Three ways to answer the same prompt (user turn: image + question + the published request
prompt), per kind of perception (``region``, ``clip``, ``dino``, ``sam``):

``plain``
    transformers' ``Qwen2VLForConditionalGeneration.generate`` on the VPT model's own base
    modules (``common.plain_twin``: same weights), greedy, answering directly.
``ours``
    the VPT model's one-call loop, ``model.generate(..., processor=processor, vpt_images=...)``:
    round 1 writes the perception tokens, the loop crops or runs the branch, appends the
    perception turn to round 1's cache and decodes the answer.
``reread``
    ``vpt_plugin.generation.two_round_reference``, the published evaluation's flow: round 1,
    then round 2 re-read from scratch through the two-pass ``model.forward`` at every step, one
    row at a time (a batch is answered row after row).

A random tiny model writes junk, so a ``LogitsProcessor`` (:class:`FixedTurns`, adapted from
``tests/scripted.py``) makes every path do the same work: it forces round 1 of the VPT paths to
the kind's tokens (``<|B_action_start|>``, after which the loop writes ``<|B_action|><|B_action_end|>``
itself, or a region ``<|region_token_start|><|x_2|><|y_5|><|x_4|><|y_6|><|region_token_end|><|im_end|>``)
and bans the end-of-turn and padding tokens everywhere else, so every answer (plain's too) is
exactly ``--answer-tokens`` tokens, cut by ``max_new_tokens``. The script checks that each
answer has that length, that each VPT row took one perception of the intended kind, and that
ours and reread give the same answer tokens (greedy decoding).

The physical limit of a kind is plain's call plus one forward of the perception's encoder alone,
batched as the loop batches it: the model's ViT on every row's crop (region, the crops the loop
made) or on every row's branch image (clip), the DINOv2 or SAM encoder on every row's image. What
the loop costs beyond it is round 1's few tokens, reading the perception turn, and overhead.

Figures: batch-size-1 latency (median wall seconds of one ``generate`` call, prompt to answer)
and batched throughput (answer tokens per second for ``--batch-size`` different prompts in one
call; reread answers them one by one). Each case is first called once untimed by the checks
(its warm-up; ``--warmup`` adds rounds), then timed round-robin, median of ``--repeats``
(``--reread-repeats`` for the re-read flow; 0: its checking call is its figure, cold costs included;
the table shows every case's checking call beside its figure, so their size can be read). On CUDA,
decode MFU = 2 x LLM FLOP params x answer tokens / time / GPU bf16 peak (the prompt, round 1 and
the perception turn are extra work not counted).

Lines printed last, one ``name: value`` each: the batched means over the kinds, each kind's
``answer_over_limit_<kind>_b<n>``, the batch-1 means, then the headlines ``answer_over_plain_<kind>``
(ours / plain at batch 1) and ``reread_over_ours_b1`` / ``reread_over_ours_b<batch>`` (reread / ours,
the worst kind).

Examples::

    .venv/bin/python benchmarks/bench_generate.py --quick          # < 1 minute on CPU (no report unless --report)
    .venv/bin/python benchmarks/bench_generate.py --threads 2      # proportional shape, ~14 minutes; writes the report
    .venv/bin/python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --shape 2b
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

KINDS = ("region", "clip", "dino", "sam")
CPU_NOTE = {
    "tiny": "Run on CPU, without a GPU (none was available in the session that produced these figures): tiny-model "
            "CPU figures, where per-call Python overhead weighs far more than on a GPU with a real model. The CPU was "
            "shared with other work; the round-robin medians are the figures to read.",
    "2b": "Run on CPU, without a GPU (none was available in the session that produced these figures), on the widths of "
          "the 2B model and its encoders: each call's compute is in the proportions of a GPU run, not its per-call "
          "overheads.",
}
REGION_TURN = "<|region_token_start|><|x_2|><|y_5|><|x_4|><|y_6|><|region_token_end|><|im_end|>"


# ---------------------------------------------------------------------------- fixed turns


class FixedTurns(LogitsProcessor):
    """Forces the first tokens of scripted assistant turns; elsewhere bans ``banned`` (end of turn, padding).

    Adapted from ``tests/scripted.py``: a prompt is recognised by its token ids (left padding
    stripped), the assistant turn being decoded is counted by its ``<|im_start|>assistant\\n``
    headers, and ``scripts[prompt][turn]`` gives the token ids that turn must start with. Both
    generation paths pass the full token history, so both are scripted alike.
    """

    def __init__(self, tokenizer, banned: list[int]):
        self.tokenizer = tokenizer
        self.pad = tokenizer.pad_token_id
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.banned = sorted(set(banned))
        self.scripts = []  # (prompt ids, {turn: token ids})

    def add(self, prompt_ids: list[int], turns: dict[int, str]) -> None:
        encoded = {turn: self.tokenizer.encode(text, add_special_tokens=False) for turn, text in turns.items()}
        self.scripts.append((list(prompt_ids), encoded))

    def __call__(self, input_ids, scores):
        for b, row in enumerate(input_ids.tolist()):
            start = 0
            while start < len(row) and row[start] == self.pad:
                start += 1
            row = row[start:]
            turns = next((t for prompt, t in self.scripts if row[: len(prompt)] == prompt), {})
            n = len(self.header)
            starts = [i + n for i in range(len(row) - n + 1) if row[i : i + n] == self.header]
            script = turns.get(len(starts) - 1, []) if starts else []
            step = len(row) - starts[-1] if starts else 0
            if step < len(script):
                scores[b] = float("-inf")
                scores[b, script[step]] = 0.0
            else:
                scores[b, self.banned] = float("-inf")
        return scores


# ---------------------------------------------------------------------------- prompts


def kind_prompt(kind: str) -> str:
    from vpt_plugin.vocabulary import REENCODING_PROMPT, REGION_PROMPT

    return REGION_PROMPT if kind == "region" else REENCODING_PROMPT


def first_turn(kind: str) -> str:
    from vpt_plugin.branches import get_branch

    return REGION_TURN if kind == "region" else get_branch(kind).tokens.action_start


def prompts(processor, config, kind: str, count: int, question_words: int, image_side: int, seed: int):
    """``count`` prompts (different questions and images) for ``kind``: (batch inputs, prompt ids, images)."""
    from vpt_plugin.conversation import collate_prompts, encode_conversation

    encoded, images = [], []
    for i in range(count):
        rng = random.Random(seed * 1000 + i)
        image = common.shape_image(seed * 1000 + i, image_side)
        question = common.words(rng, question_words + rng.randint(0, 3))
        messages = [{"role": "user", "content": f"<image>{question}? {kind_prompt(kind)}"}]
        encoded.append(encode_conversation(processor, config, messages, images=[image], add_generation_prompt=True))
        images.append(image)
    batch = collate_prompts(encoded, processor.tokenizer.pad_token_id)
    return batch, [e["input_ids"] for e in encoded], images


# ---------------------------------------------------------------------------- the three paths


@dataclass
class Case:
    kind: str
    path: str  # plain, ours, reread
    batch: int
    run: object = None
    times: list = field(default_factory=list)
    prompt_tokens: int = 0  # of the first row
    images: list = field(default_factory=list)  # the rows' images
    first_call: float | None = None  # the checking call's wall time (on CPU the device needs no sync)

    @property
    def median(self) -> float:
        return common.median(self.times)


def make_cases(vpt, plain, processor, args, kind: str, batch_size: int, device) -> list[Case]:
    from vpt_plugin.generation import PerceptionInputs, two_round_reference

    tokenizer = processor.tokenizer
    eos = vpt.generation_config.eos_token_id
    banned = [eos] if isinstance(eos, int) else list(eos)
    banned.append(tokenizer.pad_token_id)
    batch, prompt_ids, images = prompts(processor, vpt.config, kind, batch_size, args.question_words, args.image_side,
                                        args.seed)
    vpt_script = FixedTurns(tokenizer, banned)
    for ids in prompt_ids:
        vpt_script.add(ids, {0: first_turn(kind)})
    plain_script = FixedTurns(tokenizer, banned)  # no scripted turn: the answer, end of turn banned
    n = args.answer_tokens
    inputs = {k: v.to(device) for k, v in batch.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(vpt.dtype)
    mm_types = (inputs["input_ids"] == vpt.config.image_token_id).int()
    length = inputs["input_ids"].shape[1]
    perception = PerceptionInputs(processor)
    grids = batch["image_grid_thw"]
    pixels = torch.split(batch["pixel_values"], [int(g.prod()) for g in grids])

    def run_plain():
        out = plain.generate(**inputs, mm_token_type_ids=mm_types, max_new_tokens=n, do_sample=False,
                             logits_processor=LogitsProcessorList([plain_script]))
        return [row[length:] for row in out.tolist()]

    def run_ours():
        out = vpt.generate(**inputs, processor=processor, vpt_images=images, max_new_tokens=n, do_sample=False,
                           logits_processor=LogitsProcessorList([vpt_script]), return_dict_in_generate=True)
        return [row[length:] for row in out.sequences.tolist()], out.traces

    def run_reread():
        answers, traces = [], []
        for b in range(batch_size):
            answer, trace = two_round_reference(
                vpt, perception, torch.tensor([prompt_ids[b]], device=device),
                pixels[b].to(device, vpt.dtype), grids[b : b + 1].to(device), images[b], n, set(banned[:1]),
                logits_processor=LogitsProcessorList([vpt_script]))
            answers.append(answer)
            traces.append(trace.to_dict())
        return answers, traces

    return [Case(kind, path, batch_size, run, prompt_tokens=len(prompt_ids[0]), images=images)
            for path, run in (("plain", run_plain), ("ours", run_ours), ("reread", run_reread))]


def encoder_run(vpt, processor, kind: str, images, traces, device):
    """The perception's encoder work alone, batched as the one-call loop batches it (see the module docstring)."""
    from vpt_plugin.branches import get_branch
    from vpt_plugin.generation import PerceptionInputs

    perception = PerceptionInputs(processor)
    if kind == "region":
        crops = [image.crop(tuple(box)) for image, trace in zip(images, traces) for box in trace["rounds"][0]["pixel_boxes"]]
        pixels, grids = perception.crop_inputs(crops)
        pixels, grids = pixels.to(device, vpt.dtype), grids.to(device)
        return lambda: vpt.encode_base_images(pixels, grids)
    branch = get_branch(kind)
    inputs = {k: v.to(device) for k, v in branch.preprocess(perception.branch_images(kind, images), processor).items()}
    return lambda: branch.encode(vpt, inputs)


def timed_call(case: Case):
    """``case.run()``, its wall time kept as ``case.first_call`` (the figure when the case has no timed rounds)."""
    start = time.perf_counter()
    result = case.run()
    case.first_call = time.perf_counter() - start
    return result


def check(cases: list[Case], n: int) -> tuple[list[str], list[dict]]:
    """Every answer has ``n`` tokens; VPT rows took one perception of the kind; ours equals reread.

    Returns the problems found and ours' traces."""
    problems = []
    by_path = {c.path: c for c in cases}
    kind = cases[0].kind
    plain_answers = timed_call(by_path["plain"])
    ours_answers, ours_traces = timed_call(by_path["ours"])
    reread_answers, reread_traces = timed_call(by_path["reread"])
    for path, answers in (("plain", plain_answers), ("ours", ours_answers), ("reread", reread_answers)):
        lengths = [len(a) for a in answers]
        if any(length != n for length in lengths):
            problems.append(f"{kind} {path}: answer lengths {lengths}, expected {n}")
    for path, traces in (("ours", ours_traces), ("reread", reread_traces)):
        kinds = [[r["kind"] for r in t["rounds"]] for t in traces]
        if any(k != [kind] for k in kinds):
            problems.append(f"{kind} {path}: perception rounds {kinds}, expected one {kind!r} each")
    if [list(a) for a in ours_answers] != [list(a) for a in reread_answers]:
        problems.append(f"{kind}: ours and reread answers differ (greedy decoding should agree)")
    return problems, ours_traces


# ---------------------------------------------------------------------------- main


PRESETS = {
    "quick": dict(answer_tokens=8, batch_size=2, image_side=224, question_words=4, repeats=3, warmup=0),
    "default": dict(answer_tokens=64, batch_size=4, image_side=448, question_words=12, repeats=5, warmup=0),
    # reread answers a batch row by row through the two-pass forward: keep the answers short enough to finish
    "2b": dict(answer_tokens=32, batch_size=8, image_side=448, question_words=12, repeats=3, warmup=0),
    # Real prompts: about 1000 tokens (256 image tokens at 448 px and a long question); batch 1 and 8. The
    # re-read flow re-reads ~1000 tokens per answer token, row by row: its checking call is its figure.
    "proportional": dict(answer_tokens=8, batch_size=8, image_side=448, question_words=450, repeats=1,
                         reread_repeats=0, warmup=0),
}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of region,clip,dino,sam")
    parser.add_argument("--answer-tokens", type=int, help="answer length every path decodes")
    parser.add_argument("--batch-size", type=int, help="prompts per call for the throughput figure")
    parser.add_argument("--image-side", type=int, help="side in pixels of the square image")
    parser.add_argument("--question-words", type=int)
    parser.add_argument("--repeats", type=int,
                        help="timed calls per case (median reported); 0: the checking call's time is the figure")
    parser.add_argument("--reread-repeats", type=int, help="timed calls of the re-read flow (default: --repeats)")
    parser.add_argument("--warmup", type=int,
                        help="untimed rounds over all cases, after the checking call of each case (itself a warm-up)")
    args = parser.parse_args(argv)
    common.finish_arguments(args, PRESETS)
    if args.reread_repeats is None:
        args.reread_repeats = args.repeats
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()  # generate's notes on generation flags
    wall_start = time.perf_counter()
    common.set_threads(args)
    common.set_seed(args.seed)
    device = args.device
    tmp = common.workdir("vpt-bench-generate-")
    vpt, plain, processor = common.build_models(args.shape, args.dtype, device, tmp.name, args.llm_layers,
                                                args.encoder_layers, args.depth_factor)
    common.set_image_side(processor, args.image_side)
    vpt.eval()
    plain.eval()
    vpt.config.num_inner_forward_run = 2
    vpt.config.para_mask_id = 0  # training only anyway
    vpt.config.reuse_first_pass = False  # the reread flow is the published one (it returns a cache, so never reuses)

    cases, problems, encoder_times = [], [], {}
    with torch.no_grad():
        for kind in args.kinds:
            for batch_size in (1, args.batch_size):
                group = make_cases(vpt, plain, processor, args, kind, batch_size, device)
                found, traces = check(group, args.answer_tokens)
                problems += found
                cases += group
                encode = encoder_run(vpt, processor, kind, group[0].images, traces, device)
                encoder_times[(kind, batch_size)] = common.median(
                    common.measure(encode, max(args.repeats, 1), 1, device))
        rounds = max(args.repeats, args.reread_repeats)
        print(f"{len(cases)} cases, {args.warmup} warm-up + {rounds} timed rounds", flush=True)
        for _ in range(args.warmup):
            for case in cases:
                case.run()
        for r in range(rounds):
            for case in cases:
                if r >= (args.reread_repeats if case.path == "reread" else args.repeats):
                    continue
                common.sync(device)
                start = time.perf_counter()
                case.run()
                common.sync(device)
                case.times.append(time.perf_counter() - start)
            print(f"  round {r + 1}/{rounds} done ({time.perf_counter() - wall_start:.0f} s)", flush=True)
        for case in cases:
            case.times = case.times or [case.first_call]
    elapsed = time.perf_counter() - wall_start
    report(args, vpt, cases, problems, encoder_times, elapsed)


# ---------------------------------------------------------------------------- output


def report(args, vpt, cases, problems, encoder_times, elapsed) -> None:
    device = args.device
    n = args.answer_tokens
    counts = common.parameter_counts(vpt)
    peak_flops = common.gpu_peak_flops(device, args.peak_tflops)
    by_key = {(c.kind, c.path, c.batch): c for c in cases}
    limits = {key: by_key[(key[0], "plain", key[1])].median + seconds for key, seconds in encoder_times.items()}

    rows = []
    for c in cases:
        plain = by_key[(c.kind, "plain", c.batch)]
        ours = by_key[(c.kind, "ours", c.batch)]
        tokens = c.batch * n
        mfu = f"{100 * 2 * counts['llm_flops_params'] * tokens / c.median / peak_flops:.2f}%" if peak_flops else "n/a"
        rows.append([c.kind, c.path, c.batch, f"{1000 * c.median:.1f}",
                     f"{1000 * min(c.times):.1f}-{1000 * max(c.times):.1f}", f"{1000 * c.first_call:.1f}",
                     f"{tokens / c.median:,.1f}",
                     f"{c.median / plain.median:.2f}", f"{c.median / limits[(c.kind, c.batch)]:.2f}",
                     f"{c.median / ours.median:.2f}", mfu])
    header = ["kind", "path", "batch", "ms per call (median)", "min-max ms", "checking call ms", "answer tokens/s",
              "x plain", "x limit",
              "x ours", "decode MFU"]
    limit_lines = "; ".join(
        f"{kind} b{batch}: plain {1000 * by_key[(kind, 'plain', batch)].median:.1f} ms + encoder {1000 * seconds:.1f} ms"
        f" = {1000 * limits[(kind, batch)]:.1f} ms, ours {1000 * by_key[(kind, 'ours', batch)].median:.1f} ms"
        for (kind, batch), seconds in encoder_times.items())
    table = common.markdown_table(header, rows)

    def ratios(path, over, batch):
        return [by_key[(k, path, batch)].median / by_key[(k, over, batch)].median for k in args.kinds]

    def mean(values):
        return sum(values) / len(values)

    extra = {
        "generate_batched_ratio_vpt_over_plain": mean(ratios("ours", "plain", args.batch_size)),
        "generate_batched_ratio_reread_over_ours": mean(ratios("reread", "ours", args.batch_size)),
        # What the one-call loop costs beyond the encoder it must run, per kind and batch size.
        **{f"answer_over_limit_{k}_b{b}": by_key[(k, "ours", b)].median / limits[(k, b)]
           for b in (1, args.batch_size) for k in args.kinds},
    }
    headlines = {
        "generate_ratio_vpt_over_plain": mean(ratios("ours", "plain", 1)),
        "generate_ratio_reread_over_ours": mean(ratios("reread", "ours", 1)),
    }
    # Per kind, not a mean that hides one: the one-call loop's latency over plain's at batch 1; the
    # re-read flow over the one-call loop at batch 1 and at the batch size (8 in the default preset),
    # the worst kind.
    per_kind = {f"answer_over_plain_{k}": v for k, v in zip(args.kinds, ratios("ours", "plain", 1))}
    per_kind["reread_over_ours_b1"] = min(ratios("reread", "ours", 1))
    per_kind[f"reread_over_ours_b{args.batch_size}"] = min(ratios("reread", "ours", args.batch_size))
    prompt_tokens = {k: by_key[(k, "ours", 1)].prompt_tokens for k in args.kinds}

    info = common.machine_info(device)
    extras = {
        "command": f"`{common.command_line()}`",
        "model": f"{common.shape_description(args)}, "
                 f"dtype {str(args.dtype).replace('torch.', '')}, parameters {common.format_count(counts['total'])} "
                 f"(LLM FLOP params {common.format_count(counts['llm_flops_params'])})",
        "inputs": f"image {args.image_side}x{args.image_side}, question ~{args.question_words} words + the published "
                  f"request prompt (prompt tokens at batch 1: {', '.join(f'{k} {v}' for k, v in prompt_tokens.items())}); "
                  f"answers of exactly {n} tokens; batch 1 (latency) and {args.batch_size} (throughput)",
        "timing": f"one checking call per case (its own warm-up) plus {args.warmup} warm-up rounds, then "
                  f"{args.repeats} timed round-robin rounds (re-read flow: {args.reread_repeats}), median; "
                  f"a case without timed rounds has its checking call as its figure"
                  + f"; torch threads {torch.get_num_threads()}; wall {elapsed:.0f} s",
        "checks": "all passed (answer lengths, one perception of the intended kind per VPT row, ours == reread)"
                  if not problems else "PROBLEMS: " + "; ".join(problems),
    }
    text = f"""## Generation (`benchmarks/bench_generate.py`)

{common.info_lines(info, extras)}

plain: transformers' Qwen2-VL `generate` on the same weights, answering the prompt directly.
ours: the VPT one-call loop (`model.generate(..., processor=, vpt_images=)`): round 1 (forced to
the kind's perception tokens), the crop or branch, the perception turn appended to round 1's
cache, the answer. reread: `two_round_reference`, the published flow (round 2 re-read from
scratch through the two-pass forward at every step, rows one by one). Every answer is
{n} tokens (end of turn and padding banned; a logits processor forces round 1). Answer tokens/s
counts answer tokens only; the VPT paths also decode round 1 and read the perception turn, which
is what their ratios to plain charge them for. Decode MFU (CUDA only): 2 x LLM FLOP params x
answer tokens / time / GPU dense bf16 peak.
{"" if device.type == "cuda" else chr(10) + CPU_NOTE.get(args.shape, CPU_NOTE["2b"]) + chr(10)}
{table}

Physical limit per kind and batch (plain's call + the perception's encoder alone): {limit_lines}.

Per-kind latency ratios at batch 1: ours/plain {", ".join(f"{k} {v:.2f}" for k, v in zip(args.kinds, ratios("ours", "plain", 1)))}; reread/ours {", ".join(f"{k} {v:.2f}" for k, v in zip(args.kinds, ratios("reread", "ours", 1)))}.
Printed last: the batched means over the kinds, each kind's one-call loop over its physical limit, the batch-1 means, then the headlines (per kind; re-read over one-call at the worst kind).

```
{chr(10).join(f"{k}: {v:.3f}" for k, v in {**extra, **headlines, **per_kind}.items())}
```
"""
    print()
    print(table)
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    common.finish_run("generate", text if args.report else None, elapsed, {**extra, **headlines, **per_kind}, args.quick)


if __name__ == "__main__":
    main()
