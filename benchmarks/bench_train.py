"""Training step time and memory of the VPT model against plain Qwen2-VL, side by side in one run (issue 5).

What is measured, per branch (clip, dino, sam), on one fixed batch per branch:

``plain``
    transformers' own ``Qwen2VLForConditionalGeneration`` (``common.plain_twin``: the VPT model's
    ViT, language model and ``lm_head``, the very same tensors), one pass. Its batch is the VPT
    batch with every ``<|B_image_pad|>`` token replaced by an ordinary text token, so it reads
    the same number of tokens with the same base image (``pixel_values``) and the same labels
    (``<|B_action|>`` ignored, as the VPT model ignores it); the branch image itself is not
    encoded. The ratio VPT / plain therefore charges VPT with everything it adds: the branch
    encoder, the projector, the control states and the second pass.
``vpt-opt``
    the VPT model with ``config.reuse_first_pass = True`` (pass 1 only up to the last
    ``<|B_action_start|>``, pass 2 reuses its keys and values for the shared prefix). Until that
    forward lands in ``modeling_vpt.py`` the attribute is ignored and vpt-opt equals vpt-ref.
``vpt-ref``
    ``config.reuse_first_pass = False``: the straightforward two full passes (the oracle).

Each VPT model is timed with para masking off (``para_mask_id 0``) and with ``para_mask_id 1``
for both outcomes of the per-batch draw, forced: ``masked`` (``para_mask_ratio 1``: the first user
turn is zeroed in pass 2) and ``unmasked`` (``para_mask_ratio 0``: the draw is made and fails).
The published recipes use ratio 0.5, so their expected step time is the mean of the two
(``0.5 mix``); forcing the draw makes that figure exact instead of a sampled average.
With ``--grad-ckpt both`` (default mode) plain, vpt-opt and vpt-ref (para mask off) are also
timed with gradient checkpointing as LLaMA-Factory enables it (see :func:`set_grad_ckpt`).

A step is forward + backward (+ ``AdamW.step`` unless ``--no-optimizer``; the same optimizer
over the same parameters for every configuration, grads freed with ``zero_grad(set_to_none=True)``).
Trained: the language model, ``lm_head`` and the branch projectors; frozen: the ViT and the
branch encoders, as in the published VPT recipes. Timing: all configurations are warmed up,
then timed round-robin (one step of each in turn, ``--repeats`` rounds) so drift hits all
alike; the figure is the median. Memory, from one extra step per configuration:

``step peak``
    the most memory allocated during the step above what was allocated just before it
    (parameters, optimizer state): on CUDA ``torch.cuda.max_memory_allocated`` minus
    ``memory_allocated`` before; on CPU the same quantity from the allocator events of
    ``torch.profiler`` (``profile_memory=True``): allocations and frees summed in time order.
    It holds activations, gradients and temporaries.
``saved``
    bytes of the distinct tensors autograd keeps for backward (``saved_tensors_hooks``,
    parameters excluded): the activation memory, the part an implementation changes.

Lines printed last, one ``name: value`` each: means over branches (``train_ratio_vpt_over_plain``:
vpt-opt, para mask off, step time over plain's; ``..._paramask``: the 0.5 mix; ``memory_ratio_vpt_over_plain``:
the worst over branches and para-mask settings of the step peak on CUDA, of the saved-for-backward bytes on
CPU), then the headlines per branch: ``train_over_limit_<b>`` and ``train_over_limit_paramask_<b>`` (vpt-opt
over the physical limit: plain's step plus one frozen forward of the branch encoder) and
``memory_over_plain_<b>`` (the step peak where measured, else saved-for-backward bytes). All without
gradient checkpointing.
On CPU the scripts use one torch thread unless ``--threads`` says otherwise (``common.set_threads``).

Examples::

    .venv/bin/python benchmarks/bench_train.py --quick              # tiny model, CPU, < 1 minute (no report unless --report)
    .venv/bin/python benchmarks/bench_train.py --threads 2          # proportional shape, ~16 minutes; writes the report
    .venv/bin/python benchmarks/bench_train.py --device cuda --dtype bfloat16 --shape 2b
    .venv/bin/python benchmarks/bench_train.py --shape 2b --build-only   # 2B shapes on the meta device
"""

from __future__ import annotations

import argparse
import inspect
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MiB = 2**20


# ---------------------------------------------------------------------------- batches


