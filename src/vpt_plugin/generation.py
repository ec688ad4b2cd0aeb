"""One-call VPT generation: round 1, the perception it asks for, and the answer, in one call.

``VPTQwen2VLForConditionalGeneration.generate`` runs the loop of method.md section 4 for a
batch: decode until a turn ends; after ``<|B_action_start|>`` write ``<|B_action|>`` and
``<|B_action_end|>`` (the control state is the hidden state that predicted ``<|B_action|>``);
run the branch or crop the regions; append the perception turn as the published round 2
lays it out; decode the answer. Each row keeps the keys and values of every position the
second round shares with the first, so only the new turn is computed. Rows stay in one
batch: at each phase the cache is re-laid so every row's reused prefix ends at the same
column, and the new tokens of all rows are computed in one forward.

``two_round_reference`` is the plain flow of the published evaluation (round 1, then round 2
from scratch through the model's two-pass forward, one row at a time); in greedy decoding
both give the same text.
"""

import threading
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList

from .box_heads import mask_from_logits, mask_to_runs
from .branches import VPTInputError, get_branch
from .perception import (
    REGION,
    Perception,
    PerceptionVocabulary,
    assistant_turn_text,
    branch_turn_content,
    crop_boxes,
    next_turn_ids,
    question_before,
    questions_for_images,
    read_perception,
    region_turn_content,
)
from .vision_features import DecoderLayerFeatures, VisionFeatures


def rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


@dataclass
class PerceptionInputs:
    """How the loop turns a crop or a branch request into model inputs.

    ``processor``: the model's Qwen2VLProcessor (tokenizer, image processor). ``prepare_image``:
    applied to crops and clip-branch images before the image processor (LLaMA-Factory's
    resolution options when it generates; RGB conversion otherwise). Branch encoders with
    their own preprocessing get the image in RGB, as in training.
    """

    processor: object
    prepare_image: object = rgb

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def crop_inputs(self, crops: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.processor.image_processor(images=[self.prepare_image(c) for c in crops], return_tensors="pt")
        return out.pixel_values, out.image_grid_thw

    def branch_images(self, name: str, images: list[Image.Image]) -> list[Image.Image]:
        if get_branch(name).has_encoder:
            return [rgb(image) for image in images]
        return [self.prepare_image(image) for image in images]


@dataclass
class GenerationTrace:
    """What one row did: its perception rounds, the round-1 text, and why tokens were not used."""

    rounds: list = field(default_factory=list)  # {"kind", "tokens", "grid_boxes" or "boxes", "pixel_boxes"} per round
    first_turn: str = ""
    problem: str | None = None
    truncated: bool = False
    answer_boxes: list = field(default_factory=list)  # the box decoded for each <|perception_box|> of the answer
    # With a mask decoder: each answer box's mask over the image (box_heads.mask_to_runs).
    answer_masks: list = field(default_factory=list)

    def to_dict(self) -> dict:
        found = {"rounds": self.rounds, "first_turn": self.first_turn, "problem": self.problem, "truncated": self.truncated}
        if self.answer_boxes:
            found["answer_boxes"] = self.answer_boxes
        if self.answer_masks:
            found["answer_masks"] = self.answer_masks
        return found


@dataclass
class VPTGenerateOutput:
    """``generate(..., return_dict_in_generate=True)``: the sequences and each row's trace."""

    sequences: torch.Tensor
    traces: list


# ---------------------------------------------------------------------------- settings


# Set when the process is shutting down (the API server's SIGTERM): every row ends at its next token.
STOP_REQUESTED = threading.Event()

# Generation options the one-call loop cannot honour: option -> (its neutral values, why).
UNSUPPORTED_OPTIONS = {
    "num_beams": ((None, 1), "beam search keeps several hypotheses per row; VPT decodes one"),
    "num_beam_groups": ((None, 1), "group beam search is beam search"),
    "diversity_penalty": ((None, 0.0), "it applies to group beam search"),
    "constraints": ((None,), "constrained decoding is beam search"),
    "force_words_ids": ((None,), "constrained decoding is beam search"),
    "num_return_sequences": ((None, 1), "VPT decodes one answer per row; repeat the row for more"),
    "guidance_scale": ((None, 1.0), "classifier-free guidance runs a second model call per step that knows no perception"),
    "penalty_alpha": ((None, 0.0), "contrastive search needs its own forward per candidate"),
    "dola_layers": ((None,), "DoLa reads early-exit logits of a plain forward"),
    "prompt_lookup_num_tokens": ((None,), "assisted decoding verifies drafts with a plain forward"),
    "assistant_early_exit": ((None,), "assisted decoding verifies drafts with a plain forward"),
    "token_healing": ((None, False), "it rewrites the prompt's last tokens"),
    "stop_strings": ((None,), "VPT generation stops at the eos tokens and max_new_tokens only"),
    "max_time": ((None,), "VPT generation stops at the eos tokens and max_new_tokens only"),
    "output_scores": ((None, False), "VPT generation returns sequences and traces"),
    "output_logits": ((None, False), "VPT generation returns sequences and traces"),
    "output_attentions": ((None, False), "VPT generation returns sequences and traces"),
    "output_hidden_states": ((None, False), "VPT generation returns sequences and traces"),
}


def check_generation_options(config: GenerationConfig) -> None:
    """Refuse, naming each, the generation options VPT generation cannot honour."""
    refused = [f"{name}={getattr(config, name)!r} ({why})" for name, (neutral, why) in UNSUPPORTED_OPTIONS.items()
               if getattr(config, name, None) not in neutral]
    if refused:
        raise VPTInputError("VPT generation cannot honour " + "; ".join(refused))


@dataclass
class DecodeSettings:
    max_new_tokens: int
    eos_ids: set
    pad_id: int
    do_sample: bool
    processors: LogitsProcessorList

    @classmethod
    def from_config(cls, model, config: GenerationConfig, input_ids: torch.Tensor, extra=None) -> "DecodeSettings":
        """Decoding settings of ``generate``: the logits processors and warpers are transformers' own,
        built from ``config`` by the model's ``GenerationMixin`` as its ``generate`` builds them (every
        option: penalties, n-gram blocking, bad words, min length, suppression, min_p, typical_p, ...)."""
        check_generation_options(config)
        input_length = input_ids.shape[1]
        max_new_tokens = config.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = max((config.max_length or 20) - input_length, 1)
        # GenerationMixin's own preparation (private, pinned transformers): eos/pad tensors the processors read.
        model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=input_ids.device)
        processors = model._get_logits_processor(config, input_ids_seq_length=input_length, encoder_input_ids=input_ids,
                                                 logits_processor=LogitsProcessorList(extra or []),
                                                 device=input_ids.device, model_kwargs={})
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = config.pad_token_id if config.pad_token_id is not None else next(iter(eos_ids), 0)
        return cls(max_new_tokens, eos_ids, pad, bool(config.do_sample), processors)


