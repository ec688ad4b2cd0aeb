"""Grounding DINO branch ("gdino"): the detector's object queries for the question (tokens ``<|gdino_...|>``).

The detector reads the row's question beside the image (``VisionBranch.text_conditioned``). Its
features are the decoder's query states of the ``QUERY_TOKENS`` queries that match the question
best (the detector's own score: the largest query-to-word logit), each with its predicted box.
Why queries and not the text-enhanced image features: their number is fixed whatever the
image size (the encoder's multi-scale features are about 20k tokens at 800 px), and each one
is an object hypothesis the detector already matched to the question's words, which is what
this branch adds beside DINOv2 and SAM: features of what the question is about.

The detector's text tokenizer (BERT's) travels with the model: ``vpt init`` and
``save_pretrained`` write it to ``gdino_tokenizer/`` of the checkpoint. The question reaches the
model as UTF-8 bytes (``gdino_texts``), a tensor like every other model input, and is tokenized
there, so LLaMA-Factory's collator and chat engine and the exported model carry it unchanged.
"""

import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)

from ..vocabulary import BranchTokens
from . import register_branch
from .base import ControlProjector, VisionBranch, VPTInputError

QUERY_TOKENS = 100  # queries kept per image, best first (fewer if the detector has fewer)
TOKENIZER_FOLDER = "gdino_tokenizer"  # the detector's text tokenizer inside a VPT checkpoint
# Grounding DINO's own preprocessing: shortest side 800, longest 1333, ImageNet statistics.
IMAGE_SIZE = {"shortest_edge": 800, "longest_edge": 1333}
BOX_SIZE = 4  # each query's predicted box (cx, cy, w, h), normalised, follows its state
# Questions travel as this many UTF-8 bytes (zero-padded, longer ones cut): one width for every batch,
# well past the 256 words-pieces the detector reads.
TEXT_BYTES = 2048


def detection_caption(text: str) -> str:
    """A question as Grounding DINO reads text: lower case, ending with a full stop."""
    caption = text.lower().strip()
    return caption if caption.endswith(".") else caption + "."


def texts_to_bytes(texts: list[str]) -> torch.Tensor:
    """Texts as one ``(texts, TEXT_BYTES)`` ``uint8`` tensor of their UTF-8 bytes, zero-padded."""
    encoded = [list(text.encode("utf-8")[:TEXT_BYTES]) for text in texts]
    return torch.tensor([data + [0] * (TEXT_BYTES - len(data)) for data in encoded], dtype=torch.uint8)


def bytes_to_texts(data: torch.Tensor) -> list[str]:
    """The texts of :func:`texts_to_bytes` (a character cut at the byte limit is dropped)."""
    return [bytes(row[row != 0].tolist()).decode("utf-8", errors="ignore") for row in data.cpu()]