def training_batch(processor, config, branch: str, batch_size: int, question_words: int, answer_words: int,
                   image_side: int, seed: int) -> dict:
    """One re-encoding batch in the released layout: user(image+question) / action / user(branch image) / answer."""
    from vpt_plugin.branches import get_branch
    from vpt_plugin.conversation import collate, encode_conversation
    from vpt_plugin.vocabulary import REENCODING_PROMPT

    tokens = get_branch(branch).tokens
    rows = []
    for i in range(batch_size):
        rng = random.Random(seed * 1000 + i)
        image = common.shape_image(seed * 1000 + i, image_side)
        question = common.words(rng, question_words + rng.randint(0, 4))
        messages = [
            {"role": "user", "content": f"<image>{question}? {REENCODING_PROMPT}"},
            {"role": "assistant", "content": tokens.action_sequence},
            {"role": "user", "content": tokens.placeholder},
            {"role": "assistant", "content": common.words(rng, answer_words + rng.randint(0, 4))},
        ]
        rows.append(encode_conversation(processor, config, messages, [image], {branch: [image]}))
    return collate(rows, processor.tokenizer.pad_token_id)


def plain_batch(vpt_batch: dict, config, branch: str, filler_id: int) -> dict:
    """The same tokens for plain Qwen2-VL: branch image pads become an ordinary text token."""
    from vpt_plugin.modeling_vpt import IGNORE_INDEX

    ids = config.branch_ids(branch)
    input_ids = vpt_batch["input_ids"].masked_fill(vpt_batch["input_ids"] == ids["image"], filler_id)
    labels = vpt_batch["labels"].masked_fill(vpt_batch["input_ids"] == ids["action"], IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": vpt_batch["attention_mask"],
        "pixel_values": vpt_batch["pixel_values"],
        "image_grid_thw": vpt_batch["image_grid_thw"],
        "mm_token_type_ids": (input_ids == config.image_token_id).int(),  # M-RoPE, as the VPT forward computes it
    }


def to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for key, value in batch.items():
        value = value.to(device)
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


# ---------------------------------------------------------------------------- configurations


@dataclass
class Setup:
    branch: str
    model: str  # plain, vpt-opt, vpt-ref; or encoder (the branch encoder's forward alone, for the physical limit)
    para: str  # off, masked, unmasked (the para-mask draw, forced)
    grad_ckpt: bool
    times: list = field(default_factory=list)
    peak: float | None = None  # bytes above resident
    peak_absolute: float | None = None  # CUDA only
    saved: float | None = None  # bytes kept for backward

    @property
    def key(self):
        return (self.branch, self.model, self.para, self.grad_ckpt)

    @property
    def median(self) -> float:
        return common.median(self.times)


GRAD_CKPT = {"on": False, "how": None}


def set_grad_ckpt(vpt, on: bool) -> None:
    """Gradient checkpointing as LLaMA-Factory's training turns it on, or off.

    LLaMA-Factory (``model_utils/checkpointing.py``) checkpoints every layer that has trainable
    parameters (reentrant by default) and does not call transformers' ``enable_input_require_grads``.
    Transformers' own ``gradient_checkpointing_enable`` does call it, which hooks the input
    embeddings of every sub-model, the frozen ViT, DINOv2 and SAM patch embeddings included: their
    outputs then require grad and backward runs through the frozen encoders (and the hooks stay
    after ``gradient_checkpointing_disable``). Without LLaMA-Factory installed, the fallback is
    transformers' per-layer checkpointing (non-reentrant) without that call.
    """
    if on == GRAD_CKPT["on"]:
        return
    if on:
        try:
            from llamafactory.model.model_utils.checkpointing import _gradient_checkpointing_enable
        except ImportError:
            from functools import partial

            from torch.utils.checkpoint import checkpoint

            vpt._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=partial(checkpoint, use_reentrant=False))
            GRAD_CKPT["how"] = "transformers' per-layer checkpointing (non-reentrant), no enable_input_require_grads"
        else:
            _gradient_checkpointing_enable(vpt, {"use_reentrant": True})
            GRAD_CKPT["how"] = "LLaMA-Factory's (reentrant, layers with trainable parameters only)"
    else:
        vpt._set_gradient_checkpointing(enable=False)
    GRAD_CKPT["on"] = on