def decide_turn(body: list[int], vocab, config, may_perceive: bool, has_image: bool, truncated: bool,
                decoded_boxes: list | None = None) -> Perception:
    """What a finished assistant turn leads to; ``kind`` None means the turn is the answer."""
    if not may_perceive:
        return Perception(None)
    perception = read_perception(body, vocab, config.vision_encoder_ls, config.num_inner_forward_run == 2, decoded_boxes)
    problems = [perception.problem] if perception.problem else []
    if truncated:
        problems.insert(0, "the turn was cut off before it ended (max_new_tokens, the context, or a stop)")
        if perception.kind == REGION:
            problems.append("its regions were not acted on")
            perception.kind = None
    if perception.kind is not None and not has_image:
        problems.append("asks for perception, but the row has no image to look at again")
        perception.kind = None
    perception.problem = "; ".join(problems) or None
    return perception


@dataclass
class PerceptionTurn:
    """What a perception adds: the replayed assistant turn, the user turn showing the perception
    and the next assistant header (``ids``); the crops' image inputs for regions; the trace entry."""

    ids: list
    crops: tuple | None  # (pixel_values, image_grid_thw) of the region crops
    round_trace: dict


def perception_turn(perception: Perception, body: list[int], image, inputs: PerceptionInputs, config) -> PerceptionTurn:
    """The turns a perception of ``image`` appends after the assistant turn ``body`` (published round-2 layout)."""
    tokenizer = inputs.tokenizer
    round_trace = {"kind": perception.kind, "tokens": tokenizer.decode(body, skip_special_tokens=False)}
    crops = None
    if perception.kind == REGION:
        boxes = crop_boxes(perception, *image.size, margin=config.box_crop_margin, grid=config.box_crop_grid)
        crops = inputs.crop_inputs([image.crop(box) for box in boxes])
        merge = config.vision_config.spatial_merge_size
        content = region_turn_content([int(g.prod()) // merge**2 for g in crops[1]])
        if perception.boxes:
            round_trace.update(boxes=[[round(v, 4) for v in b] for b in perception.boxes])
        else:
            round_trace.update(grid_boxes=[list(b) for b in perception.grid_boxes])
        round_trace.update(pixel_boxes=[list(b) for b in boxes])
    else:
        images = inputs.branch_images(perception.kind, [image])
        content = branch_turn_content(perception.kind, get_branch(perception.kind).feature_tokens(config, images, inputs.processor)[0])
    text = assistant_turn_text(perception, tokenizer.decode(body, skip_special_tokens=True))
    return PerceptionTurn(next_turn_ids(tokenizer, text, content), crops, round_trace)


def answer_mask_runs(mask_logits: list, image: Image.Image | None) -> list[dict]:
    """Answer masks for a trace: each box's mask logits at the image's size, as run lengths."""
    return [mask_to_runs(mask_from_logits(logits, (image.height, image.width) if image else tuple(logits.shape)))
            for logits in mask_logits]


def replayed_boxes(boxes: list, written: int, replayed: int) -> list:
    """The boxes once a turn that wrote ``written`` box tokens is replayed holding ``replayed`` of them:
    a region's turn is replayed as written (all kept), a branch's as its action sequence (none kept)."""
    return boxes if replayed == written else boxes[: len(boxes) - written]


# ---------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One row of the batch: its tokens, images, cache columns and trace."""

    tokens: list
    base_images: list  # (pixel_values, grid_thw) per <|image_pad|> run, in sequence order
    branch_images: list  # (branch name, PIL image) per branch pad run, in sequence order
    source: Image.Image | None  # the original image that crops and branches read
    segment_start: int  # where the current turn's generated tokens begin
    slot: int = -1  # batch index in the current cache
    columns: list = field(default_factory=list)  # cache column of each cached token
    controls: dict = field(default_factory=dict)  # token index of an action start -> its hidden state
    boxes: list = field(default_factory=list)  # the box (normalised, a tensor) of each <|perception_box|> in tokens
    box_states: list = field(default_factory=list)  # the state that decoded each box (None: given in the prompt)
    positions: torch.Tensor | None = None  # (3, len(tokens)) M-RoPE positions of the known tokens
    next_position: int = 0
    reuse: int = 0  # tokens[:reuse] keep their cached keys and values in the next phase
    segment_done: bool = False
    truncated: bool = False
    answer: list = field(default_factory=list)
    trace: GenerationTrace = field(default_factory=GenerationTrace)

    @property
    def cached(self) -> int:
        return len(self.columns)


def note_problem(row: Row, problem: str) -> None:
    """Add ``problem`` to what the row's trace says went wrong."""
    row.trace.problem = "; ".join(p for p in (row.trace.problem, problem) if p)


def pad_runs(tokens: list[int], pad_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of ``pad_id`` in ``tokens``: one image's features each."""
    runs, start = [], None
    for i, token in enumerate(tokens + [None]):
        if token == pad_id and start is None:
            start = i
        elif token != pad_id and start is not None:
            runs.append((start, i))
            start = None
    return runs


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------- the loop


class VPTGenerator:
    """One ``generate`` call of a VPT model (see the module docstring)."""

    def __init__(self, model, perception_inputs: PerceptionInputs, settings: DecodeSettings,
                 allow_perception: bool, max_perception_rounds: int, streamer=None):
        self.model = model
        self.config = model.config
        self.inputs = perception_inputs
        self.settings = settings
        self.allow_perception = allow_perception
        self.max_rounds = max_perception_rounds
        self.streamer = streamer
        self.vocab = PerceptionVocabulary.from_model(model.config, perception_inputs.tokenizer)
        self.device = model.device
        # Positions past the text model's context were never trained: no row decodes beyond it.
        self.context_length = model.config.get_text_config().max_position_embeddings
        self.cache = None
        self.mask = None  # (batch, cache columns): 1 where a column holds a real token

    # ------------------------------------------------------------ entry point

    def run(self, input_ids, attention_mask, pixel_values, image_grid_thw, images, boxes=None) -> list[Row]:
        if input_ids.shape[1] >= self.context_length:
            raise VPTInputError(f"prompts of {input_ids.shape[1]} tokens leave no room in the model's context of "
                                f"{self.context_length} tokens")
        rows = self._rows_from_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, images, boxes)
        phase = rows
        while phase:
            self._start_phase(phase)
            self._decode(phase)
            phase = [row for row in phase if self._end_segment(row)]
        return rows

    def _rows_from_inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw, images, boxes) -> list[Row]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        grids = list(image_grid_thw) if image_grid_thw is not None else []
        patches = torch.split(pixel_values, [int(g.prod()) for g in grids]) if grids else []
        next_image = 0
        rows = []
        for b in range(input_ids.shape[0]):
            tokens = input_ids[b][attention_mask[b].bool()].tolist()
            count = len(pad_runs(tokens, self.config.image_token_id))
            base = [(patches[i], grids[i]) for i in range(next_image, next_image + count)]
            if len(base) != count:
                raise VPTInputError(f"row {b}: {count} images in its tokens but only {len(base)} left in pixel_values")
            next_image += count
            source = images[b] if images is not None and b < len(images) else None
            rows.append(Row(tokens=tokens, base_images=base, branch_images=[], source=source, segment_start=len(tokens)))
        if next_image != len(grids):
            raise VPTInputError(f"{len(grids)} images given but the prompts hold {next_image}")
        given = list(boxes.to(self.device, torch.float32)) if boxes is not None else []
        if given and self.vocab.box is None:
            raise VPTInputError(f"{len(given)} boxes given, but this model has no box heads (config.box_heads is off)")
        wanted = [row.tokens.count(self.vocab.box) if self.vocab.box is not None else 0 for row in rows]
        if sum(wanted) != len(given):
            raise VPTInputError(f"the prompts hold {sum(wanted)} <|perception_box|> tokens (per row {wanted}) "
                                f"but {len(given)} boxes were given")
        for row, count in zip(rows, wanted):
            row.boxes, given = given[:count], given[count:]
            row.box_states = [None] * count
        return rows

    # ------------------------------------------------------------ phases

    def _start_phase(self, rows: list[Row]) -> None:
        """Re-lay the cache for ``rows`` (their reused prefixes end at one column) and compute their new tokens."""
        reuse = [row.reuse for row in rows]
        width = max(reuse)
        batch = len(rows)
        mask = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        layers = []
        if width and self.cache is not None:
            for layer in self.cache.layers:
                keys = layer.keys.new_zeros(batch, layer.keys.shape[1], width, layer.keys.shape[3])
                values = layer.values.new_zeros(batch, layer.values.shape[1], width, layer.values.shape[3])
                for b, row in enumerate(rows):
                    if row.reuse:
                        columns = torch.tensor(row.columns[: row.reuse], device=self.device)
                        keys[b, :, width - row.reuse :] = layer.keys[row.slot][:, columns]
                        values[b, :, width - row.reuse :] = layer.values[row.slot][:, columns]
                layers.append((keys, values))
        for b, row in enumerate(rows):
            mask[b, width - row.reuse :] = 1
            row.columns = list(range(width - row.reuse, width))
            row.slot = b
            row.positions = self._positions(row)
            row.next_position = int(row.positions.max()) + 1 if row.tokens else 0
            row.controls = {i: c for i, c in row.controls.items() if i < row.reuse}
            row.segment_done = row.truncated = False
        self.cache = DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()
        self.mask = mask
        self._prefill(rows)

    def _positions(self, row: Row) -> torch.Tensor:
        """M-RoPE positions of the row's tokens, as the model's forward computes them."""
        ids = torch.tensor([row.tokens], device=self.device)
        if not row.base_images:
            return torch.arange(len(row.tokens), device=self.device).expand(3, -1)
        types = (ids == self.config.image_token_id).int()
        grid = torch.stack([g for _, g in row.base_images]).to(self.device)
        positions, _ = self.model.model.get_rope_index(ids, types, image_grid_thw=grid)
        return positions[:, 0]

    def _prefill(self, rows: list[Row]) -> None:
        """Compute every row's uncached tokens in one forward; pick each row's next token."""
        suffixes = [row.tokens[row.cached :] for row in rows]
        length = max(len(s) for s in suffixes)
        batch = len(rows)
        ids = torch.full((batch, length), self.settings.pad_id, dtype=torch.long, device=self.device)
        positions = torch.zeros(3, batch, length, dtype=torch.long, device=self.device)
        window_mask = torch.zeros(batch, length, dtype=torch.long, device=self.device)
        for b, (row, suffix) in enumerate(zip(rows, suffixes)):
            start = length - len(suffix)
            ids[b, start:] = torch.tensor(suffix, device=self.device)
            positions[:, b, start:] = row.positions[:, row.cached :]
            window_mask[b, start:] = 1
        embeds = self._place_boxes(rows, self.model.get_input_embeddings()(ids), length)
        embeds, image_layers = self._place_base_images(rows, embeds, length)
        features = self._branch_features(rows)
        image_layers += [(b, self._window_column(rows[b], start, length), feature[3])
                         for (b, start), feature in features.items()]
        layer_features = DecoderLayerFeatures.of_images((batch, length), image_layers)

        computed = [list(range(row.cached, len(row.tokens))) for row in rows]
        missing = [(row, i) for row in rows for i in self._actions_in_suffix(row) if i - 1 not in row.controls]
        if missing:
            # Some action's control state is not known yet: a first pass over the new tokens reads it.
            first = self._place_branch_features(rows, embeds, length, features, reweight=False)
            first = self._place_controls(rows, first, length)
            columns = self.cache.get_seq_length()
            states = self._language_model(first, positions, window_mask, layer_features, extend_mask=False)
            self.cache.crop(columns)
            self._store_controls(rows, states, computed)
        embeds = self._place_branch_features(rows, embeds, length, features, reweight=True)
        embeds = self._place_controls(rows, embeds, length)
        states = self._language_model(embeds, positions, window_mask, layer_features)
        self._store_controls(rows, states, computed)
        start = self.mask.shape[1] - length
        for row, suffix in zip(rows, suffixes):
            row.columns += list(range(start + length - len(suffix), start + length))
        self._choose_next(rows, states[:, -1])

    def _language_model(self, embeds, positions, window_mask, layer_features=None, extend_mask=True):
        mask = torch.cat([self.mask, window_mask], dim=1)
        if extend_mask:
            self.mask = mask
        visual = layer_features.language_model_inputs() if layer_features is not None else {}
        out = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=positions, attention_mask=mask, past_key_values=self.cache, use_cache=True,
            **visual,
        )
        return out.last_hidden_state

    def _decode(self, rows: list[Row]) -> None:
        """One token per step for every row whose turn has not ended."""
        while not all(row.segment_done for row in rows):
            batch = len(rows)
            ids = torch.full((batch, 1), self.settings.pad_id, dtype=torch.long, device=self.device)
            positions = torch.zeros(3, batch, 1, dtype=torch.long, device=self.device)
            window_mask = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            live = [b for b, row in enumerate(rows) if not row.segment_done]
            for b in live:
                row = rows[b]
                ids[b, 0] = row.tokens[-1]
                positions[:, b, 0] = row.next_position
                window_mask[b, 0] = 1
            # Tokens decoded here are plain text: an action acted on is fed in the next phase's prefill.
            # A box token just written is fed as its decoded box's encoding.
            embeds = self._place_boxes([rows[b] if b in live else None for b in range(batch)],
                                       self.model.get_input_embeddings()(ids), 1, last_only=True)
            states = self._language_model(embeds, positions, window_mask)
            column = self.mask.shape[1] - 1
            for b in live:
                rows[b].columns.append(column)
                rows[b].next_position += 1
            live_rows = [rows[b] for b in live]
            self._store_controls(live_rows, states[live], [[len(row.tokens) - 1] for row in live_rows])
            self._choose_next(live_rows, states[live, -1])

    # ------------------------------------------------------------ embeddings

    @staticmethod
    def _window_column(row: Row, index: int, length: int) -> int:
        """The column of the row's token ``index`` in a window of ``length`` right-aligned new tokens."""
        return index - row.cached + length - (len(row.tokens) - row.cached)

    def _place_boxes(self, rows, embeds, length, last_only: bool = False):
        """Each ``<|perception_box|>`` among a window's new tokens takes its box's encoding as input embedding.

        ``last_only``: the window is each row's last token (``None`` for rows not in it).
        """
        if self.vocab.box is None:
            return embeds
        wanted = []  # (batch index, column, box)
        for b, row in enumerate(rows):
            if row is None:
                continue
            box_indices = [i for i, t in enumerate(row.tokens) if t == self.vocab.box]
            first = len(row.tokens) - 1 if last_only else row.cached
            for k, i in enumerate(box_indices):
                if i >= first:
                    column = length - 1 if last_only else self._window_column(row, i, length)
                    wanted.append((b, column, row.boxes[k]))
        if not wanted:
            return embeds
        encoded = self.model.box_heads.encode(torch.stack([box for _, _, box in wanted]).to(embeds.dtype))
        embeds = embeds.clone()
        for (b, column, _), encoding in zip(wanted, encoded):
            embeds[b, column] = encoding
        return embeds

    def _place_base_images(self, rows, embeds, length):
        """Features of the base images (prompt images, crops) whose pads are among the new tokens.

        Returns the embeddings and, per image, ``(batch index, column, per-layer features or None)``.
        """
        wanted = []  # (batch index, pad start in the window, pixel_values, grid)
        for b, row in enumerate(rows):
            for (start, _), (pixels, grid) in zip(pad_runs(row.tokens, self.config.image_token_id), row.base_images):
                if start >= row.cached:
                    wanted.append((b, self._window_column(row, start, length), pixels, grid))
        if not wanted:
            return embeds, []
        pixels = torch.cat([w[2] for w in wanted]).to(self.device, self.model.dtype)
        grids = torch.stack([w[3] for w in wanted]).to(self.device)
        features = self.model.encode_base_images(pixels, grids)
        embeds = embeds.clone()
        for (b, start, _, _), feature in zip(wanted, features.per_image):
            embeds[b, start : start + feature.shape[0]] = feature.to(embeds.dtype)
        layers = features.layers_per_image()
        return embeds, [(b, start, image_layers) for (b, start, _, _), image_layers in zip(wanted, layers)]

    def _branch_features(self, rows) -> dict:
        """Projected (not yet re-weighted) features of each branch image among the new tokens.

        Returns ``{(batch index, pad start in the row): (branch name, features, action index, per-layer
        features or None)}``; per-layer features for branches that re-encode with the base ViT.
        """
        wanted = {}  # branch name -> [(batch index, start, image, action token index)]
        for b, row in enumerate(rows):
            runs = self._branch_runs(row)
            for (name, start, image, action) in runs:
                if start >= row.cached:
                    wanted.setdefault(name, []).append((b, start, image, action))
        found = {}
        for name, items in wanted.items():
            branch = get_branch(name)
            images = self.inputs.branch_images(name, [item[2] for item in items])
            questions = None
            if branch.text_conditioned:
                questions = [question_before(rows[b].tokens, start, self.inputs.tokenizer) for b, start, _, _ in items]
            inputs = {k: v.to(self.device) for k, v in branch.preprocess(images, self.inputs.processor, questions).items()}
            encoded = branch.encode(self.model, inputs)
            projected = self.model.branch_projector(name).project_features(encoded)
            layers = encoded.layers_per_image() if isinstance(encoded, VisionFeatures) else [None] * len(items)
            for (b, start, _, action), feature, image_layers in zip(items, projected, layers):
                found[(b, start)] = (name, feature, action, image_layers)
        return found

    def _branch_runs(self, row: Row) -> list:
        """``(branch name, pad start, image, index of its <|B_action|> token)`` per branch image of the row."""
        runs = []
        for name in dict.fromkeys(name for name, _ in row.branch_images):
            ids = self.config.branch_ids(name)
            images = [image for n, image in row.branch_images if n == name]
            actions = [i for i, t in enumerate(row.tokens) if t == ids["action"]]
            for k, ((start, _), image) in enumerate(zip(pad_runs(row.tokens, ids["image"]), images)):
                runs.append((name, start, image, actions[k] if k < len(actions) else None))
        return runs

    def _place_branch_features(self, rows, embeds, length, features, reweight: bool):
        if not features:
            return embeds
        embeds = embeds.clone()
        for (b, start), (name, feature, action, _) in features.items():
            row = rows[b]
            control = row.controls.get(action - 1) if action is not None else None
            if reweight and control is None:
                raise VPTInputError(f"branch {name!r} image without a control state (no {get_branch(name).tokens.action})")
            if reweight:
                feature = self.model.branch_projector(name).reweight([feature], control[None])[0]
            column = self._window_column(row, start, length)
            embeds[b, column : column + feature.shape[0]] = feature.to(embeds.dtype)
        return embeds

    def _actions_in_suffix(self, row: Row) -> list[int]:
        actions = set(self.vocab.action.values())
        return [i for i in range(row.cached, len(row.tokens)) if row.tokens[i] in actions]

    def _place_controls(self, rows, embeds, length):
        """Each ``<|B_action|>`` among the new tokens takes its action start's hidden state as input embedding."""
        for b, row in enumerate(rows):
            for i in self._actions_in_suffix(row):
                control = row.controls.get(i - 1)
                if control is not None:
                    embeds = embeds.clone()
                    embeds[b, self._window_column(row, i, length)] = control.to(embeds.dtype)
        return embeds

    def _store_controls(self, rows, states, computed):
        """Keep the hidden state of each action start just computed: the control state of its action.

        ``computed[b]``: the token indices of row b whose states are the last columns of ``states[b]``.
        """
        length = states.shape[1]
        for b, (row, indices) in enumerate(zip(rows, computed)):
            for k, i in enumerate(indices):
                if row.tokens[i] in self.vocab.action_start:
                    row.controls[i] = states[b, length - len(indices) + k].detach()

    # ------------------------------------------------------------ choosing tokens

    def _choose_next(self, rows: list[Row], states: torch.Tensor) -> None:
        logits = self.model.lm_head(states).float()
        if not self.allow_perception:
            logits[:, self.vocab.perception_starts()] = float("-inf")
        if self.settings.processors:
            history = torch.full((len(rows), max(len(r.tokens) for r in rows)), self.settings.pad_id, device=self.device)
            for b, row in enumerate(rows):
                history[b, history.shape[1] - len(row.tokens) :] = torch.tensor(row.tokens, device=self.device)
            logits = self.settings.processors(history, logits)
        if self.settings.do_sample:
            chosen = torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]
        else:
            chosen = logits.argmax(dim=-1)
        for b, (row, token) in enumerate(zip(rows, chosen.tolist())):
            last = row.tokens[-1] if row.tokens else None
            branch = self.vocab.action_start.get(last) if self._may_perceive(row) else None
            if branch is not None:
                token = self.vocab.action[branch]  # the token after an action start is its action
            if token == self.vocab.box:
                # The state that predicts the box token carries its box.
                row.boxes.append(self.model.box_heads.decode(states[b : b + 1])[0].float())
                row.box_states.append(states[b])
            row.tokens.append(token)
            self._stream(row, [token])
            if token in self.settings.eos_ids:
                row.segment_done = True
            elif branch is not None and self._may_perceive(row):
                # The published Det model often never closes its action: write the end here, end the turn.
                row.tokens.append(self.vocab.action_end[branch])
                row.segment_done = True
            elif len(row.tokens) - row.segment_start >= self.settings.max_new_tokens:
                row.segment_done = row.truncated = True
            elif STOP_REQUESTED.is_set():
                row.segment_done = row.truncated = True
                note_problem(row, "generation stopped: the process is shutting down")
            elif len(row.tokens) >= self.context_length:
                row.segment_done = row.truncated = True
                note_problem(row, f"the row reached the model's context of {self.context_length} tokens")

    def _may_perceive(self, row: Row) -> bool:
        return self.allow_perception and len(row.trace.rounds) < self.max_rounds

    def _stream(self, row: Row, tokens: list[int]) -> None:
        # Tokens stream as soon as they can only be answer text; a turn that may still ask for
        # perception streams when it ends as the answer (_end_segment).
        if self.streamer is not None and not self._may_perceive(row):
            self.streamer.put(torch.tensor(tokens))

    # ------------------------------------------------------------ turns

    def _end_segment(self, row: Row) -> bool:
        """Decide what the finished turn asks for; returns whether the row goes on to another turn."""
        turn = row.tokens[row.segment_start :]
        body = [t for t in turn if t not in self.settings.eos_ids]
        tokenizer = self.inputs.tokenizer
        if not row.trace.rounds:
            row.trace.first_turn = tokenizer.decode(body, skip_special_tokens=False)
        turn_boxes = self._turn_boxes(row, turn)
        perception = decide_turn(body, self.vocab, self.config, self._may_perceive(row), row.source is not None,
                                 row.truncated, turn_boxes)
        if perception.problem:
            note_problem(row, perception.problem)
        turn_ids = perception_turn(perception, body, row.source, self.inputs, self.config) if perception.kind else None
        if turn_ids is not None and (row.segment_start + len(turn_ids.ids) >= self.context_length
                                     or STOP_REQUESTED.is_set()):
            note_problem(row, "no room in the model's context for the perception turn, so it was not acted on")
            perception.kind, turn_ids = None, None
        if perception.kind is None:
            if self.streamer is not None and self._may_perceive(row):
                self.streamer.put(torch.tensor(turn))
            row.answer = turn
            row.trace.truncated = row.truncated
            row.trace.answer_boxes = [[round(v, 4) for v in box] for box in turn_boxes]
            row.trace.answer_masks = self._answer_masks(row, len(turn_boxes))
            return False
        self._append_perception_turn(row, perception, body, turn_ids)
        return True

    def _answer_masks(self, row: Row, count: int) -> list[dict]:
        """With a mask decoder, the masks of the answer's ``count`` boxes over the row's first image."""
        if not count or not self.config.mask_decoder or not row.base_images:
            return []
        pixels, grid = row.base_images[0]
        features = self.model.encode_base_images(pixels.to(self.device, self.model.dtype), grid[None].to(self.device))
        image = self.model.image_grid(features.per_image[0], grid)
        logits = self.model.mask_decoder(torch.stack(row.box_states[-count:]), [image] * count)
        return answer_mask_runs(logits, row.source)

    def _turn_boxes(self, row: Row, turn: list[int]) -> list:
        """The decoded boxes of the turn's box tokens (the row's last ones), as lists."""
        count = turn.count(self.vocab.box) if self.vocab.box is not None else 0
        return [box.tolist() for box in row.boxes[len(row.boxes) - count :]] if count else []

    def _append_perception_turn(self, row: Row, perception: Perception, body: list[int], turn: PerceptionTurn) -> None:
        tokens = row.tokens[: row.segment_start] + turn.ids
        if self.vocab.box is not None:
            written, replayed = body.count(self.vocab.box), turn.ids.count(self.vocab.box)
            row.boxes = replayed_boxes(row.boxes, written, replayed)
            row.box_states = replayed_boxes(row.box_states, written, replayed)
        if self.vocab.box is not None and tokens.count(self.vocab.box) != len(row.boxes):
            # The replayed turn keeps each box token (an added, not a special, token), so each keeps its box.
            raise RuntimeError(f"the perception turn holds {tokens.count(self.vocab.box)} <|perception_box|> tokens "
                               f"for {len(row.boxes)} boxes")
        reuse = min(common_prefix(row.tokens[: row.cached], tokens), row.cached)
        # Never reuse part of an image's features: recompute from its start.
        for start, end in pad_runs(tokens, self.config.image_token_id) + self._all_branch_runs(tokens):
            if start < reuse < end:
                reuse = start
        row.tokens = tokens
        row.reuse = reuse
        if turn.crops is not None:
            pixels, grids = turn.crops
            row.base_images += list(zip(torch.split(pixels, [int(g.prod()) for g in grids]), grids))
        else:
            row.branch_images.append((perception.kind, row.source))
        row.segment_start = len(tokens)
        row.trace.rounds.append(turn.round_trace)

    def _all_branch_runs(self, tokens):
        return [run for name in self.config.vision_encoder_ls for run in pad_runs(tokens, self.config.branch_ids(name)["image"])]


