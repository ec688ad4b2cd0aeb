"""The VPT model, whatever its base: the two-pass forward (method.md section 3) and one-call generation.

Pass 1 runs the LLM with branch features projected without control; the hidden state at
each ``<|B_action_start|>`` becomes the control state; pass 2 runs again with that state as
the input embedding of ``<|B_action|>`` and as the projector's condition.

Two implementations of the same function: by default (``config.reuse_first_pass``) pass 1
stops at the batch's last action start and pass 2 reuses pass 1's keys and values for every
position before the first one whose input differs, so training costs about one pass; with
``reuse_first_pass=False`` both passes run over the whole sequence, as published. The second
is the straightforward oracle the first is tested against (tests/test_reuse_first_pass.py).

:class:`VPTModelMixin` holds all of it; each base (``vpt_plugin.bases``) makes its VPT model by
putting the mixin in front of the base's transformers model, e.g.
``VPTQwen2VLForConditionalGeneration(VPTModelMixin, Qwen2VLForConditionalGeneration)``. The mixin
uses what the Qwen-VL family of transformers models share (``model.visual``,
``model.language_model``, ``get_image_features``, ``compute_3d_position_ids``, ``get_rope_index``)
and adds each base ViT's per-layer features (Qwen3-VL's deepstack) to the decoder as the base does.
"""

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from types import MethodType

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.integrations.deepspeed import deepspeed_config
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from .box_heads import BoxHeads, MaskDecoder, box_losses, mask_losses
from .branches import BRANCHES, ControlProjector, VPTInputError, get_branch
from .vision_features import DecoderLayerFeatures, VisionFeatures
from .vit_fusion import ViTLayerFusion

IGNORE_INDEX = -100


