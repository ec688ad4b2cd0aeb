"""The published VPT forward, restated independently as a test oracle.

It follows the behaviour of the published ``modeling_qwen2_vl_vpt.py`` (transformers 4.45)
step by step, on plain transformers 5.6 modules and a checkpoint in the published key
layout: embeddings and encoders under no_grad, the published projector einsums, the
published para-mask indexing, control states read from the shifted pass-1 states, and a
plain mean cross-entropy. It shares no code with ``vpt_plugin`` on purpose. It also writes
checkpoints in the published layout, for ``vpt convert`` to read.
"""

import json

import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model, Qwen2VLConfig, Qwen2VLForConditionalGeneration, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

PREFIX = {"dino": "detection", "sam": "seg", "clip": "clip"}
VPT_FIELDS = (
    "num_inner_forward_run", "projector_scale", "para_mask_id", "para_mask_ratio", "alignment",
    "vision_encoder_ls", "para_start_id", "para_end_id",
)


# --------------------------------------------------------------- writing a published checkpoint


def published_layout(state_dict):
    """transformers-5 Qwen2-VL keys -> the transformers-4.45 keys the published code saved."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = "visual." + key[len("model.visual."):]
        out[key] = value
    return out


def flat_config(base_config, vpt_fields, token_ids, model_type="qwen2_vl_vpt"):
    """A config.json as transformers 4.45 wrote Qwen2-VL configs: text fields at the top level."""
    text = base_config.text_config
    vision = base_config.vision_config
    return {
        "architectures": ["VPT_Qwen2VLForConditionalGeneration"],
        "model_type": model_type,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "hidden_act": text.hidden_act,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": list(text.rope_parameters["mrope_section"])},
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vision_config": {
            "depth": vision.depth, "embed_dim": vision.embed_dim, "hidden_size": vision.hidden_size,
            "hidden_act": vision.hidden_act, "mlp_ratio": vision.mlp_ratio, "num_heads": vision.num_heads,
            "in_chans": 3, "patch_size": vision.patch_size, "spatial_merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
        },
        "image_token_id": base_config.image_token_id,
        "video_token_id": base_config.video_token_id,
        "vision_start_token_id": base_config.vision_start_token_id,
        "vision_end_token_id": base_config.vision_end_token_id,
        "transformers_version": "4.45.2",
        **vpt_fields,
        **token_ids,
    }


def random_projector(branch, hidden, feature_size, generator):
    """Published projector parameters, unused ones included (the published classes create them)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.05

    p = f"{PREFIX[branch]}_projector."
    size = {"dino": feature_size, "sam": 256, "clip": hidden}[branch]
    weights = {
        p + "linear_feature.weight": rand(hidden, size), p + "linear_feature.bias": rand(hidden),
        p + "layernorm_feature.weight": 1 + rand(size), p + "layernorm_feature.bias": rand(size),
        p + "linear_condition.weight": rand(hidden, hidden), p + "linear_condition.bias": rand(hidden),
        p + "layernorm_condition.weight": 1 + rand(hidden), p + "layernorm_condition.bias": rand(hidden),
    }
    if branch == "sam":
        weights[p + "conv_feature.weight"] = rand(hidden, 256, 4, 4)
        weights[p + "conv_feature.bias"] = rand(hidden)
    return weights


def write_published_checkpoint(directory, config_json, state_dict, tokenizer):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    torch.save(state_dict, directory / "pytorch_model.bin")
    tokenizer.save_pretrained(directory)


# --------------------------------------------------------------- the published forward


