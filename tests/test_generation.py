"""One-call VPT generation against the two-round reference flow, and every malformed token sequence."""

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from scripted import ScriptedTurns, prompt_batch

from vpt_plugin.branches import VPTInputError
from vpt_plugin.conversation import encode_conversation
from vpt_plugin.dataset import open_image
from vpt_plugin.generation import (
    DecodeSettings,
    PerceptionInputs,
    VPTGenerator,
    two_round_reference,
)
from vpt_plugin.perception import PerceptionVocabulary, read_perception

DATA = Path(__file__).resolve().parents[1] / "data"
MAX_NEW_TOKENS = 8
RS, RE = "<|region_token_start|>", "<|region_token_end|>"
END = "<|im_end|>"


def generate(model, processor, batch, script, images, **kwargs):
    inputs = {k: v for k, v in batch.items() if k not in ("prompts", "image_token_id")}
    kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    out = model.generate(**inputs, processor=processor, vpt_images=images, do_sample=False,
                         logits_processor=script.as_list(), return_dict_in_generate=True, **kwargs)
    length = batch["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    answers = []
    for row in out.sequences[:, length:].tolist():
        answers.append(row[: row.index(eos) + 1] if eos in row else row[: _unpadded(row, processor)])
    return answers, out.traces


def _unpadded(row, processor):
    pad = processor.tokenizer.pad_token_id
    while row and row[-1] == pad:
        row = row[:-1]
    return len(row)


def reference(model, processor, batch, script, images, b, **kwargs):
    prompt = torch.tensor([batch["prompts"][b]])
    encoded = _row_visuals(batch, b)
    return two_round_reference(model, PerceptionInputs(processor), prompt, *encoded, images[b],
                               kwargs.get("max_new_tokens", MAX_NEW_TOKENS), {model.generation_config.eos_token_id},
                               max_perception_rounds=kwargs.get("max_perception_rounds", 1),
                               logits_processor=script.as_list(), boxes=kwargs.get("boxes"))


def _row_visuals(batch, b):
    """Row b's own pixel_values and image_grid_thw (None for a row without an image)."""
    with_image = [i for i, prompt in enumerate(batch["prompts"]) if batch["image_token_id"] in prompt]
    if b not in with_image:
        return None, None
    grids = batch["image_grid_thw"]
    k = with_image.index(b)
    pixels = torch.split(batch["pixel_values"], [int(g.prod()) for g in grids])
    return pixels[k], grids[k : k + 1]


def demo_rows(per_file=6):
    """Rows of the demo test splits of every branch: region, re-encoding and plain rows."""
    rows = []
    for prefix in ("clip", "detection", "seg"):
        rows += json.loads((DATA / "demo" / f"vpt_demo_{prefix}_test.json").read_text())[:per_file]
    return rows


def test_one_call_answers_equal_the_two_round_reference_on_the_demo_split(model, processor):
    rows = demo_rows()
    script = ScriptedTurns(processor.tokenizer)
    questions, images, expected_kinds = [], [], []
    for k, row in enumerate(rows):
        images.append(open_image(str(DATA / row["images"][0])))
        questions.append(f"Row {k}. " + row["messages"][0]["content"].replace("<image>", ""))
        expected_kinds.append(None)
    batch = prompt_batch(processor, model.config, questions, images)
    for k, row in enumerate(rows):
        if len(row["messages"]) == 4:  # region or re-encoding: script round 1 as the row's own tokens
            first = row["messages"][1]["content"]
            is_region = first.startswith(RS)
            script.add(batch["prompts"][k], {0: first + END if is_region else first.split("|>")[0] + "|>"})
            expected_kinds[k] = "region" if is_region else next(
                name for prefix, name in (("<|detection", "dino"), ("<|seg", "sam"), ("<|clip", "clip")) if first.startswith(prefix))
    answers, traces = generate(model, processor, batch, script, images)

    kinds_seen = set()
    for k in range(len(rows)):
        ref_answer, ref_trace = reference(model, processor, batch, script, images, k)
        assert answers[k] == ref_answer, f"row {k}: one-call {answers[k]} != reference {ref_answer}"
        assert traces[k] == ref_trace.to_dict()
        if expected_kinds[k]:
            assert traces[k]["rounds"] and traces[k]["rounds"][0]["kind"] == expected_kinds[k], (k, traces[k])
        kinds_seen.update(r["kind"] for r in traces[k]["rounds"])
    assert {"region", "clip", "dino", "sam"} <= kinds_seen


def test_round_two_is_laid_out_as_the_published_conversation(model, processor):
    """The tokens the loop builds for round 2 equal the released round-2 row, encoded as in training."""
    rows = [r for r in demo_rows(3) if len(r["messages"]) == 4]
    script = ScriptedTurns(processor.tokenizer)
    images = [open_image(str(DATA / r["images"][0])) for r in rows]
    questions = [f"Row {k}. " + r["messages"][0]["content"].replace("<image>", "") for k, r in enumerate(rows)]
    batch = prompt_batch(processor, model.config, questions, images)
    for k, row in enumerate(rows):
        first = row["messages"][1]["content"]
        script.add(batch["prompts"][k], {0: first + END if first.startswith(RS) else first.split("|>")[0] + "|>"})
    settings = DecodeSettings.from_config(model, copy.deepcopy(model.generation_config), batch["input_ids"],
                                          script.as_list())
    settings.max_new_tokens, settings.do_sample = MAX_NEW_TOKENS, False
    generator = VPTGenerator(model, PerceptionInputs(processor), settings, True, 1)
    with torch.no_grad():
        done = generator.run(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"], images)
    for row, question, generated in zip(rows, questions, done):
        messages = [{"role": "user", "content": "<image>" + question}, *row["messages"][1:3]]
        branch_images = {}
        for column in ("clip_images", "detection_images", "seg_images"):
            if row.get(column):
                name = {"clip_images": "clip", "detection_images": "dino", "seg_images": "sam"}[column]
                branch_images[name] = [open_image(str(DATA / p)) for p in row[column]]
        expected = encode_conversation(processor, model.config, messages,
                                       images=[open_image(str(DATA / p)) for p in row["images"]],
                                       branch_images=branch_images, add_generation_prompt=True)
        assert generated.tokens[: generated.segment_start] == expected["input_ids"]


MALFORMED = {
    "unclosed region": (RS + "<|x_1|><|y_1|>" + END, "never ends"),
    "one coordinate": (RS + "<|x_1|><|x_2|>" + RE + END, "no y index"),
    "a word inside a region": (RS + "<|x_1|>hello<|y_1|>" + RE + END, "other than grid"),
    "index outside the grid": (RS + "<|x_8|><|y_1|>" + RE + END, "other than grid"),
    "two kinds at once": (RS + "<|x_1|><|y_1|>" + RE + "<|clip_action_start|>", "two kinds"),
}


def test_malformed_sequences_end_in_the_turn_as_answer_without_failing_the_batch(model, processor):
    cases = list(MALFORMED.items()) + [("good region", (RS + "<|x_1|><|y_2|><|x_3|><|y_2|>" + RE + END, None)),
                                       ("good action", ("<|seg_action_start|>", None))]
    image = Image.new("RGB", (224, 168), (90, 120, 200))
    images = [image] * len(cases)
    batch = prompt_batch(processor, model.config, [f"Case {name}?" for name, _ in cases], images)
    script = ScriptedTurns(processor.tokenizer)
    for k, (_, (text, _)) in enumerate(cases):
        script.add(batch["prompts"][k], {0: text})
    answers, traces = generate(model, processor, batch, script, images, max_new_tokens=20)
    tokenizer = processor.tokenizer
    for k, (name, (text, problem)) in enumerate(cases):
        ref_answer, _ = reference(model, processor, batch, script, images, k, max_new_tokens=20)
        assert answers[k] == ref_answer, name
        if problem is None:
            assert len(traces[k]["rounds"]) == 1 and traces[k]["problem"] is None, name
            continue
        assert traces[k]["rounds"] == [], name
        assert problem in traces[k]["problem"], (name, traces[k]["problem"])
        written = text + ("<|clip_action|><|clip_action_end|>" if text.endswith("start|>") else "")
        assert tokenizer.decode(answers[k]) == written, name
    good = traces[len(MALFORMED)]["rounds"][0]
    assert good["grid_boxes"] == [[1, 2, 3, 2]] and good["pixel_boxes"] == [[0, 21, 140, 84]]


def test_a_region_cut_by_max_new_tokens_is_not_acted_on(model, processor):
    image = Image.new("RGB", (224, 224), (200, 200, 200))
    batch = prompt_batch(processor, model.config, ["Short?"], [image])
    script = ScriptedTurns(processor.tokenizer)
    script.add(batch["prompts"][0], {0: RS + "<|x_1|><|y_1|>" + RE})
    answers, traces = generate(model, processor, batch, script, [image], max_new_tokens=3)
    assert traces[0]["rounds"] == [] and traces[0]["truncated"]
    assert "max_new_tokens" in traces[0]["problem"]
    assert processor.tokenizer.decode(answers[0]) == RS + "<|x_1|><|y_1|>"


def test_perception_rounds_are_bounded(model, processor):
    image = Image.new("RGB", (224, 224), (30, 30, 30))
    batch = prompt_batch(processor, model.config, ["Look twice?"], [image])
    script = ScriptedTurns(processor.tokenizer)
    region = RS + "<|x_4|><|y_4|>" + RE + END
    script.add(batch["prompts"][0], {0: region, 1: "<|clip_action_start|>"})
    for bound in (1, 2):
        answers, traces = generate(model, processor, batch, script, [image], max_perception_rounds=bound)
        assert [r["kind"] for r in traces[0]["rounds"]] == ["region", "clip"][:bound]
        ref_answer, _ = reference(model, processor, batch, script, [image], 0, max_perception_rounds=bound)
        assert answers[0] == ref_answer
    # With one round, the second request is answer text: the action is not forced or acted on.
    answers, _ = generate(model, processor, batch, script, [image], max_perception_rounds=1)
    assert processor.tokenizer.decode(answers[0]).startswith("<|clip_action_start|>")


def test_perception_off_suppresses_every_perception_token(model, processor):
    images = [Image.new("RGB", (224, 224), (30 * k, 100, 100)) for k in range(3)]
    batch = prompt_batch(processor, model.config, ["What is it?", "Where?", "Which?"], images)
    inputs = {k: v for k, v in batch.items() if k not in ("prompts", "image_token_id")}
    on = model.generate(**inputs, processor=processor, vpt_images=images, max_new_tokens=8, do_sample=False)
    assert any(model.vpt_last_traces[b]["rounds"] for b in range(3)), "the random model should ask for perception"
    off = model.generate(**inputs, processor=processor, vpt_images=images, max_new_tokens=8, do_sample=False,
                         allow_perception=False)
    vocab = PerceptionVocabulary.from_model(model.config, processor.tokenizer)
    assert not set(off[:, batch["input_ids"].shape[1]:].flatten().tolist()) & set(vocab.perception_starts())
    assert all(trace["rounds"] == [] for trace in model.vpt_last_traces)
    assert on.shape[0] == off.shape[0] == 3


def test_a_row_without_image_cannot_ask_for_a_second_look(model, processor):
    batch = prompt_batch(processor, model.config, ["No picture here?", "With one?"], [None, Image.new("RGB", (224, 224))])
    script = ScriptedTurns(processor.tokenizer)
    script.add(batch["prompts"][0], {0: "<|dino_action_start|>".replace("dino", "detection")})
    script.add(batch["prompts"][1], {0: "<|detection_action_start|>"})
    images = [None, Image.new("RGB", (224, 224))]
    answers, traces = generate(model, processor, batch, script, images)
    assert traces[0]["rounds"] == [] and "no image" in traces[0]["problem"]
    assert traces[1]["rounds"][0]["kind"] == "dino"


def test_read_perception_reports_branches_the_model_cannot_run(model, processor):
    vocab = PerceptionVocabulary.from_model(model.config, processor.tokenizer)
    ids = processor.tokenizer.encode("<|detection_action_start|><|detection_action|>", add_special_tokens=False)
    assert read_perception(ids, vocab, ["dino"], two_pass=True).kind == "dino"
    lacking = read_perception(ids, vocab, ["clip"], two_pass=True)
    assert lacking.kind is None and "lacks" in lacking.problem
    alignment = read_perception(ids, vocab, ["dino"], two_pass=False)
    assert alignment.kind is None and "alignment-stage" in alignment.problem


def test_streamer_receives_the_prompt_then_the_answer(model, processor):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    image = Image.new("RGB", (224, 224), (10, 200, 10))
    batch = prompt_batch(processor, model.config, ["Stream?"], [image])
    script = ScriptedTurns(processor.tokenizer)
    script.add(batch["prompts"][0], {0: RS + "<|x_0|><|y_0|>" + RE + END})
    streamer = Collect()
    answers, traces = generate(model, processor, batch, script, [image], streamer=streamer)
    assert traces[0]["rounds"] and streamer.ended
    assert streamer.chunks[0] == batch["input_ids"][0].tolist()
    assert sum(streamer.chunks[1:], []) == answers[0]


def test_generate_names_what_it_cannot_take(model, processor):
    batch = prompt_batch(processor, model.config, ["Hi?"], [Image.new("RGB", (224, 224))])
    inputs = {k: v for k, v in batch.items() if k not in ("prompts", "image_token_id")}
    with pytest.raises(VPTInputError, match="processor"):
        model.generate(**inputs, max_new_tokens=2)
    with pytest.raises(VPTInputError, match="detection_images"):
        model.generate(**inputs, processor=processor, detection_images=torch.zeros(1, 3, 224, 224), max_new_tokens=2)
    with pytest.raises(VPTInputError, match="num_beams"):
        model.generate(**inputs, processor=processor, num_beams=2, max_new_tokens=2)
    with pytest.raises(VPTInputError, match=r"cannot honour stop_strings=\['\.'\] \(VPT generation stops at the eos "
                                            r"tokens and max_new_tokens only\); output_scores=True"):
        model.generate(**inputs, processor=processor, stop_strings=["."], output_scores=True, max_new_tokens=2)


def test_generation_options_act_as_in_transformers_generate(model, processor):
    """Options VPT generation once dropped silently (bad words, n-gram blocking, suppression) now
    shape the answer, through the processors transformers' generate builds from the same options."""
    batch = prompt_batch(processor, model.config, ["Describe it."], [Image.new("RGB", (224, 224), (90, 30, 30))])
    inputs = {k: v for k, v in batch.items() if k not in ("prompts", "image_token_id")}
    prompt = inputs["input_ids"].shape[1]

    def answer(**options):
        with torch.no_grad():
            out = model.generate(**inputs, processor=processor, vpt_images=[Image.new("RGB", (224, 224), (90, 30, 30))],
                                 allow_perception=False, do_sample=False, max_new_tokens=8, **options)
        return out[0, prompt:].tolist()

    plain = answer()
    assert answer(bad_words_ids=[[plain[0]]])[0] != plain[0]
    assert answer(suppress_tokens=[plain[0]])[0] != plain[0]
    blocked = answer(no_repeat_ngram_size=1)
    assert len(set(blocked)) == len(blocked) and not set(blocked) & set(inputs["input_ids"][0].tolist())
    assert answer(repetition_penalty=1.0) == plain


@pytest.mark.parametrize("first_turn", [RS + "<|x_2|><|y_5|>" + RE + END, "<|clip_action_start|>"])
def test_the_answer_continues_round_one_without_computing_any_position_twice(model, processor, first_turn):
    image = Image.new("RGB", (224, 224), (60, 60, 160))
    batch = prompt_batch(processor, model.config, ["Once?"], [image])
    script = ScriptedTurns(processor.tokenizer)
    script.add(batch["prompts"][0], {0: first_turn})
    computed = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: computed.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    settings = DecodeSettings.from_config(model, copy.deepcopy(model.generation_config), batch["input_ids"],
                                          script.as_list())
    settings.max_new_tokens, settings.do_sample = MAX_NEW_TOKENS, False
    try:
        with torch.no_grad():
            [row] = VPTGenerator(model, PerceptionInputs(processor), settings, True, 1).run(
                batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"], [image])
    finally:
        hook.remove()
    assert len(row.trace.rounds) == 1
    # Every token of the final sequence but the last one chosen is computed exactly once.
    assert sum(computed) == len(row.tokens) - 1


def test_generation_never_decodes_past_the_context(model, processor):
    image = Image.new("RGB", (224, 224), (90, 30, 30))
    batch = prompt_batch(processor, model.config, ["Describe it."], [image])
    inputs = {k: v for k, v in batch.items() if k not in ("prompts", "image_token_id")}
    prompt = inputs["input_ids"].shape[1]
    text_config = model.config.get_text_config()
    context = text_config.max_position_embeddings
    try:
        text_config.max_position_embeddings = prompt + 3
        with torch.no_grad():
            out = model.generate(**inputs, processor=processor, vpt_images=[image], allow_perception=False, do_sample=False,
                                 max_new_tokens=50, return_dict_in_generate=True)
        assert out.sequences.shape[1] <= prompt + 3
        assert "reached the model's context of" in out.traces[0]["problem"]
        text_config.max_position_embeddings = prompt
        with pytest.raises(VPTInputError, match=f"prompts of {prompt} tokens leave no room in the model's context"):
            model.generate(**inputs, processor=processor, vpt_images=[image], max_new_tokens=5)
    finally:
        text_config.max_position_embeddings = context
