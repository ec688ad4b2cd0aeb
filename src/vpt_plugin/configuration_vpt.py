"""The VPT fields every VPT config carries, whatever its base model.

Each base (``vpt_plugin.bases``) makes its VPT config by putting :class:`VPTConfigMixin` in
front of the base's transformers config, e.g. ``VPTQwen2VLConfig(VPTConfigMixin, Qwen2VLConfig)``.
"""

from dataclasses import dataclass, field

from .branches import BRANCHES, get_branch


# A plain dataclass: transformers' configs are strict dataclasses, which collect the fields of
# every dataclass base; each base's config class applies @strict.
@dataclass(repr=False, eq=False)
class VPTConfigMixin:
    """Every VPT field the released ``config.json`` files carry, for any base model.

    Token ids per branch (``detection_image_token_id``, ``detection_action_id``,
    ``detection_action_start_id``, and the ``clip_*`` / ``seg_*`` twins) are named by the
    branch's token prefix (see :class:`vpt_plugin.vocabulary.BranchTokens`) and kept as
    plain attributes, so a new branch needs no new field here.

    Args:
        num_inner_forward_run: 1 (alignment: one pass, projectors without control) or
            2 (VPT: pass 1 reads control states, pass 2 uses them).
        para_mask_id: 0 off; 1 zero the first user turn in pass 2; 2 also the branch turn.
        para_mask_ratio: probability, per batch, that para masking applies.
        projector_scale: control states concatenated per condition (1 in all released models).
        alignment: carried from the released configs; the forward pass does not read it.
        vision_encoder_ls: the branches this model has (``dino``, ``sam``, ``clip``).
        branch_encoder_configs: branch name -> its encoder's transformers config (as a dict),
            so a saved model rebuilds with no hub. Missing: the published encoder's shape.
        para_start_id / para_end_id: ``<|im_start|>`` / ``<|im_end|>``, which delimit turns.
        reuse_first_pass: pass 1 runs only as far as the last ``<|B_action_start|>`` and pass 2
            reuses its keys and values before the first position that differs (same loss and
            gradients, about one pass of compute). False: two full passes, the straightforward
            implementation that the fast one is tested against.
        box_heads: PerceptionGPT's continuous perception token (``box_heads.py``): a box decoder reads a
            box from the hidden state before each ``<|perception_box|>`` and a box encoder makes that
            token's input embedding from its box. Off by default; a checkpoint without heads loads
            unchanged, and one turned on later gets fresh heads.
        box_token_id: the id of ``<|perception_box|>``.
        box_head_size: width of the heads' two hidden layers (512 as published).
        box_loss_weight: ``w_box`` of the loss ``lm + w_box * (L1 + GIoU)``.
        box_crop_margin: continuous Region Selection crops the decoded box widened by this fraction
            of its width and height on each side (0: the box itself).
        box_crop_grid: then snaps that crop to a grid of this many pixels of the image (0: off;
            ``box_heads.box_crop_pixels``). The base ViT's patch x merge size (28 for Qwen2/2.5-VL, 32
            for Qwen3-VL) keeps a crop's pixels unresampled and the crop steady under small box errors.
        mask_decoder: PerceptionGPT's mask decoder (``box_heads.MaskDecoder``, needs ``box_heads``): the
            state that decodes a box also prompts a mask over the row's first image, trained where
            the data gives masks. Off by default.
        mask_decoder_size: the mask decoder's width (256, as SAM's).
        mask_loss_weight: ``w_mask`` of the loss term ``w_mask * (BCE + Dice)``.
        vit_layer_fusion: PerceptionGPT's adaptive multi-layer fusion of the base ViT's layers
            (``vit_fusion.py``): learnable softmax-normalised weights over every layer's input replace the
            last layer's output. Off by default.
        reference_compat: reproduce the published forward exactly where this project deviates
            on purpose (docs/DEVIATIONS.md): input embeddings and every vision encoder run
            under ``no_grad``, and missing ``position_ids`` become 1-D positions rather than M-RoPE.
    """

    num_inner_forward_run: int = 1
    projector_scale: int = 1
    para_mask_id: int = 0
    para_mask_ratio: float | int = 1.0
    alignment: bool = False
    vision_encoder_ls: list | str = field(default_factory=list)
    branch_encoder_configs: dict = field(default_factory=dict)
    para_start_id: int | None = None
    para_end_id: int | None = None
    reuse_first_pass: bool = True
    box_heads: bool = False
    box_token_id: int | None = None
    box_head_size: int = 512
    box_loss_weight: float = 1.0
    box_crop_margin: float = 0.0
    box_crop_grid: int = 0
    mask_decoder: bool = False
    mask_decoder_size: int = 256
    mask_loss_weight: float = 1.0
    vit_layer_fusion: bool = False
    reference_compat: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_encoder_ls, str):  # "dino,sam" as LLaMA-Factory arguments give it
            self.vision_encoder_ls = [name.strip() for name in self.vision_encoder_ls.split(",") if name.strip()]
        for name in self.vision_encoder_ls:
            get_branch(name)  # unknown branch names fail here, with the known ones listed
        for name, encoder_config in list(self.branch_encoder_configs.items()):
            if not isinstance(encoder_config, dict):
                self.branch_encoder_configs[name] = encoder_config.to_dict()
        # Every branch's token-id fields exist (None when the tokenizer lacks the tokens), as released.
        for branch in BRANCHES.values():
            for key in branch.tokens.config_id_keys:
                kwargs.setdefault(key, None)
        super().__post_init__(**kwargs)

    # Not named validate_*: huggingface_hub's strict dataclasses would run it at construction,
    # and the released alignment configs legitimately lack action ids until tokens are added.
    def check_forward_settings(self) -> None:
        """Raise a clear error for a VPT setting the forward pass cannot run with."""
        from .branches import VPTInputError

        if self.num_inner_forward_run not in (1, 2):
            raise VPTInputError(f"num_inner_forward_run must be 1 or 2, got {self.num_inner_forward_run}")
        if self.para_mask_id not in (0, 1, 2):
            raise VPTInputError(f"para_mask_id must be 0, 1 or 2, got {self.para_mask_id}")
        if not 0 <= self.para_mask_ratio <= 1:
            raise VPTInputError(f"para_mask_ratio must be within 0..1, got {self.para_mask_ratio}")
        if self.para_mask_id and (self.para_start_id is None or self.para_end_id is None):
            raise VPTInputError("para masking needs para_start_id and para_end_id (<|im_start|>, <|im_end|>)")
        if self.box_heads and self.box_token_id is None:
            raise VPTInputError("box_heads needs box_token_id: the tokenizer must contain <|perception_box|>")
        if self.mask_decoder and not self.box_heads:
            raise VPTInputError("mask_decoder needs box_heads: a mask is prompted by the state that decodes a box")
        if self.box_crop_margin < 0:
            raise VPTInputError(f"box_crop_margin must be 0 or more, got {self.box_crop_margin}")
        if not isinstance(self.box_crop_grid, int) or self.box_crop_grid < 0:
            raise VPTInputError(f"box_crop_grid must be a whole number of pixels, 0 or more, got {self.box_crop_grid!r}")
        for name in self.vision_encoder_ls:
            tokens = get_branch(name).tokens
            needed = [tokens.image_token_id_key]
            if self.num_inner_forward_run == 2:
                needed += [tokens.action_id_key, tokens.action_start_id_key]
            missing = [key for key in needed if getattr(self, key, None) is None]
            if missing:
                wanted = [tokens.config_id_keys[key] for key in missing]
                raise VPTInputError(
                    f"branch {name!r} is in vision_encoder_ls but the config lacks {missing}; "
                    f"the tokenizer must contain {wanted} and the ids be set in the config"
                )

    def branch_ids(self, name: str) -> dict[str, int | None]:
        """Token ids of one branch: ``image``, ``action``, ``action_start``."""
        tokens = get_branch(name).tokens
        return {
            "image": getattr(self, tokens.image_token_id_key, None),
            "action": getattr(self, tokens.action_id_key, None),
            "action_start": getattr(self, tokens.action_start_id_key, None),
        }