def configure(vpt, plain, setup: Setup):
    """Set the model for ``setup``; returns the module to call."""
    set_grad_ckpt(vpt, setup.grad_ckpt)
    if setup.model == "plain":
        return plain
    config = vpt.config
    config.reuse_first_pass = setup.model == "vpt-opt"  # plain attribute until the optimised forward lands
    config.num_inner_forward_run = 2
    config.para_mask_id = 0 if setup.para == "off" else 1
    config.para_mask_ratio = {"off": 0.5, "masked": 1.0, "unmasked": 0.0}[setup.para]
    return vpt


def encoder_step(vpt, branch: str, batch: dict):
    """One forward of the branch's encoder on the batch's branch images, without gradients (frozen, as
    the recipes keep it): what a VPT step must add to plain's at the least."""
    from vpt_plugin.branches import get_branch

    encoder = get_branch(branch)
    inputs = {key: batch[key] for key in (encoder.pixel_key, *encoder.extra_inputs()) if key in batch}

    def step():
        with torch.no_grad():
            encoder.encode(vpt, inputs)
    return step


def make_step(module, batch, optimizer, vpt):
    def step():
        loss = module(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True) if optimizer is not None else vpt.zero_grad(set_to_none=True)
    return step


# ---------------------------------------------------------------------------- memory