# The original GroundingDINO checkpoints' keys (groundingdino_swint_ogc.pth, groundingdino_swinb_cogcoor.pth)
# -> transformers' GroundingDinoForObjectDetection keys; the table of transformers' own conversion script.
_ORIGINAL_KEY_RENAMES = [
    # Swin backbone
    (r"^backbone\.0\.patch_embed\.proj\.", "model.backbone.conv_encoder.model.embeddings.patch_embeddings.projection."),
    (r"^backbone\.0\.patch_embed\.norm\.", "model.backbone.conv_encoder.model.embeddings.norm."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.", r"SWIN.\1.blocks.\2.layernorm_before."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.", r"SWIN.\1.blocks.\2.layernorm_after."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_", r"SWIN.\1.blocks.\2.attention.self.relative_position_"),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.", r"SWIN.\1.blocks.\2.attention.output.dense."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.", r"SWIN.\1.blocks.\2.attention.self.QKV."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"SWIN.\1.blocks.\2.intermediate.dense."),
    (r"^backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"SWIN.\1.blocks.\2.output.dense."),
    (r"^backbone\.0\.layers\.(\d+)\.downsample\.", r"SWIN.\1.downsample."),
    # the original's norm{i} follows stage i+1 (its out_indices count from 0)
    (r"^backbone\.0\.norm(\d+)\.", lambda m: f"model.backbone.conv_encoder.model.hidden_states_norms.stage{int(m[1]) + 1}."),
    (r"^SWIN\.", "model.backbone.conv_encoder.model.encoder.layers."),
    # encoder: deformable image layers, text enhancer layers, fusion layers
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"model.encoder.layers.\1.deformable_layer.self_attn."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.deformable_layer.self_attn_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.deformable_layer.final_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear(\d)\.", r"model.encoder.layers.\1.deformable_layer.fc\2."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.self_attn\.in_proj_", r"model.encoder.layers.\1.text_enhancer_layer.self_attn.QKV."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.self_attn\.out_proj\.", r"model.encoder.layers.\1.text_enhancer_layer.self_attn.out_proj."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.linear(\d)\.", r"model.encoder.layers.\1.text_enhancer_layer.fc\2."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_before."),
    (r"^transformer\.encoder\.text_layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_after."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.gamma_v$", r"model.encoder.layers.\1.fusion_layer.vision_param"),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.gamma_l$", r"model.encoder.layers.\1.fusion_layer.text_param"),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.layer_norm_v\.", r"model.encoder.layers.\1.fusion_layer.layer_norm_vision."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.layer_norm_l\.", r"model.encoder.layers.\1.fusion_layer.layer_norm_text."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.attn\.(out_|values_|)v_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.\2vision_proj."),
    (r"^transformer\.encoder\.fusion_layers\.(\d+)\.attn\.(out_|values_|)l_proj\.", r"model.encoder.layers.\1.fusion_layer.attn.\2text_proj."),
    # decoder
    (r"^transformer\.decoder\.layers\.(\d+)\.cross_attn\.", r"model.decoder.layers.\1.encoder_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"model.decoder.layers.\1.encoder_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_text\.in_proj_", r"model.decoder.layers.\1.encoder_attn_text.QKV."),
    (r"^transformer\.decoder\.layers\.(\d+)\.ca_text\.out_proj\.", r"model.decoder.layers.\1.encoder_attn_text.out_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.catext_norm\.", r"model.decoder.layers.\1.encoder_attn_text_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_", r"model.decoder.layers.\1.self_attn.QKV."),
    (r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"model.decoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"model.decoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.linear(\d)\.", r"model.decoder.layers.\1.fc\2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.final_layer_norm."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layer_norm."),
    (r"^transformer\.decoder\.ref_point_head\.", "model.decoder.reference_points_head."),
    (r"^transformer\.decoder\.bbox_embed\.", "model.decoder.bbox_embed."),
    (r"^transformer\.enc_out_bbox_embed\.", "model.encoder_output_bbox_embed."),
    (r"^transformer\.(enc_output|enc_output_norm|level_embed)\b", r"model.\1"),
    (r"^transformer\.tgt_embed\.", "model.query_position_embeddings."),
    # text backbone and the projections into the detector's width
    (r"^bert\.", "model.text_backbone."),
    (r"^feat_map\.", "model.text_projection."),
    (r"^input_proj\.", "model.input_proj_vision."),
]
# Original keys with no counterpart: BERT's pooler and position-id buffer (transformers' text
# backbone has neither).
_ORIGINAL_KEYS_DROPPED = re.compile(r"^bert\.(pooler\.|embeddings\.position_ids$)")
_FUSED = re.compile(r"\.QKV\.(weight|bias)$")


def original_grounding_dino_to_transformers(state_dict: dict) -> dict:
    """Weights of an original GroundingDINO checkpoint in transformers' GroundingDinoForObjectDetection layout.

    ``state_dict``: the checkpoint's ``model`` entry (or the whole file); a ``module.`` prefix is removed.
    Fused query/key/value projections are split into the three transformers keeps.
    """
    state_dict = state_dict.get("model", state_dict)
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    if not any(key.startswith("transformer.") for key in state_dict):
        raise ValueError("not an original GroundingDINO checkpoint: no 'transformer.*' keys")
    converted = {}
    for key, value in state_dict.items():
        if _ORIGINAL_KEYS_DROPPED.match(key):
            continue
        for pattern, replacement in _ORIGINAL_KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        fused = _FUSED.search(key)
        if fused:
            stem, kind = key[: fused.start()], fused[1]
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                converted[f"{stem}.{part}.{kind}"] = chunk
        else:
            converted[key] = value
    # The detection head's box MLPs are the decoder's, shared (transformers ties them).
    for key in [k for k in converted if k.startswith("model.decoder.bbox_embed.")]:
        converted[key.removeprefix("model.decoder.")] = converted[key]
    return converted


def tiny_tokenizer_vocab() -> list[str]:
    """A WordPiece vocabulary for the tiny detector: BERT's special tokens, letters and common words."""
    words = ("what which where is are the a an of in on at to and colour color shape square circle triangle "
             "red green blue yellow white black cell grid region image small large left right top bottom corner").split()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "!", ":"]
              + words + letters + [f"##{c}" for c in letters] + [str(d) for d in range(10)])
    return list(dict.fromkeys(tokens))  # "a" is a word and a letter


def save_tiny_grounding_dino(folder, config: GroundingDinoConfig, seed: int = 0) -> Path:
    """A random Grounding DINO detector of ``config`` with a tiny tokenizer and small-image processor,
    saved as a hub-style folder (what ``from_pretrained`` and GroundingDinoProcessor read)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(tiny_tokenizer_vocab())}, do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 224, "longest_edge": 320})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


class GdinoProjector(ControlProjector):
    """Each query: layer norm and linear of its state, plus a linear of its box, to the LLM hidden size."""

    def __init__(self, feature_size: int, hidden_size: int, projector_scale: int = 1):
        super().__init__(hidden_size, projector_scale)
        self.layernorm_feature = nn.LayerNorm(feature_size)
        self.linear_feature = nn.Linear(feature_size, hidden_size)
        self.linear_box = nn.Linear(BOX_SIZE, hidden_size)

    def project_features(self, features):
        states, boxes = features[..., :-BOX_SIZE], features[..., -BOX_SIZE:]
        return list(self.linear_feature(self.layernorm_feature(states)) + self.linear_box(boxes))


@register_branch
class GroundingDinoBranch(VisionBranch):
    name = "gdino"
    tokens = BranchTokens("gdino")
    pixel_key = "gdino_images"
    pretrained_id = "IDEA-Research/grounding-dino-tiny"
    text_conditioned = True
    encoder_help = ("Grounding DINO checkpoint: transformers (IDEA-Research/grounding-dino-tiny, -base) or original "
                    "groundingdino_*.pth (with --gdino-config, tokenizer files beside it); its text tokenizer comes along")
    tiny_folder = "grounding-dino"

    def default_encoder_config(self):
        # IDEA-Research/grounding-dino-tiny: Swin-T backbone, 900 queries, 256 text tokens.
        backbone = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                              image_size=224, out_indices=[2, 3, 4])
        return GroundingDinoConfig(backbone_config=backbone)

    def tiny_encoder_config(self):
        backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                              image_size=224, out_indices=[2, 3, 4])
        text = BertConfig(vocab_size=len(tiny_tokenizer_vocab()), hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
        # Two decoder layers: transformers ties the later layers' box heads to the first one's.
        return GroundingDinoConfig(
            backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
            num_queries=16, max_text_len=64, encoder_n_points=2, decoder_n_points=2,
        )

    def save_tiny_encoder(self, folder, seed: int = 0) -> Path:
        return save_tiny_grounding_dino(folder, self.tiny_encoder_config(), seed)

    def build_encoder(self, vpt_config):
        return GroundingDinoForObjectDetection(self.encoder_config(vpt_config))

    def pretrained_encoder(self, path, encoder_config=None):
        """A transformers Grounding DINO checkpoint, or an original ``groundingdino_*.pth`` (weights only)."""
        if str(path).endswith((".pth", ".pt")):
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
            return encoder_config or self.default_encoder_config(), original_grounding_dino_to_transformers(state_dict)
        detector = GroundingDinoForObjectDetection.from_pretrained(path)
        return detector.config, detector.state_dict()

    def load_assets(self, model, source, source_is_encoder):
        """The detector's text tokenizer: the root of a detector checkpoint (for a ``.pth`` file, the
        folder it lies in), or a VPT checkpoint's ``gdino_tokenizer/``.

        A VPT checkpoint without one loads (a VPT model being built from a plain base is loaded from
        the base first, and gets the detector's tokenizer next); :meth:`encode` then says what is missing.
        """
        if not source_is_encoder:
            try:
                model.gdino_text_tokenizer = AutoTokenizer.from_pretrained(str(source), subfolder=TOKENIZER_FOLDER)
            except (OSError, ValueError, TypeError):  # TypeError: a model made from a state dict, no folder
                model.gdino_text_tokenizer = None
            return
        if source is None:
            raise VPTInputError("the gdino branch needs a Grounding DINO checkpoint for its text tokenizer "
                                "(`vpt init --gdino`, or the recipe key vision_encoder_paths: gdino=...)")
        source = str(source)
        folder = str(Path(source).parent) if source.endswith((".pth", ".pt")) else source
        try:
            model.gdino_text_tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise VPTInputError(f"gdino branch: no text tokenizer in {folder!r}; the detector checkpoint's "
                                f"tokenizer files must be there: {error}") from error

    def save_assets(self, model, directory) -> None:
        tokenizer = getattr(model, "gdino_text_tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(Path(directory) / TOKENIZER_FOLDER)

    def build_projector(self, vpt_config):
        feature_size = self.encoder_config(vpt_config).d_model
        return GdinoProjector(feature_size, vpt_config.text_config.hidden_size, vpt_config.projector_scale)

    def extra_inputs(self):
        return ("gdino_pixel_mask", "gdino_texts")

    def encode(self, model, inputs):
        detector = getattr(model, self.encoder_attribute)
        tokenizer = getattr(model, "gdino_text_tokenizer", None)
        if tokenizer is None:
            raise VPTInputError(f"the gdino branch has no text tokenizer: the checkpoint it was loaded from lacks "
                                f"{TOKENIZER_FOLDER}/ (copy the detector's tokenizer files there; `vpt init --gdino` "
                                "and save_pretrained write it)")
        # transformers 5.6's Grounding DINO decoder calls its layers with shifted arguments under gradient
        # checkpointing (it leaves out spatial_shapes_list), so the decoder always runs without it.
        detector.model.decoder.gradient_checkpointing = False
        pixels = inputs[self.pixel_key].to(detector.dtype)
        texts = bytes_to_texts(inputs["gdino_texts"])
        # One image at a time, on its own pixels: the processor pads a batch to its largest image, and
        # neither the Swin backbone nor the encoder is blind to padding, so an image's features would
        # change with the images it was batched with.
        encoded = []
        for image, mask, text in zip(pixels, inputs["gdino_pixel_mask"], texts):
            height, width = int(mask.any(1).sum()), int(mask.any(0).sum())
            words = tokenizer([text], truncation=True, max_length=detector.config.max_text_len,
                              return_tensors="pt").to(pixels.device)
            out = detector(pixel_values=image[None, :, :height, :width], pixel_mask=mask[None, :height, :width], **words)
            # Queries best first by their best word's logit.
            keep = out.logits[0].max(-1).values.topk(min(QUERY_TOKENS, out.logits.shape[1])).indices
            encoded.append(torch.cat([out.last_hidden_state[0, keep], out.pred_boxes[0, keep].to(pixels.dtype)], dim=-1))
        return torch.stack(encoded)

    def dummy_inputs(self, model, like):
        side = 128  # the smallest level (stride 64) needs more than one position for its group norm
        return {self.pixel_key: like.new_zeros(1, 3, side, side),
                "gdino_pixel_mask": torch.ones(1, side, side, dtype=torch.long, device=like.device),
                "gdino_texts": texts_to_bytes(["."]).to(like.device)}

    def dummy_features(self, vpt_config, like):
        return like.new_zeros(1, 1, self.encoder_config(vpt_config).d_model + BOX_SIZE)

    def preprocess(self, images, processor, questions=None):
        if questions is None or len(questions) != len(images):
            raise VPTInputError(f"the gdino branch reads a question beside each image: {len(images)} images, "
                                f"{'no' if questions is None else len(questions)} questions")
        out = GroundingDinoImageProcessor(size=IMAGE_SIZE)(images=images, return_tensors="pt")
        return {self.pixel_key: out.pixel_values, "gdino_pixel_mask": out.pixel_mask,
                "gdino_texts": texts_to_bytes([detection_caption(q) for q in questions])}

    def feature_tokens(self, vpt_config, images, processor):
        return [min(QUERY_TOKENS, self.encoder_config(vpt_config).num_queries)] * len(images)