class PublishedVPT:
    def __init__(self, config_json, state_dict, encoder_configs):
        self.cfg = config_json
        qwen_fields = {k: v for k, v in config_json.items() if k not in VPT_FIELDS and not k.endswith("_id")}
        qwen_fields.pop("model_type"), qwen_fields.pop("architectures"), qwen_fields.pop("transformers_version")
        qwen_fields["vision_config"] = {k: v for k, v in qwen_fields["vision_config"].items() if k != "in_chans"}
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            qwen_fields[key] = config_json[key]
        qwen_fields["bos_token_id"], qwen_fields["eos_token_id"] = config_json["bos_token_id"], config_json["eos_token_id"]
        self.qwen = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**qwen_fields)).eval()
        qwen_state = {}
        for key, value in state_dict.items():
            if key.startswith("model."):
                qwen_state["model.language_model." + key[6:]] = value
            elif key.startswith("visual."):
                qwen_state["model.visual." + key[7:]] = value
            elif key.startswith("lm_head."):
                qwen_state[key] = value
        self.qwen.load_state_dict(qwen_state, strict=True)
        self.branch = config_json["vision_encoder_ls"][0]
        self.prefix = PREFIX[self.branch]
        if self.branch == "dino":
            self.encoder = Dinov2Model(Dinov2Config.from_dict(encoder_configs["dino"])).eval()
        elif self.branch == "sam":
            self.encoder = SamVisionEncoder(SamVisionConfig.from_dict(encoder_configs["sam"])).eval()
        if self.branch != "clip":
            encoder_prefix = f"{self.prefix}_model."
            self.encoder.load_state_dict(
                {k[len(encoder_prefix):]: v for k, v in state_dict.items() if k.startswith(encoder_prefix)}, strict=True
            )
        projector_prefix = f"{self.prefix}_projector."
        self.p = {k[len(projector_prefix):]: v for k, v in state_dict.items() if k.startswith(projector_prefix)}

    def _ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.p[f"{name}.weight"], self.p[f"{name}.bias"])

    def _lin(self, x, name):
        return F.linear(x, self.p[f"{name}.weight"], self.p[f"{name}.bias"])

    def _conditions(self, conditions):
        conditions = conditions.view(-1, self.cfg["projector_scale"] * conditions.shape[-1])
        return self._lin(self._ln(conditions, "layernorm_condition"), "linear_condition")

    def project(self, emb, conditions=None, grid_thw=None):
        if self.branch == "clip":
            if conditions is None:
                return emb
            c = self._conditions(conditions)
            counts = grid_thw.prod(-1) // self.qwen.config.vision_config.spatial_merge_size**2
            pieces = torch.split(emb, counts.tolist())
            batch = torch.stack([F.pad(x, (0, 0, 0, int(counts.max()) - x.shape[0])) for x in pieces])
            attention = torch.einsum("bso,bo->bs", batch, c)
            value = torch.einsum("bs,bo->bso", attention, c)
            value = torch.cat([value[i, : counts[i]] for i in range(len(counts))])
            return value + emb
        if self.branch == "dino":
            h = self._lin(self._ln(emb, "layernorm_feature"), "linear_feature")
        else:
            bs = emb.shape[0]
            h = self._ln(emb.permute(0, 2, 3, 1), "layernorm_feature").permute(0, 3, 1, 2)
            h = F.conv2d(h, self.p["conv_feature.weight"], self.p["conv_feature.bias"], stride=4)
            h = h.permute(0, 2, 3, 1).reshape(bs, 256, -1)
        if conditions is not None:
            c = self._conditions(conditions)
            attention = torch.einsum("bso,bo->bs", h, c)
            h = torch.einsum("bs,bo->bso", attention, c) + h
        return h.reshape(-1, h.shape[-1])

    def mask_para(self, ids, para_id, ratio):
        rows = (ids == self.cfg[f"{self.prefix}_action_id"]).any(dim=1)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        if rows.any() and torch.rand(1).item() < ratio:
            row_ids = ids[rows]
            starts = (row_ids == self.cfg["para_start_id"]).nonzero()
            ends = (row_ids == self.cfg["para_end_id"]).nonzero()
            starts = starts[:, 1].view(-1, int((starts[:, 0] == 0).sum()))
            ends = ends[:, 1].view(-1, int((ends[:, 0] == 0).sum()))
            arange = torch.arange(row_ids.shape[1]).unsqueeze(0).expand(row_ids.shape[0], -1)
            mask[rows] = (arange > starts[:, para_id : para_id + 1]) & (arange < ends[:, para_id : para_id + 1])
        return mask

    def __call__(self, batch, position_ids=None):
        cfg, ids = self.cfg, batch["input_ids"]
        lm = self.qwen.model.language_model
        with torch.no_grad():
            embeds = lm.embed_tokens(ids)
            image = self.qwen.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            embeds = embeds.masked_scatter((ids == cfg["image_token_id"]).unsqueeze(-1).expand_as(embeds), image)
            if self.branch == "dino":
                emb = self.encoder(pixel_values=batch["detection_images"])[0][:, 1:]
            elif self.branch == "sam":
                emb = self.encoder(pixel_values=batch["seg_images"])[0]
            else:
                emb = self.qwen.model.visual(batch["clip_pixel_values"], grid_thw=batch["clip_images_grid_thw"]).pooler_output
        grid = batch.get("clip_images_grid_thw")
        branch_mask = (ids == cfg[f"{self.prefix}_image_token_id"]).unsqueeze(-1).expand_as(embeds)
        run = dict(position_ids=position_ids, attention_mask=batch["attention_mask"])
        if cfg["num_inner_forward_run"] == 2:
            first = embeds.clone().masked_scatter(branch_mask, self.project(emb, grid_thw=grid))
            h1 = lm(inputs_embeds=first, **run).last_hidden_state
            shift_h, shift_ids = h1[:, :-1], ids[:, 1:]
            action_id = cfg[f"{self.prefix}_action_id"]
            prompt = shift_h.masked_select((shift_ids == action_id).unsqueeze(-1).expand_as(shift_h)).view(-1, h1.shape[-1])
            embeds = embeds.masked_scatter(branch_mask, self.project(emb, prompt, grid))
            if cfg["para_mask_id"] == 1:
                para = self.mask_para(ids, 1, cfg["para_mask_ratio"])
            elif cfg["para_mask_id"] == 2:
                para = self.mask_para(ids, 1, cfg["para_mask_ratio"]) | self.mask_para(ids, 3, cfg["para_mask_ratio"])
            else:
                para = torch.zeros_like(ids, dtype=torch.bool)
            embeds = embeds.masked_fill(para.unsqueeze(-1), 0)
            embeds = embeds.masked_scatter((ids == action_id).unsqueeze(-1).expand_as(embeds), prompt)
        else:
            embeds = embeds.masked_scatter(branch_mask, self.project(emb, grid_thw=grid))
        logits = self.qwen.lm_head(lm(inputs_embeds=embeds, **run).last_hidden_state).float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )
        return logits, loss