def cpu_step_peak(step) -> float:
    """Peak bytes allocated during ``step()`` above the start, from torch.profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return float(peak)


def saved_bytes(module, batch, vpt) -> float:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in vpt.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameters:
            seen[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module(**batch).loss
    loss.backward()
    vpt.zero_grad(set_to_none=True)
    return float(sum(seen.values()))


def measure_memory(setup: Setup, module, batch, step, vpt, device, cpu_peak: bool) -> None:
    setup.saved = saved_bytes(module, batch, vpt)
    if device.type == "cpu" and not cpu_peak:
        setup.peak = float("nan")
    elif device.type == "cuda":
        common.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        common.sync(device)
        setup.peak_absolute = float(torch.cuda.max_memory_allocated(device))
        setup.peak = setup.peak_absolute - before
    else:
        setup.peak = cpu_step_peak(step)


# ---------------------------------------------------------------------------- where the time goes


class Breakdown:
    """Forward time per part of a step, by forward hooks (device synchronised at each hook).

    Module calls: the ViT (``ViT call 1`` the base image, ``ViT call 2`` the clip branch's image),
    the DINOv2 and SAM encoders, ``lm_head``. Language-model work is timed per *segment*: from
    the first decoder layer's input norm to the final norm, which both the plain language model
    and any segment-wise VPT forward (e.g. ``reuse_first_pass``) go through once per pass or
    segment, whichever way they call the layers. ``LLM segment 1`` is pass 1, ``LLM segment 2``
    pass 2 (or the part of it that is computed); their token counts are reported too.
    """

    def __init__(self, vpt, device):
        self.device = device
        self.modules = {"ViT": vpt.model.visual, "lm_head": vpt.lm_head}
        for name, attribute in (("dino encoder", "detection_model"), ("sam encoder", "seg_model")):
            if hasattr(vpt, attribute):
                self.modules[name] = getattr(vpt, attribute)
        language = vpt.model.language_model
        self.segment_start = language.layers[0].input_layernorm
        self.segment_end = language.norm

    @contextmanager
    def hooked(self):
        handles, starts, calls, records, segment_tokens = [], {}, {}, [], []

        def timer_hooks(name):
            def pre(module, args):
                common.sync(self.device)
                starts[name] = time.perf_counter()

            def post(module, args, output):
                common.sync(self.device)
                calls[name] = calls.get(name, 0) + 1
                label = f"{name} call {calls[name]}" if name == "ViT" else name
                records.append((label, time.perf_counter() - starts[name]))
            return pre, post

        for name, module in self.modules.items():
            pre, post = timer_hooks(name)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

        def segment_pre(module, args):
            if "LLM" in starts:
                return  # not the first layer's norm of a new segment (only layer 0's is hooked)
            common.sync(self.device)
            starts["LLM"] = time.perf_counter()
            segment_tokens.append(args[0].shape[1])

        def segment_post(module, args, output):
            if "LLM" not in starts:
                return
            common.sync(self.device)
            calls["LLM"] = calls.get("LLM", 0) + 1
            records.append((f"LLM segment {calls['LLM']}", time.perf_counter() - starts.pop("LLM")))

        handles += [self.segment_start.register_forward_pre_hook(segment_pre),
                    self.segment_end.register_forward_hook(segment_post)]
        try:
            yield records, segment_tokens
        finally:
            for handle in handles:
                handle.remove()

    def run(self, module, batch, optimizer, vpt, repeats: int) -> dict:
        """Median seconds per part over ``repeats`` steps: module calls, other forward work, backward, optimizer."""
        parts, tokens = {}, None
        for _ in range(repeats):
            with self.hooked() as (records, segment_tokens):
                common.sync(self.device)
                t0 = time.perf_counter()
                loss = module(**batch).loss
                common.sync(self.device)
                t1 = time.perf_counter()
                records = list(records)
                tokens = list(segment_tokens)
            loss.backward()
            common.sync(self.device)
            t2 = time.perf_counter()
            if optimizer is not None:
                optimizer.step()
            common.sync(self.device)
            t3 = time.perf_counter()
            (optimizer.zero_grad if optimizer is not None else vpt.zero_grad)(set_to_none=True)
            step = {}
            for label, seconds in records:
                step[label] = step.get(label, 0.0) + seconds
            step[OTHER] = (t1 - t0) - sum(step.values())
            step["backward"] = t2 - t1
            step["optimizer"] = t3 - t2
            step["step"] = t3 - t0
            for label, seconds in step.items():
                parts.setdefault(label, []).append(seconds)
        medians = {label: common.median(values) for label, values in parts.items()}
        medians["LLM tokens per segment (per row)"] = "+".join(str(t) for t in tokens)
        return medians


OTHER = "other forward (embeddings, RoPE/masks, scatter, projectors, loss)"

CPU_NOTE = {
    "tiny": "Run on CPU, without a GPU (none was available in the session that produced these figures): they show "
            "the relative cost of the VPT forward's parts on a tiny model, not GPU speed. The CPU was shared with "
            "other work, so single steps vary; the round-robin medians are the figures to read.",
    "proportional": "Run on CPU, without a GPU (none was available in the session that produced these figures), on "
                    "the proportional shape: every width of the 2B model and its encoders, every depth cut by one "
                    "factor, so the time ratios are those of a GPU run in proportion (CPU and GPU kernels differ in "
                    "efficiency, attention most). Few timed steps of several seconds each: read the min-max ranges "
                    "beside the medians.",
    "2b": "Run on CPU at the 2B shapes.",
}
READING = {
    "tiny": (
        "Reading the tiny figures: the tiny SAM encoder keeps SAM's real 1024x1024 input (64x64 patch grid, "
        "256-channel neck), so next to a 2-layer, width-128 LLM it costs several times the whole plain step; "
        "the sam rows measure that encoder more than the VPT forward, and their step peak is its "
        "inference-only temporaries (hence the memory headline on CPU uses saved-for-backward bytes). "
        "The clip and dino rows show the forward itself: what vpt-opt adds over plain is the branch "
        "encoder, the projector and the bookkeeping (`other forward`); vpt-ref adds a second full pass "
        "and its backward. With the para mask drawn, pass 2 must start at the first user turn, so "
        "vpt-opt recomputes almost the whole sequence (see the token counts).\n"),
    "proportional": (
        "Reading the proportional figures: time scales with depth for the LLM and every encoder alike, so the "
        "time ratios carry over to the real depths. Memory does not: the step peak is the activations kept for "
        "backward (they scale with depth) plus the largest transient of a single layer (it does not). The VPT "
        "step's extra peak over plain's is such a transient (the clip branch's second ViT call, SAM's global "
        "attention over its 64x64 grid, about 1 GiB per 16 heads in fp32), so against a one-layer LLM it weighs "
        "as it would against a 28-layer one only 1/28 as much; the saved-for-backward ratio (activations, which "
        "do scale) is the figure that carries over.\n"),
}


# ---------------------------------------------------------------------------- main


PRESETS = {
    # batch, image side (px), question words, answer words, repeats, warm-up rounds, grad ckpt, breakdown steps
    "quick": dict(batch_size=1, image_side=224, question_words=4, answer_words=6, repeats=3, warmup=1,
                  grad_ckpt="off", breakdown=0, cpu_peak=False),
    "default": dict(batch_size=2, image_side=448, question_words=12, answer_words=24, repeats=8, warmup=2,
                    grad_ckpt="both", breakdown=3, cpu_peak=True),
    "2b": dict(batch_size=4, image_side=448, question_words=12, answer_words=24, repeats=10, warmup=3,
               grad_ckpt="both", breakdown=3, cpu_peak=True),
    # Released-style rows of 800-1500 tokens (256 base-image and 256 branch-image tokens at 448 px).
    "proportional": dict(batch_size=1, image_side=448, question_words=60, answer_words=250, repeats=2, warmup=1,
                         grad_ckpt="off", breakdown=1, cpu_peak=True),
}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--branches", default=",".join(common.BRANCHES), help="comma-separated subset of clip,dino,sam")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-side", type=int, help="side in pixels of the square base image")
    parser.add_argument("--question-words", type=int)
    parser.add_argument("--answer-words", type=int)
    parser.add_argument("--repeats", type=int, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed rounds over all configurations first")
    parser.add_argument("--grad-ckpt", choices=["off", "on", "both"], help="gradient checkpointing settings to time")
    parser.add_argument("--breakdown", type=int, help="steps for the per-module time breakdown (0: skip)")
    parser.add_argument("--cpu-peak", action=argparse.BooleanOptionalAction, default=None,
                        help="on CPU, also measure the step peak with torch.profiler (slow; off in --quick)")
    parser.add_argument("--no-optimizer", action="store_true", help="time forward+backward only (no AdamW step)")
    parser.add_argument("--build-only", action="store_true", help="build the model on the meta device, print sizes, exit")
    args = parser.parse_args(argv)
    common.finish_arguments(args, PRESETS)
    args.branches = [b.strip() for b in args.branches.split(",") if b.strip()]
    return args


def build_only(args) -> None:
    if args.shape != "2b":
        raise SystemExit("--build-only is for --shape 2b")
    model, _ = common.build_2b(args.dtype, torch.device("meta"), args.llm_layers, args.encoder_layers)
    plain = common.plain_twin(model)
    counts = common.parameter_counts(model)
    for name, child in model.named_children():
        print(f"{name}: {common.format_count(sum(p.numel() for p in child.parameters()))}")
    print(f"plain twin: {common.format_count(sum(p.numel() for p in plain.parameters()))}")
    print(f"LLM FLOP params (decoder layers + lm_head): {common.format_count(counts['llm_flops_params'])}")
    print(f"total: {common.format_count(counts['total'])}")


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if args.build_only:
        build_only(args)
        return
    wall_start = time.perf_counter()
    common.set_threads(args)
    common.set_seed(args.seed)
    device = args.device
    tmp = common.workdir("vpt-bench-train-")
    vpt, plain, processor = common.build_models(args.shape, args.dtype, device, tmp.name, args.llm_layers,
                                                args.encoder_layers, args.depth_factor)
    common.set_image_side(processor, args.image_side)
    vpt.train()
    plain.train()
    frozen = [vpt.model.visual] + [getattr(vpt, a) for a in ("detection_model", "seg_model") if hasattr(vpt, a)]
    for module in frozen:
        module.requires_grad_(False)
    trainable = [p for p in vpt.parameters() if p.requires_grad]
    optimizer = None if args.no_optimizer else torch.optim.AdamW(trainable, lr=1e-6)
    filler = processor.tokenizer.encode(" the", add_special_tokens=False)[0]

    vpt_batches, plain_batches, tokens = {}, {}, {}
    for branch in args.branches:
        batch = training_batch(processor, vpt.config, branch, args.batch_size, args.question_words, args.answer_words,
                               args.image_side, args.seed)
        plain_batches[branch] = to_device(plain_batch(batch, vpt.config, branch, filler), device, args.dtype)
        vpt_batches[branch] = to_device(batch, device, args.dtype)
        tokens[branch] = int(batch["attention_mask"].sum())

    grad_ckpt = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    setups = []
    for branch in args.branches:
        setups.append(Setup(branch, "encoder", "off", False))
        for ckpt in grad_ckpt:
            setups.append(Setup(branch, "plain", "off", ckpt))
            for model_name in ("vpt-opt", "vpt-ref"):
                for para in (("off", "unmasked", "masked") if not ckpt else ("off",)):
                    setups.append(Setup(branch, model_name, para, ckpt))

    def step_of(setup):
        if setup.model == "encoder":
            return None, vpt_batches[setup.branch], encoder_step(vpt, setup.branch, vpt_batches[setup.branch])
        module = configure(vpt, plain, setup)
        batch = plain_batches[setup.branch] if setup.model == "plain" else vpt_batches[setup.branch]
        return module, batch, make_step(module, batch, optimizer, vpt)

    print(f"{len(setups)} configurations, {args.warmup} warm-up + {args.repeats} timed rounds", flush=True)
    for _ in range(args.warmup):
        for setup in setups:
            step_of(setup)[2]()
    for r in range(args.repeats):
        for setup in setups:
            step = step_of(setup)[2]
            common.sync(device)
            start = time.perf_counter()
            step()
            common.sync(device)
            setup.times.append(time.perf_counter() - start)
        print(f"  round {r + 1}/{args.repeats} done ({time.perf_counter() - wall_start:.0f} s)", flush=True)
    for setup in setups:
        if setup.model != "encoder":
            module, batch, step = step_of(setup)
            measure_memory(setup, module, batch, step, vpt, device, args.cpu_peak)

    breakdowns = {}
    if args.breakdown:
        timer = Breakdown(vpt, device)
        for branch in args.branches:
            for model_name, para in (("plain", "off"), ("vpt-opt", "off"), ("vpt-ref", "off"), ("vpt-opt", "masked")):
                module, batch, _ = step_of(Setup(branch, model_name, para, False))
                breakdowns[(branch, model_name, para)] = timer.run(module, batch, optimizer, vpt, args.breakdown)
    set_grad_ckpt(vpt, False)
    elapsed = time.perf_counter() - wall_start

    report(args, vpt, processor, setups, tokens, vpt_batches, breakdowns, elapsed)


# ---------------------------------------------------------------------------- output


def report(args, vpt, processor, setups, tokens, vpt_batches, breakdowns, elapsed) -> None:
    device = args.device
    by_key = {s.key: s for s in setups}
    counts = common.parameter_counts(vpt)
    peak_flops = common.gpu_peak_flops(device, args.peak_tflops)
    implemented = "reuse_first_pass" in inspect.getsource(type(vpt))

    def mix(branch, model_name, attribute="median"):
        values = [getattr(by_key[(branch, model_name, p, False)], attribute) for p in ("unmasked", "masked")]
        return sum(values) / 2

    def number(value, digits):
        return "not measured" if math.isnan(value) else f"{value:.{digits}f}"  # NaN: --no-cpu-peak

    def row(branch, model_name, para, ckpt, seconds, spread, peak, saved):
        plain = by_key[(branch, "plain", "off", ckpt)]
        mfu = "n/a"
        if peak_flops:
            mfu = f"{100 * 6 * counts['llm_flops_params'] * tokens[branch] / seconds / peak_flops:.1f}%"
        return [branch, model_name, para if model_name != "plain" else "-", "on" if ckpt else "off",
                f"{1000 * seconds:.1f}", spread, f"{tokens[branch] / seconds:,.0f}", f"{seconds / plain.median:.2f}",
                number(peak / MiB, 1), number(peak / plain.peak, 2), number(saved / MiB, 1),
                number(saved / plain.saved, 2), mfu]

    rows = [row(s.branch, s.model, s.para, s.grad_ckpt, s.median,
                f"{1000 * min(s.times):.1f}-{1000 * max(s.times):.1f}", s.peak, s.saved)
            for s in setups if s.model != "encoder"]
    for branch in args.branches:
        for model_name in ("vpt-opt", "vpt-ref"):
            rows.append(row(branch, model_name, "0.5 mix", False, mix(branch, model_name), "-",
                            mix(branch, model_name, "peak"), mix(branch, model_name, "saved")))
    header = ["branch", "model", "para mask draw", "grad ckpt", "step ms (median)", "min-max ms", "tokens/s",
              "time x plain", "step peak MiB", "peak x plain", "saved for backward MiB", "saved x plain", "MFU"]
    table = common.markdown_table(header, rows)

    def ratio(model_name, para_mode, measure):
        values = []
        for branch in args.branches:
            plain = by_key[(branch, "plain", "off", False)]
            attribute = {"time": "median", "memory": "peak", "saved": "saved"}[measure]
            if para_mode == "mix":
                mine = mix(branch, model_name, attribute)
            else:
                mine = getattr(by_key[(branch, model_name, para_mode, False)], attribute)
            values.append(mine / getattr(plain, attribute))
        return values

    def mean(values):
        return sum(values) / len(values)

    # The memory headline: CUDA step peak (max_memory_allocated); on CPU the bytes saved for backward.
    memory_measure = "memory" if device.type == "cuda" else "saved"
    memory_opt = [v for p in ("off", "unmasked", "masked") for v in ratio("vpt-opt", p, memory_measure)]
    memory_ref = [v for p in ("off", "unmasked", "masked") for v in ratio("vpt-ref", p, memory_measure)]
    headlines = {
        "train_ratio_vpt_over_plain": mean(ratio("vpt-opt", "off", "time")),
        "train_ratio_vpt_over_plain_paramask": mean(ratio("vpt-opt", "mix", "time")),
        "memory_ratio_vpt_over_plain": max(memory_opt),
    }
    # Against the physical limit: plain's step plus one forward of the branch encoder (frozen) on the
    # branch images; the memory of vpt-opt over plain's, the worst para-mask setting, per branch: the
    # step peak where it was measured (CUDA, or CPU with --cpu-peak), else the bytes saved for backward.
    limit = {b: by_key[(b, "plain", "off", False)].median + by_key[(b, "encoder", "off", False)].median
             for b in args.branches}
    peak_measured = device.type == "cuda" or args.cpu_peak
    per_branch = {}
    for b in args.branches:
        per_branch[f"train_over_limit_{b}"] = by_key[(b, "vpt-opt", "off", False)].median / limit[b]
    for b in args.branches:
        per_branch[f"train_over_limit_paramask_{b}"] = mix(b, "vpt-opt") / limit[b]
    for b in args.branches:
        plain_setup = by_key[(b, "plain", "off", False)]
        attribute = "peak" if peak_measured else "saved"
        per_branch[f"memory_over_plain_{b}"] = max(
            getattr(by_key[(b, "vpt-opt", p, False)], attribute) / getattr(plain_setup, attribute)
            for p in ("off", "unmasked", "masked"))
    limit_line = "; ".join(
        f"{b}: plain {1000 * by_key[(b, 'plain', 'off', False)].median:.1f} ms + encoder "
        f"{1000 * by_key[(b, 'encoder', 'off', False)].median:.1f} ms = {1000 * limit[b]:.1f} ms, vpt-opt "
        f"{1000 * by_key[(b, 'vpt-opt', 'off', False)].median:.1f} ms, 0.5 mix {1000 * mix(b, 'vpt-opt'):.1f} ms"
        for b in args.branches)
    extra = {
        "train_ratio_ref_over_plain": mean(ratio("vpt-ref", "off", "time")),
        "train_ratio_ref_over_plain_paramask": mean(ratio("vpt-ref", "mix", "time")),
        "memory_ratio_ref_over_plain": max(memory_ref),
        "train_ratio_opt_over_ref": mean([a / b for a, b in zip(ratio("vpt-opt", "off", "time"), ratio("vpt-ref", "off", "time"))]),
        "train_ratio_opt_over_ref_paramask": mean([a / b for a, b in zip(ratio("vpt-opt", "mix", "time"), ratio("vpt-ref", "mix", "time"))]),
    }

    shapes = []
    for branch in args.branches:
        batch = vpt_batches[branch]
        ids = batch["input_ids"]
        pads = int((ids == vpt.config.branch_ids(branch)["image"]).sum()) // ids.shape[0]
        images = int((ids == vpt.config.image_token_id).sum()) // ids.shape[0]
        shapes.append(f"{branch}: input_ids {tuple(ids.shape)}, {tokens[branch]} real tokens, per row {images} base-image "
                      f"tokens + {pads} branch-image tokens")

    breakdown_text = ""
    if breakdowns:
        token_label = "LLM tokens per segment (per row)"
        labels = []
        for parts in breakdowns.values():
            labels += [label for label in parts if label not in labels and label not in ("step", token_label)]
        order = sorted(labels, key=lambda l: (l in ("backward", "optimizer"), l == OTHER, l))
        columns = list(breakdowns)
        header_b = [f"part (ms, median of {args.breakdown})"] + [
            f"{b} {m}{' ' + p if p != 'off' else ''}" for b, m, p in columns]
        rows_b = [[label] + [f"{1000 * breakdowns[c][label]:.1f}" if label in breakdowns[c] else "" for c in columns]
                  for label in order]
        rows_b.append(["**step**"] + [f"**{1000 * breakdowns[c]['step']:.1f}**" for c in columns])
        rows_b.append([token_label] + [breakdowns[c][token_label] for c in columns])
        breakdown_text = (
            "\n### Where the time goes (grad ckpt off)\n\n"
            "Forward time per part, from forward hooks (synchronised) in separate steps. `LLM segment k`: "
            "the decoder layers from layer 0's input norm to the final norm, once per pass or segment (1: pass 1, "
            "2: pass 2 or its computed part); its token count per row is the last line. `ViT call 2` is the "
            "clip branch re-encoding its image with the model's own ViT. Backward is not split.\n\n"
            + common.markdown_table(header_b, rows_b) + "\n"
        )

    info = common.machine_info(device)
    extras = {
        "command": f"`{common.command_line()}`",
        "model": f"{common.shape_description(args)}, "
                 f"dtype {str(args.dtype).replace('torch.', '')}, parameters {common.format_count(counts['total'])} "
                 f"(LLM FLOP params {common.format_count(counts['llm_flops_params'])}, ViT {common.format_count(counts['vit'])})",
        "batch": f"{args.batch_size} rows, base image {args.image_side}x{args.image_side}; " + "; ".join(shapes),
        "timing": f"{args.warmup} warm-up rounds, {args.repeats} timed round-robin rounds, median; "
                  f"torch threads {torch.get_num_threads()}; "
                  f"{'forward+backward+AdamW' if not args.no_optimizer else 'forward+backward'}; wall {elapsed:.0f} s",
        "gradient checkpointing (grad ckpt on)": GRAD_CKPT["how"] or "not timed",
        "reuse_first_pass in modeling_vpt.py": "yes (vpt-opt is the optimised forward)" if implemented else
            "no: the attribute is set but not read yet, so vpt-opt and vpt-ref run the same forward",
    }
    memory_words = ("the step peak (CUDA max_memory_allocated)" if device.type == "cuda" else
                    "the bytes saved for backward (activation memory; the CPU step peak is in the table)")
    memory_note = ("CUDA `max_memory_allocated` during the step minus `memory_allocated` before it"
                   if device.type == "cuda" else
                   "peak of the CPU allocator's live bytes during the step above the start, from `torch.profiler` "
                   "memory events")
    reading = READING.get(args.shape, "")
    text = f"""## Training step (`benchmarks/bench_train.py`)

{common.info_lines(info, extras)}

Plain is transformers' `Qwen2VLForConditionalGeneration` on the same weights (shared modules), one
pass over the same token ids with branch image pads replaced by an ordinary text token, same base
image and labels. vpt-opt: `reuse_first_pass=True`; vpt-ref: `False` (two full passes). Para mask
draw: `off` para_mask_id 0; `unmasked`/`masked` para_mask_id 1 with the draw forced (ratio 0 / 1);
`0.5 mix` is their mean, the expected step of the published ratio 0.5. Step peak: {memory_note}
(activations, gradients, temporaries; parameters and optimizer state excluded). Saved for
backward: distinct tensors autograd keeps (saved_tensors_hooks, parameters excluded). MFU:
6 x LLM FLOP params x real tokens / step time / GPU dense bf16 peak (one pass of useful work for
every model; n/a on CPU).
{"" if device.type == "cuda" else chr(10) + CPU_NOTE[args.shape] + chr(10)}
{table}
{breakdown_text}
{reading}
Physical limit per branch (plain's step + one forward of the frozen branch encoder on the branch images): {limit_line}.

Per-branch ratios (vpt-opt, grad ckpt off): time {", ".join(f"{b} {v:.2f}" for b, v in zip(args.branches, ratio("vpt-opt", "off", "time")))}; 0.5 mix {", ".join(f"{b} {v:.2f}" for b, v in zip(args.branches, ratio("vpt-opt", "mix", "time")))}.
Headlines: time ratios are the mean over branches; the memory ratio is the worst over branches and para-mask
settings of {memory_words}.

```
{chr(10).join(f"{k}: {v:.3f}" for k, v in {**extra, **headlines, **per_branch}.items())}
```
"""
    print()
    print(table)
    if breakdown_text:
        print(breakdown_text)
    common.finish_run("train", text if args.report else None, elapsed, {**extra, **headlines, **per_branch}, args.quick)


if __name__ == "__main__":
    main()