# ---------------------------------------------------------------------------- the reference flow


@torch.no_grad()
def two_round_reference(model, perception_inputs: PerceptionInputs, input_ids, pixel_values, image_grid_thw, image,
                        max_new_tokens: int, eos_ids, max_perception_rounds: int = 1,
                        logits_processor=None, boxes=None) -> tuple[list[int], GenerationTrace]:
    """The published evaluation's flow for one row, greedy: round 1, then round 2 from scratch.

    Every round re-reads the whole conversation through ``model.forward`` (the two-pass
    forward, which deep-copies the cache for its first pass at every step), as the released
    evaluation does. A box the model writes is decoded by re-running the whole sequence with
    the box token appended (its decoded state comes before it). ``boxes``: those of the prompt's
    box tokens. Returns the answer's token ids and the trace.
    """
    config = model.config
    tokenizer = perception_inputs.tokenizer
    vocab = PerceptionVocabulary.from_model(config, tokenizer)
    eos_ids = set(eos_ids)
    tokens = input_ids[0].tolist()
    crops = (pixel_values, image_grid_thw)
    branch_images = []
    trace = GenerationTrace()
    boxes = [box.tolist() for box in boxes] if boxes is not None else []
    while True:
        turn_masks = []
        turn, truncated = _greedy_turn(model, vocab, tokens, crops, branch_images, perception_inputs, max_new_tokens,
                                       eos_ids, len(trace.rounds) < max_perception_rounds, logits_processor, boxes,
                                       turn_masks)
        body = [t for t in turn if t not in eos_ids]
        if not trace.rounds:
            trace.first_turn = tokenizer.decode(body, skip_special_tokens=False)
        turn_boxes = boxes[len(boxes) - turn.count(vocab.box):] if vocab.box is not None and vocab.box in turn else []
        perception = decide_turn(body, vocab, config, len(trace.rounds) < max_perception_rounds, image is not None,
                                 truncated, turn_boxes)
        if perception.problem:
            trace.problem = perception.problem
        if perception.kind is None:
            trace.truncated = truncated
            trace.answer_boxes = [[round(v, 4) for v in box] for box in turn_boxes]
            trace.answer_masks = answer_mask_runs(turn_masks, image)
            return turn, trace
        turn = perception_turn(perception, body, image, perception_inputs, config)
        if vocab.box is not None:
            boxes = replayed_boxes(boxes, body.count(vocab.box), turn.ids.count(vocab.box))
        if turn.crops is not None:
            crops = turn.crops if crops[0] is None else tuple(torch.cat(pair) for pair in zip(crops, turn.crops))
        else:
            branch_images.append((perception.kind, image))
        tokens = tokens + turn.ids
        trace.rounds.append(turn.round_trace)