@dataclass
class VPTCausalLMOutputWithPast(ModelOutput):
    """The VPT forward's output: the base models' causal-LM output fields."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    rope_deltas: torch.LongTensor | None = None
    # With box heads: the box decoded before each <|perception_box|> (sequence order, tokens
    # after a call's first position), and the loss's parts.
    pred_boxes: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    box_l1: torch.FloatTensor | None = None
    box_giou: torch.FloatTensor | None = None
    # With the mask decoder: mask logits over the row's first image for each decoded box (None
    # for a row without an image), and where the data gives masks, the mask loss's parts.
    pred_masks: list | None = None
    mask_bce: torch.FloatTensor | None = None
    mask_dice: torch.FloatTensor | None = None


class VPTModelMixin:
    """A base model whose vision branches (``config.vision_encoder_ls``) re-encode on request.

    Branch modules keep the published attribute names (``detection_model``,
    ``detection_projector``, ``seg_model``, ``seg_projector``, ``clip_projector``), so the
    published recipes' module lists and checkpoints address them unchanged.
    """

    def __init__(self, config):
        super().__init__(config)
        for name in config.vision_encoder_ls:
            branch = get_branch(name)
            if branch.has_encoder:
                self.add_module(branch.encoder_attribute, branch.build_encoder(config))
            self.add_module(branch.projector_attribute, branch.build_projector(config))
        if config.box_heads:
            self.box_heads = BoxHeads(config.text_config.hidden_size, config.box_head_size)
        if config.mask_decoder:
            self.mask_decoder = MaskDecoder(config.text_config.hidden_size, config.mask_decoder_size)
        if config.vit_layer_fusion:
            self.vit_fusion = ViTLayerFusion(len(self.model.visual.blocks))
            self.vit_fusion.attach(self.model.visual)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, then each branch reads what it keeps beside its weights
        (``VisionBranch.load_assets``: e.g. a detector's text tokenizer) from the same checkpoint."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        for name in model.config.vision_encoder_ls:
            get_branch(name).load_assets(model, pretrained_model_name_or_path, source_is_encoder=False)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' ``save_pretrained``, plus each branch's assets (``VisionBranch.save_assets``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        for name in self.config.vision_encoder_ls:
            get_branch(name).save_assets(self, save_directory)

    def _init_weights(self, module):
        if isinstance(module, (ControlProjector, BoxHeads, MaskDecoder, ViTLayerFusion)):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also takes the key layout ``save_pretrained`` writes.

        transformers saves Qwen2-VL weights under their hub names (``model.embed_tokens``,
        ``visual.*``) and renames them only in ``from_pretrained``; the Trainer's
        ``resume_from_checkpoint`` reads the saved file with plain ``load_state_dict`` (non-strict),
        which without this would restore none of those weights.
        """
        own = set(self.state_dict())
        if any(key not in own for key in state_dict):
            renamings = [c for c in get_model_conversion_mapping(self) if isinstance(c, WeightRenaming)]
            state_dict = {rename_source_key(key, renamings, [])[0]: value for key, value in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def enable_input_require_grads(self):
        """transformers' hooks, but a branch encoder's output requires grad only while it trains.

        transformers hooks the input embeddings of every sub-model, the branch encoders' patch
        embeddings included, so that reentrant checkpointing sees an input requiring grad. For a
        frozen encoder (the published recipes) that only makes backward run through it: on the
        tiny model it tripled the SAM step.
        """
        super().enable_input_require_grads()
        for name in self.config.vision_encoder_ls:
            branch = get_branch(name)
            encoder = getattr(self, branch.encoder_attribute, None) if branch.has_encoder else None
            embeddings = encoder.get_input_embeddings() if hasattr(encoder, "get_input_embeddings") else None
            if embeddings is None:
                continue
            for hook in [h for h in self._require_grads_hooks if h.id in embeddings._forward_hooks]:
                hook.remove()
                self._require_grads_hooks.remove(hook)
            self._require_grads_hooks.append(embeddings.register_forward_hook(_require_grads_while_training(encoder)))

    def branch_projector(self, name: str) -> ControlProjector:
        return getattr(self, get_branch(name).projector_attribute)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        rope_deltas: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VPTCausalLMOutputWithPast:
        r"""The base model's arguments, plus each branch's images under the reference's names:
        ``detection_images`` (DINOv2), ``seg_images`` (SAM), ``clip_pixel_values`` with
        ``clip_images_grid_thw`` (the model's own ViT). Branch features are placed on the
        branch's ``<|B_image_pad|>`` tokens in image order.
        """
        config = self.config
        config.check_forward_settings()
        if input_ids is None:
            raise VPTInputError("the VPT forward pass needs input_ids to find its tokens")
        branch_inputs = self._pop_branch_inputs(kwargs)
        boxes = kwargs.pop("boxes", None)
        masks = kwargs.pop("masks", None)
        # Inputs for generation (each row's original image), which LLaMA-Factory's inference-time
        # plugin also hands to loss-only evaluation.
        kwargs.pop("vpt_images", None)
        kwargs.pop("vpt_image_sizes", None)
        # Under ZeRO-3 every rank runs every module, on a blank input where its micro-batch has no use
        # for it. Such an output adds exactly zero where the real one would go (the embeddings, or `idle`
        # for the loss), so that backward, too, reaches every module in the same order on every rank.
        every_module = self._runs_every_module()
        idle = []

        # The reference computes embeddings and every vision encoder without gradients.
        encoders_context = torch.no_grad() if config.reference_compat else nullcontext()
        with encoders_context:
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            inputs_embeds, layer_sources, image_features = self._place_base_visuals(
                input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
            if every_module and pixel_values is None:
                idle_images = self.encode_base_images(*self.dummy_base_image(inputs_embeds)).per_image
                inputs_embeds = self._add_zero_of(inputs_embeds, idle_images)
            features, idle_features = {}, {}
            for name in self._branch_order():
                if name in branch_inputs:
                    features[name] = get_branch(name).encode(self, branch_inputs[name])
                elif every_module:
                    branch = get_branch(name)
                    idle_features[name] = branch.encode(self, branch.dummy_inputs(self, inputs_embeds))
        box_mask = self._box_mask(input_ids, boxes)
        if box_mask is not None:
            # The same in both passes: a box token's embedding is its box's encoding.
            inputs_embeds = self._scatter(inputs_embeds, box_mask, self.box_heads.encode(boxes.to(inputs_embeds)))
        elif every_module and config.box_heads:
            inputs_embeds = self._add_zero_of(inputs_embeds, [self.box_heads.encode(inputs_embeds.new_zeros(1, 4))])

        if position_ids is None and not config.reference_compat:
            # Otherwise (reference) the language model falls back to 1-D positions, as the published code trains.
            if mm_token_type_ids is None and (image_grid_thw is not None or video_grid_thw is not None):
                mm_token_type_ids = self._mm_token_type_ids(input_ids)
            # Qwen2.5-VL's video timing; the other bases have no such argument.
            video_timing = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
            position_ids = self.model.compute_3d_position_ids(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                mm_token_type_ids=mm_token_type_ids,
                **video_timing,
            )

        # Features in the LLM hidden size, one tensor per image; pass 2 re-weights these same values.
        projected, idle_projected = {}, ({} if every_module else None)
        for name in self._branch_order():
            if name in features:
                projected[name] = self.branch_projector(name).project_features(features[name])
            elif name in idle_features:
                idle_projected[name] = self.branch_projector(name).project_features(idle_features[name])
        pad_masks = {name: self._branch_pad_mask(name, input_ids, projected[name]) for name in projected}
        # Images of branches that re-encode with the base ViT get its per-layer features too.
        layer_sources += [(pad_masks[name], f.layers) for name, f in features.items() if isinstance(f, VisionFeatures)]
        layer_features = DecoderLayerFeatures.merge(layer_sources)
        continuing = past_key_values is not None and past_key_values.get_seq_length() > 0
        action_masks = self._action_masks(input_ids, continuing)
        language_model_inputs = {"position_ids": position_ids, "attention_mask": attention_mask}
        if layer_features is not None:
            language_model_inputs.update(layer_features.language_model_inputs())

        outputs = None
        idle_projections = [f for per_image in (idle_projected or {}).values() for f in per_image]
        if config.num_inner_forward_run == 1:
            for name, per_image in projected.items():
                inputs_embeds = self._scatter(inputs_embeds, pad_masks[name], torch.cat(per_image))
            inputs_embeds = self._add_zero_of(inputs_embeds, idle_projections)
        else:
            first_pass_embeds = inputs_embeds
            for name, per_image in projected.items():
                self._check_images_have_actions(name, pad_masks[name], per_image, action_masks)
                first_pass_embeds = self._scatter(first_pass_embeds, pad_masks[name], torch.cat(per_image))
            first_pass_embeds = self._add_zero_of(first_pass_embeds, idle_projections)
            para_mask = self._draw_para_mask(input_ids, projected, action_masks)
            reuse = self._reuses_first_pass(continuing, use_cache, position_ids, attention_mask, kwargs)
            if every_module:
                # Every rank takes the same path: the prefix-reusing one only when every rank has actions.
                reuse = self._on_every_rank(reuse and bool(action_masks), inputs_embeds.device)
            if not reuse:
                first_pass_cache = copy.deepcopy(past_key_values) if past_key_values is not None else None
                first_pass_states = self.model.language_model(
                    inputs_embeds=first_pass_embeds,
                    past_key_values=first_pass_cache,
                    use_cache=False,
                    **language_model_inputs,
                ).last_hidden_state
                inputs_embeds = self._second_pass_embeds(
                    inputs_embeds, projected, pad_masks, action_masks, para_mask, first_pass_states, idle_projected
                )
            elif action_masks:
                hidden_states = self._two_passes_reusing_prefix(
                    first_pass_embeds, inputs_embeds, projected, pad_masks, action_masks, para_mask,
                    position_ids, attention_mask, layer_features, idle_projected,
                )
                outputs = BaseModelOutputWithPast(last_hidden_state=hidden_states)
            # Otherwise no row perceives, so pass 2 would repeat pass 1: the one call below is both.

        if outputs is None:
            outputs = self.model.language_model(
                inputs_embeds=inputs_embeds,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **language_model_inputs,
                **kwargs,
            )

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        if self.training and torch.is_grad_enabled():
            logits = logits + self._parameters_anchor(logits)
        box_outputs = self._box_outputs(input_ids, hidden_states, boxes, box_mask, labels)
        if config.mask_decoder and box_mask is not None:
            box_outputs.update(self._mask_outputs(input_ids, hidden_states, box_mask, masks, labels,
                                                  image_features, image_grid_thw))
        elif masks is not None and any(mask is not None for mask in masks):
            raise VPTInputError("masks given but the model has no mask decoder; set the recipe key `mask_decoder: true`")
        if every_module and config.box_heads and box_mask is None:
            state = hidden_states.new_zeros(1, hidden_states.shape[-1])
            idle.append(self.box_heads.decode(state))
            if config.mask_decoder:
                idle += self.mask_decoder(state, [state.new_zeros(1, 1, state.shape[-1])])

        loss = None
        if labels is not None:
            # The model never has to predict <|B_action|>: generation writes it after action_start.
            for mask in action_masks.values():
                labels = labels.masked_fill(mask, IGNORE_INDEX)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            if config.box_heads:
                box_outputs["lm_loss"] = loss
            if "box_l1" in box_outputs:
                loss = loss + config.box_loss_weight * (box_outputs["box_l1"] + box_outputs["box_giou"])
            if "mask_bce" in box_outputs:
                loss = loss + config.mask_loss_weight * (box_outputs["mask_bce"] + box_outputs["mask_dice"])
            loss = self._add_zero_of(loss, idle)

        return VPTCausalLMOutputWithPast(
            **box_outputs,
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=self.model.rope_deltas,
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config=None,
        logits_processor=None,
        streamer=None,
        processor=None,
        vpt_images=None,
        vpt_image_sizes: torch.Tensor | None = None,
        allow_perception: bool = True,
        max_perception_rounds: int = 1,
        **kwargs,
    ):
        r"""Answer with Visual Perception Tokens in one call (method.md section 4; ``vpt_plugin.generation``).

        Takes what Qwen2-VL's ``generate`` takes for a batch of prompts (``input_ids``,
        ``attention_mask``, ``pixel_values``, ``image_grid_thw``, generation settings), plus:
        ``logits_processor``: merged with the ones the generation settings make as transformers'
        ``generate`` merges them (before the sampling warpers). ``processor``: the model's processor (crops, branch images and the perception turn need
        it; LLaMA-Factory sets ``model.vpt_perception`` instead); ``vpt_images``: each row's
        original image (PIL, or None for a row without one), which crops and branches read;
        ``allow_perception=False``: never start a perception (its tokens are suppressed), to
        measure what VPT adds; ``max_perception_rounds``: perceptions per answer (1, as published);
        ``boxes``: with box heads, the box of each ``<|perception_box|>`` in the prompts (row-major order).
        Boxes the model writes are decoded as it writes them (traces: ``boxes`` of a continuous region,
        ``answer_boxes`` of the answer).

        Returns the prompts followed by each row's final answer (right-padded), or with
        ``return_dict_in_generate=True`` a :class:`VPTGenerateOutput` holding each row's trace
        too; ``model.vpt_last_traces`` keeps the traces of the last call.
        """
        from .generation import DecodeSettings, PerceptionInputs, VPTGenerateOutput, VPTGenerator

        generation_config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = generation_config.update(**kwargs)
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise VPTInputError("VPT generation needs input_ids (the prompts)")
        attention_mask = model_kwargs.pop("attention_mask", None)
        pixel_values = model_kwargs.pop("pixel_values", None)
        image_grid_thw = model_kwargs.pop("image_grid_thw", None)
        boxes = model_kwargs.pop("boxes", None)
        model_kwargs.pop("mm_token_type_ids", None)  # positions are recomputed from the tokens
        model_kwargs.pop("second_per_grid_ts", None)  # video timing; prompts take images only
        model_kwargs.pop("use_cache", None)
        if model_kwargs.pop("synced_gpus", False):
            # Ranks would decode different numbers of steps, which ZeRO-3's collective gathers cannot.
            raise VPTInputError("VPT generation cannot run under DeepSpeed ZeRO-3; predict with ZeRO-0/2 or one process")
        branch_keys = [k for b in BRANCHES.values() for k in (b.pixel_key, *b.extra_inputs()) if k in model_kwargs]
        if branch_keys:
            raise VPTInputError(
                f"generation prompts take base images only; got {branch_keys}: the model asks for branch images itself"
            )
        if model_kwargs:
            raise VPTInputError(f"VPT generation does not take {sorted(model_kwargs)}")
        if processor is None:
            perception_inputs = getattr(self, "vpt_perception", None)
        else:
            perception_inputs = processor if isinstance(processor, PerceptionInputs) else PerceptionInputs(processor)
        if perception_inputs is None:
            raise VPTInputError("VPT generation needs the model's processor: generate(..., processor=processor)")
        images = _images_per_row(vpt_images, vpt_image_sizes, input_ids.shape[0])
        settings = DecodeSettings.from_config(self, generation_config, input_ids, logits_processor)
        generator = VPTGenerator(self, perception_inputs, settings, allow_perception, max_perception_rounds, streamer)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        rows = generator.run(input_ids, attention_mask, pixel_values, image_grid_thw, images, boxes)
        longest = max(len(row.answer) for row in rows)
        answers = torch.full((len(rows), longest), settings.pad_id, dtype=input_ids.dtype, device=input_ids.device)
        for b, row in enumerate(rows):
            answers[b, : len(row.answer)] = torch.tensor(row.answer, dtype=input_ids.dtype)
        sequences = torch.cat([input_ids, answers], dim=1)
        self.vpt_last_traces = [row.trace.to_dict() for row in rows]
        if streamer is not None:
            # Last: a caller streaming from another thread (LLaMA-Factory's chat) reads the traces, and
            # may exit, as soon as the stream ends; no work of this call may still be running then.
            streamer.end()
        if generation_config.return_dict_in_generate:
            return VPTGenerateOutput(sequences=sequences, traces=self.vpt_last_traces)
        return sequences

    def _runs_every_module(self) -> bool:
        """Whether this forward must run every module whatever its inputs: DeepSpeed ZeRO on several
        processes. Under ZeRO-3 the ranks gather each module's weights together as it runs (training
        and evaluation); in ZeRO-1/2 training they reduce gradients in one buffer filled in the order
        backward produces them (measured: ZeRO-2 on mixed rows drifted from plain data parallel by 0.5%
        in four steps). Either way every rank must run the same modules, forward and backward, in the
        same order."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not (distributed and torch.distributed.get_world_size() > 1):
            return False
        stage = ((deepspeed_config() or {}).get("zero_optimization") or {}).get("stage", 0)
        return stage == 3 or (self.training and stage >= 1)

    @staticmethod
    def _add_zero_of(embeds: torch.Tensor, outputs: list) -> torch.Tensor:
        """``embeds`` plus zero times ``outputs``: unchanged, but the outputs' modules are in its graph."""
        if not outputs:
            return embeds
        return embeds + 0.0 * sum(output.float().sum() for output in outputs).to(embeds.dtype)

    @staticmethod
    def _on_every_rank(flag: bool, device) -> bool:
        """Whether ``flag`` holds on every process (one all-reduce; ``flag`` itself outside distributed runs)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return flag
        value = torch.tensor([int(flag)], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def _branch_order(self) -> list[str]:
        """The model's branches in the order every forward runs them (the registry's)."""
        return [name for name in BRANCHES if name in self.config.vision_encoder_ls]

    def dummy_base_image(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest input of the base ViT, ``(pixel_values, grid_thw)``: one blank image of one merged patch."""
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        grid_thw = torch.tensor([[1, merge, merge]], device=like.device)
        return like.new_zeros(merge * merge, patch_values), grid_thw

    def _parameters_anchor(self, like: torch.Tensor) -> torch.Tensor:
        """A zero that depends on every trainable projector and box head parameter.

        In data-parallel training (DDP, DeepSpeed) every rank must produce gradients for the same
        parameters, but a rank whose batch has no image (or no action or box token) for a branch
        would leave that projector (or the heads) out of its graph. Running each on one dummy input
        and adding 0 times the result keeps them all in, at the cost of a few tiny matmuls.
        """
        anchor = like.new_zeros(())
        hidden = self.config.text_config.hidden_size
        heads = getattr(self, "box_heads", None)
        if heads is not None and any(p.requires_grad for p in heads.parameters()):
            probe = heads.encode(like.new_zeros(1, 4))
            anchor = anchor + 0.0 * (probe.sum() + heads.decode(probe).sum())
        mask_decoder = getattr(self, "mask_decoder", None)
        if mask_decoder is not None and any(p.requires_grad for p in mask_decoder.parameters()):
            state = like.new_zeros(1, hidden)
            anchor = anchor + 0.0 * mask_decoder(state, [like.new_zeros(1, 1, hidden)])[0].sum()
        for name in self.config.vision_encoder_ls:
            projector = self.branch_projector(name)
            if not any(p.requires_grad for p in projector.parameters()):
                continue
            features = projector.project_features(get_branch(name).dummy_features(self.config, like))
            control = like.new_zeros(self.config.projector_scale, hidden)
            anchor = anchor + 0.0 * sum(f.sum() for f in projector.reweight(features, control))
        return anchor

    # ----------------------------------------------------------------- two passes

    def _second_pass_embeds(self, inputs_embeds, projected, pad_masks, action_masks, para_mask, first_pass_states,
                            idle_projected=None):
        """Pass 2's input embeddings: branch features re-weighted by the control states, para-masked
        positions zeroed, and each action token's embedding replaced by its control state. Branches
        run only to keep ZeRO-3's ranks in step (``idle_projected``) re-weight too, adding zero."""
        # The control state of an action token is the pass-1 state just before it (its action_start).
        controls = {}
        for name, mask in action_masks.items():
            rows, cols = mask.nonzero(as_tuple=True)
            controls[name] = first_pass_states[rows, cols - 1]
        if idle_projected is not None:
            # Zero controls that depend on pass 1 as real ones do, so backward runs through pass 1 on
            # every rank and reaches each projector at the same point.
            idle_control = first_pass_states[0, : self.config.projector_scale] * 0.0
            if not action_masks:
                inputs_embeds = self._add_zero_of(inputs_embeds, [idle_control])
        for name in self._branch_order():
            if name in projected:
                reweighted = self.branch_projector(name).reweight(projected[name], controls[name])
                inputs_embeds = self._scatter(inputs_embeds, pad_masks[name], torch.cat(reweighted))
            elif idle_projected is not None and name in idle_projected:
                reweighted = self.branch_projector(name).reweight(idle_projected[name], idle_control)
                inputs_embeds = self._add_zero_of(inputs_embeds, reweighted)
        inputs_embeds = inputs_embeds.masked_fill(para_mask.unsqueeze(-1), 0)
        for name, mask in action_masks.items():
            inputs_embeds = self._scatter(inputs_embeds, mask, controls[name])
        return inputs_embeds

    def _reuses_first_pass(self, continuing, use_cache, position_ids, attention_mask, kwargs) -> bool:
        """Whether this call takes the prefix-reusing two-pass path (training and loss evaluation).

        Calls that continue or return a cache, ask for per-layer outputs, or use packed
        positions, 4-D masks or sliding-window layers take the straightforward path.
        """
        return (
            self.config.reuse_first_pass
            and not continuing
            and not use_cache
            and not (position_ids is not None and position_ids.ndim == 3 and position_ids.shape[0] != 3)
            and not (attention_mask is not None and attention_mask.ndim != 2)
            # Qwen2-style language models may have sliding-window layers; the others have no such flag.
            and not getattr(self.model.language_model, "has_sliding_layers", False)
            and not any(kwargs.get(key) for key in ("output_attentions", "output_hidden_states"))
        )

    def _two_passes_reusing_prefix(
        self, first_pass_embeds, inputs_embeds, projected, pad_masks, action_masks, para_mask, position_ids,
        attention_mask, layer_features, idle_projected=None,
    ):
        """The two passes' final hidden states, computing positions before the first change once.

        Pass 1 runs only as far as the batch's last ``<|B_action_start|>``; pass 2 starts at the
        first position whose input differs from pass 1's (an action token, a re-weighted branch
        feature or a para-masked turn, in any row) and attends to pass 1's keys and values before
        it, which are what pass 2 would have computed there.
        """
        changed = para_mask.clone()
        for name, mask in action_masks.items():
            changed |= mask | pad_masks.get(name, torch.zeros_like(mask))
        reused = int(changed.any(dim=0).nonzero()[0])
        first_pass_end = int(torch.stack(list(action_masks.values())).any(dim=(0, 1)).nonzero()[-1])
        first_pass_states, first_pass_kv = self._run_language_segment(
            first_pass_embeds[:, :first_pass_end], position_ids, attention_mask, layer_features, start=0
        )
        inputs_embeds = self._second_pass_embeds(
            inputs_embeds, projected, pad_masks, action_masks, para_mask, first_pass_states, idle_projected
        )
        prefix_kv = [(keys[:, :, :reused], values[:, :, :reused]) for keys, values in first_pass_kv]
        suffix_states, _ = self._run_language_segment(
            inputs_embeds[:, reused:], position_ids, attention_mask, layer_features, start=reused, prefix_kv=prefix_kv
        )
        return torch.cat([first_pass_states[:, :reused], suffix_states], dim=1)

    def _run_language_segment(self, embeds, position_ids, attention_mask, layer_features, start: int, prefix_kv=None):
        """The language model over positions ``start .. start + len`` of the sequence, attending to
        ``prefix_kv`` (per layer, the keys and values of positions ``0 .. start``).

        Returns the normed hidden states and each layer's keys and values of the segment. Each
        layer runs as a pure function of its inputs (:func:`_decoder_layer_with_kv`), wrapped in the
        model's gradient checkpointing function when that is on; the segment's share of
        ``layer_features`` is added after the layers that take them, as the language model does.
        """
        text_model = self.model.language_model
        batch, length = embeds.shape[:2]
        end = start + length
        if position_ids is None:  # what the language model itself falls back to
            position_ids = torch.arange(end, device=embeds.device).view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        position_embeddings = text_model.rotary_emb(embeds, position_ids[..., start:end])
        causal_mask = create_causal_mask(
            config=text_model.config,
            inputs_embeds=embeds,
            attention_mask=None if attention_mask is None else attention_mask[:, :end],
            past_key_values=_PrecedingPositions(start) if start else None,
        )
        segment_features = layer_features.window(start, end) if layer_features is not None else None
        hidden_states, segment_kv = embeds, []
        for index, layer in enumerate(text_model.layers):
            prefix_keys, prefix_values = prefix_kv[index] if prefix_kv is not None else (None, None)
            step = partial(
                MethodType(_decoder_layer_with_kv, layer),
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
            )
            if layer.gradient_checkpointing and layer.training:
                hidden_states, keys, values = layer._gradient_checkpointing_func(
                    step, hidden_states, prefix_keys, prefix_values
                )
            else:
                hidden_states, keys, values = step(hidden_states, prefix_keys, prefix_values)
            segment_kv.append((keys, values))
            if segment_features is not None and index < len(segment_features.layers):
                hidden_states = text_model._deepstack_process(
                    hidden_states, segment_features.mask, segment_features.layers[index]
                )
        return text_model.norm(hidden_states), segment_kv

    # ----------------------------------------------------------------- inputs

    def _pop_branch_inputs(self, kwargs: dict) -> dict[str, dict]:
        """Branch name -> its model inputs, for the branches given images in this call."""
        branch_inputs = {}
        for name, branch in BRANCHES.items():
            keys = (branch.pixel_key, *branch.extra_inputs())
            inputs = {key: kwargs.pop(key, None) for key in keys}
            if inputs[branch.pixel_key] is None:
                continue
            if name not in self.config.vision_encoder_ls:
                raise VPTInputError(
                    f"{branch.pixel_key} given, but this model has no {name!r} branch "
                    f"(vision_encoder_ls={self.config.vision_encoder_ls})"
                )
            branch_inputs[name] = inputs
        return branch_inputs

    def encode_base_images(self, pixel_values, grid_thw, videos: bool = False) -> VisionFeatures:
        """The base ViT's features of some images (or videos), and its per-layer features if it has them."""
        encode = self.model.get_video_features if videos else self.model.get_image_features
        out = encode(pixel_values, grid_thw)
        return VisionFeatures(list(out.pooler_output), getattr(out, "deepstack_features", None))

    def _place_base_visuals(self, input_ids, inputs_embeds, pixel_values, image_grid_thw, videos, video_grid_thw):
        """The base model's own images and videos on their pad tokens, as the base places them.

        Returns the embeddings, ``(positions, per-layer features)`` of the images and videos,
        for bases that add ViT layers to the decoder (the per-layer features are None otherwise),
        and each image's features (None without images).
        """
        layer_sources, image_features = [], None
        if pixel_values is not None:
            features = self.encode_base_images(pixel_values, image_grid_thw)
            image_features = features.per_image
            image_embeds = torch.cat(features.per_image).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, _ = self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features=image_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)
            layer_sources.append((image_mask[..., 0], features.layers))
        if videos is not None:
            features = self.encode_base_images(videos, video_grid_thw, videos=True)
            video_embeds = torch.cat(features.per_image).to(inputs_embeds.device, inputs_embeds.dtype)
            _, video_mask = self.model.get_placeholder_mask(input_ids, inputs_embeds, video_features=video_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(video_mask, video_embeds)
            layer_sources.append((video_mask[..., 0], features.layers))
        return inputs_embeds, layer_sources, image_features

    def _box_mask(self, input_ids, boxes) -> torch.Tensor | None:
        """Mask of the ``<|perception_box|>`` tokens, each of which needs its box in ``boxes`` (row-major order)."""
        box_token_id = self.config.box_token_id if self.config.box_heads else None
        mask = input_ids == box_token_id if box_token_id is not None else None
        if mask is None or not mask.any():
            if boxes is not None and len(boxes):
                raise VPTInputError(f"{len(boxes)} boxes given but the input has no <|perception_box|> token "
                                    f"(box_heads={self.config.box_heads})")
            return None
        found = 0 if boxes is None else len(boxes)
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[-1] != 4):
            raise VPTInputError(f"boxes must be (number of box tokens, 4), got {tuple(boxes.shape)}")
        if found != int(mask.sum()):
            raise VPTInputError(
                f"the input has {int(mask.sum())} <|perception_box|> tokens (per row {mask.sum(dim=1).tolist()}) "
                f"but {found} boxes were given: one per token, in order"
            )
        return mask

    def _box_outputs(self, input_ids, hidden_states, boxes, box_mask, labels) -> dict:
        """Boxes decoded from the state before each box token, and with labels the box loss's parts.

        A box token the labels train (the model writes it) is a target; one in the prompt is input only.
        """
        if box_mask is None:
            return {}  # (lm_loss is set by the caller for every batch of a model with heads)
        decodable = box_mask.clone()
        decodable[:, 0] = False  # its state is in an earlier call (cache-continued decoding)
        rows, cols = decodable.nonzero(as_tuple=True)
        outputs = {"pred_boxes": self.box_heads.decode(hidden_states[rows, cols - 1]).float()}
        if labels is not None:
            written = (labels[rows, cols] != IGNORE_INDEX)
            if written.any():
                targets = boxes[decodable[box_mask]].to(outputs["pred_boxes"])
                outputs.update(box_losses(outputs["pred_boxes"][written], targets[written]))
        return outputs

    def _mask_outputs(self, input_ids, hidden_states, box_mask, masks, labels, image_features, image_grid_thw) -> dict:
        """Mask logits for each decoded box over its row's first image, and with labels and
        ``masks`` (one bool mask or None per box token, row-major) the mask loss's parts."""
        decodable = box_mask.clone()
        decodable[:, 0] = False
        rows, cols = decodable.nonzero(as_tuple=True)
        grids = self.first_image_grids(input_ids, image_features, image_grid_thw)
        with_image = [k for k, row in enumerate(rows.tolist()) if grids[row] is not None]
        logits = self.mask_decoder(hidden_states[rows[with_image], cols[with_image] - 1],
                                   [grids[int(rows[k])] for k in with_image])
        pred_masks = [None] * len(rows)
        for k, mask_logits in zip(with_image, logits):
            pred_masks[k] = mask_logits
        outputs = {"pred_masks": pred_masks}
        if labels is None or masks is None:
            return outputs
        if len(masks) != int(box_mask.sum()):
            raise VPTInputError(f"{len(masks)} masks given for {int(box_mask.sum())} <|perception_box|> tokens: "
                                "one (or None) per token, in order")
        token_masks = [mask for mask, keep in zip(masks, decodable[box_mask].tolist()) if keep]
        trained = [k for k in with_image
                   if token_masks[k] is not None and labels[rows[k], cols[k]] != IGNORE_INDEX]
        if trained:
            outputs.update(mask_losses([pred_masks[k] for k in trained], [token_masks[k] for k in trained]))
        return outputs

    def first_image_grids(self, input_ids, image_features, image_grid_thw) -> list:
        """Each row's first image's features as ``(height, width, hidden)`` on the ViT's merged grid,
        or None for a row without an image (images are in row-major order of their pad tokens)."""
        if image_features is None:
            return [None] * input_ids.shape[0]
        per_row = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        grids, image = [], 0
        for count in per_row:
            if count == 0:
                grids.append(None)
                continue
            grids.append(self.image_grid(image_features[image], image_grid_thw[image]))
            while count > 0:
                count -= image_features[image].shape[0]
                image += 1
        return grids

    def image_grid(self, features: torch.Tensor, grid_thw) -> torch.Tensor:
        """One image's features ``(tokens, hidden)`` as ``(height, width, hidden)`` on the merged grid."""
        merge = self.model.visual.spatial_merge_size
        _, height, width = (int(v) for v in grid_thw)
        return features.view(height // merge, width // merge, -1)

    def _mm_token_type_ids(self, input_ids):
        """Text 0, image 1, video 2: what the processor returns, for callers that pass none."""
        types = (input_ids == self.config.image_token_id).int()
        return types + 2 * (input_ids == self.config.video_token_id).int()

    # ----------------------------------------------------------------- tokens

    def _branch_pad_mask(self, name, input_ids, per_image):
        mask = input_ids == self.config.branch_ids(name)["image"]
        expected = sum(f.shape[0] for f in per_image)
        if int(mask.sum()) != expected:
            pad = get_branch(name).tokens.image_pad
            raise VPTInputError(
                f"branch {name!r}: the batch has {int(mask.sum())} {pad} tokens (per row "
                f"{mask.sum(dim=1).tolist()}) but its {len(per_image)} image(s) give {expected} feature tokens"
            )
        return mask

    def _action_masks(self, input_ids, continuing: bool = False) -> dict[str, torch.Tensor]:
        """Branch name -> mask of its ``<|B_action|>`` tokens, for every branch whose ids are set.

        Each must follow its ``<|B_action_start|>``, whose pass-1 state becomes its control state.
        When decoding continues a cache (``continuing``), an action token first in the input has
        its action start in the cache, where no state can be read: it is plain text, as generation
        treats action tokens it does not act on.
        """
        masks = {}
        for name in BRANCHES:
            ids = self.config.branch_ids(name)
            if ids["action"] is None:
                continue
            mask = input_ids == ids["action"]
            if continuing:
                mask[:, 0] = False
            if not mask.any():
                continue
            after_start = torch.zeros_like(mask)
            after_start[:, 1:] = input_ids[:, :-1] == ids["action_start"]
            stray = mask & ~after_start
            if stray.any():
                row, col = stray.nonzero()[0].tolist()
                tokens = get_branch(name).tokens
                raise VPTInputError(f"row {row}, position {col}: {tokens.action} must follow {tokens.action_start}")
            masks[name] = mask
        return masks

    def _check_images_have_actions(self, name, pad_mask, per_image, action_masks):
        """Each row's branch images need as many action tokens (one control state per image)."""
        tokens = get_branch(name).tokens
        sizes = iter(f.shape[0] for f in per_image)
        action_mask = action_masks.get(name, torch.zeros_like(pad_mask))
        for row, pads in enumerate(pad_mask.sum(dim=1).tolist()):
            images = 0
            while pads > 0:
                pads -= next(sizes)
                images += 1
            if pads < 0:
                raise VPTInputError(f"row {row}: its {tokens.image_pad} tokens end inside an image's features")
            actions = int(action_mask[row].sum())
            if actions != images * self.config.projector_scale:
                raise VPTInputError(
                    f"row {row}: {images} {tokens.placeholder} image(s) but {actions} {tokens.action} token(s); "
                    "with num_inner_forward_run=2 each branch image needs its action token"
                )

    def _draw_para_mask(self, input_ids, projected, action_masks) -> torch.Tensor:
        """Positions pass 2 zeroes in rows that re-encode: the user turn that asked (image and question),
        and for para_mask_id 2 also the user turn that shows the branch image.

        One draw per masked turn and batch, with probability ``para_mask_ratio``, as published.
        Training only (method.md section 3); the published code also masked in eval mode, which
        ``reference_compat`` keeps. The published code counted turns from the sequence start (turns
        1 and 3, after Qwen2-VL's system turn); counting from the action's turn finds the same turns
        in the released data and stays right for templates without a default system turn (Qwen3-VL).
        """
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        if self.config.para_mask_id == 0 or not (self.training or self.config.reference_compat):
            return mask
        actions = torch.zeros_like(mask)
        for name in projected:
            if name in action_masks:
                actions |= action_masks[name]
        if not actions.any():
            return mask
        offsets = (-1,) if self.config.para_mask_id == 1 else (-1, 1)
        for offset in offsets:
            if torch.rand(1).item() < self.config.para_mask_ratio:
                mask |= self._turn_interior(input_ids, actions, offset)
        return mask

    def _turn_interior(self, input_ids, actions, offset: int):
        """Positions strictly between ``<|im_start|>`` and ``<|im_end|>`` of the turn ``offset`` turns
        after the one holding each row's first action token (rows without one: none)."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        for row in actions.any(dim=1).nonzero().flatten().tolist():
            starts = (input_ids[row] == self.config.para_start_id).nonzero().flatten()
            ends = (input_ids[row] == self.config.para_end_id).nonzero().flatten()
            action = int(actions[row].nonzero()[0])
            turn = int((starts < action).sum()) - 1 + offset
            if not (0 <= turn < len(starts) and turn < len(ends)):
                where = "before" if offset < 0 else "after"
                raise VPTInputError(
                    f"row {row}: para mask needs a turn {where} the one holding the action token (position "
                    f"{action}), but the row has {len(starts)} <|im_start|> and {len(ends)} <|im_end|> tokens"
                )
            mask[row] = (positions > starts[turn]) & (positions < ends[turn])
        return mask

    @staticmethod
    def _scatter(inputs_embeds, mask, values):
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), values.to(inputs_embeds.dtype))


def _require_grads_while_training(encoder):
    def hook(module, args, output):
        if any(p.requires_grad for p in encoder.parameters()):
            output.requires_grad_(True)

    return hook


class _SegmentKV:
    """The ``past_key_values`` one decoder layer call sees in :meth:`_run_language_segment`.

    Its ``update`` (called by the attention) keeps the layer's new keys and values, so they can
    be returned as outputs, and gives attention the prefix followed by them.
    """

    def __init__(self, prefix_keys, prefix_values):
        self.prefix = None if prefix_keys is None else (prefix_keys, prefix_values)
        self.keys = self.values = None

    def update(self, keys, values, layer_idx, *args, **kwargs):
        self.keys, self.values = keys, values
        if self.prefix is None:
            return keys, values
        return torch.cat([self.prefix[0], keys], dim=-2), torch.cat([self.prefix[1], values], dim=-2)


class _PrecedingPositions:
    """What transformers' mask builders read from a cache: how many positions precede the segment."""

    is_compileable = False

    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.length + query_length, 0


def _decoder_layer_with_kv(layer, hidden_states, prefix_keys, prefix_values, *, attention_mask, position_embeddings):
    """One decoder layer as a pure function: ``(output, its keys, its values)``.

    A fresh :class:`_SegmentKV` per call means no cache is appended to, so gradient checkpointing
    can re-run the call in backward freely, and the keys and values are outputs that carry
    gradients to pass 1 under reentrant checkpointing too. Bound to the layer when called,
    because checkpoint functions (LLaMA-Factory's) find the module through ``__self__``.
    ``nn.Module.__call__`` runs the layer's hooks (DeepSpeed's) but not
    ``GradientCheckpointingLayer.__call__``, which would drop ``past_key_values``.
    """
    kv = _SegmentKV(prefix_keys, prefix_values)
    hidden_states = nn.Module.__call__(
        layer,
        hidden_states,
        attention_mask=attention_mask,
        position_embeddings=position_embeddings,
        past_key_values=kv,
    )
    return hidden_states, kv.keys, kv.values


def _images_per_row(images, sizes, batch: int) -> list:
    """Each row's original image as PIL: from a list, or from the uint8 ``(rows, H, W, 3)`` tensor
    LLaMA-Factory's inputs carry (``sizes``: each row's height and width; 0 for no image)."""
    from PIL import Image

    if images is None:
        return [None] * batch
    if isinstance(images, torch.Tensor):
        found = []
        for pixels, (height, width) in zip(images, sizes.tolist()):
            found.append(Image.fromarray(pixels[:height, :width].cpu().numpy()) if height and width else None)
        images = found
    if len(images) != batch:
        raise VPTInputError(f"vpt_images has {len(images)} entries for {batch} prompts (one per row, None for none)")
    return list(images)