def _greedy_turn(model, vocab, tokens, crops, branch_images, perception_inputs, max_new_tokens, eos_ids, may_perceive,
                 logits_processor, boxes, masks):
    """Greedy decoding of one assistant turn through ``model.forward``, from an empty cache.

    ``boxes``: those of the box tokens so far; a box the turn writes is appended to it, and with a
    mask decoder its mask logits to ``masks``.
    """
    device = model.device
    inputs = {"input_ids": torch.tensor([tokens], device=device)}
    if crops[0] is not None:
        inputs.update(pixel_values=crops[0].to(device, model.dtype), image_grid_thw=crops[1].to(device))
    for name in dict.fromkeys(n for n, _ in branch_images):
        images = perception_inputs.branch_images(name, [image for n, image in branch_images if n == name])
        branch = get_branch(name)
        questions = None
        if branch.text_conditioned:
            questions = questions_for_images(tokens, branch.tokens.image_pad, perception_inputs.tokenizer)
        inputs.update({k: v.to(device) for k, v in branch.preprocess(images, perception_inputs.processor, questions).items()})
    if boxes:
        inputs["boxes"] = torch.tensor(boxes, device=device)
    out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    # Text after the prompt continues from its last M-RoPE position (1-D positions without images).
    next_position = len(tokens) + (int(model.model.rope_deltas[0]) if crops[0] is not None else 0)
    turn = []
    logits = out.logits[0, -1]
    while True:
        last = turn[-1] if turn else tokens[-1]
        if logits_processor:
            logits = logits_processor(torch.tensor([tokens + turn], device=device), logits[None].float())[0]
        token = int(logits.argmax())
        branch = vocab.action_start.get(last) if may_perceive else None
        if branch is not None:
            token = vocab.action[branch]
        turn.append(token)
        step_boxes = {}
        if token == vocab.box:
            # Re-run everything with the box token appended (any box: its own embedding cannot reach
            # the state before it) and decode the box from that state.
            rerun = {**inputs, "input_ids": torch.tensor([tokens + turn], device=device),
                     "boxes": torch.tensor(boxes + [[0.0] * 4], device=device)}
            rerun = model(**rerun)
            boxes.append(rerun.pred_boxes[-1].tolist())
            if rerun.pred_masks is not None and rerun.pred_masks[-1] is not None:
                masks.append(rerun.pred_masks[-1])
            step_boxes = {"boxes": torch.tensor(boxes[-1:], device=device)}
        if token in eos_ids:
            return turn, False
        if branch is not None:
            turn.append(vocab.action_end[branch])
            return turn, False
        if len(turn) >= max_new_tokens:
            return turn, True
        position = torch.full((3, 1, 1), next_position, device=device)
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, position_ids=position,
                    use_cache=True, **step_boxes)
        cache, logits = out.past_key_values, out.logits[0, -1]
        next_position += 1
