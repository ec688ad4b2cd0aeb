"""The interface every Vision Re-Encoding branch implements, and the projectors they share.

A branch is a description (name, tokens, model inputs, encoder config) plus three
functions: build its encoder and projector, and encode its images. The model never
names a branch; it loops over ``config.vision_encoder_ls`` and asks the registry. Nor do the
command line, the tiny fixtures or the data pipeline: what differs per branch is asked of it here.
"""

from typing import ClassVar

import torch
from torch import nn

from ..vocabulary import BranchTokens


class VPTInputError(ValueError):
    """A VPT input (token sequence, branch features, config) that the model cannot use.

    The message says what was found and where (row, token, branch, key).
    """


class ControlProjector(nn.Module):
    """Re-weights branch features by a control state: ``f_s + <f_s, c> c`` (method.md section 2).

    ``c`` is the control state, layer-normed then mapped hidden -> hidden; there is no
    softmax and no scaling. Subclasses first bring raw encoder features to the LLM hidden
    size (:meth:`project_features`); the model projects once and re-weights in pass 2
    (:meth:`reweight`). Parameter names are those of the published checkpoints.
    """

    def __init__(self, hidden_size: int, projector_scale: int = 1):
        super().__init__()
        self.hidden_size = hidden_size
        self.projector_scale = projector_scale
        self.layernorm_condition = nn.LayerNorm(hidden_size * projector_scale)
        self.linear_condition = nn.Linear(hidden_size * projector_scale, hidden_size)

    def reset_parameters(self) -> None:
        """Initialisation of a new projector, as the published code does it."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                module.reset_parameters()

    def project_features(self, features):
        """Raw encoder output -> a list of ``(tokens_i, hidden)`` tensors, one per image."""
        raise NotImplementedError

    def condition(self, control: torch.Tensor) -> torch.Tensor:
        # With projector_scale k, k consecutive control states make one condition.
        control = control.reshape(-1, self.projector_scale * control.shape[-1])
        return self.linear_condition(self.layernorm_condition(control))

    def reweight(self, per_image: list[torch.Tensor], control: torch.Tensor | None) -> list[torch.Tensor]:
        """``f + <f, c> c`` per image; ``control`` holds ``projector_scale`` states per image.

        Without control (alignment, or pass 1) the features are returned as they are.
        """
        if control is None:
            return per_image
        conditions = self.condition(control)
        if conditions.shape[0] != len(per_image):
            raise VPTInputError(
                f"{len(per_image)} branch images but {conditions.shape[0]} control states; "
                "each image needs one action token"
            )
        return [f + (f @ c).unsqueeze(-1) * c for f, c in zip(per_image, conditions)]


class VisionBranch:
    """One Vision Re-Encoding branch. Subclass it in a new file under ``branches/`` and decorate
    the subclass with :func:`vpt_plugin.branches.register_branch`; nothing else needs editing.
    """

    name: ClassVar[str]  # as in config.vision_encoder_ls and the recipes
    tokens: ClassVar[BranchTokens]
    pixel_key: ClassVar[str]  # the model input holding this branch's images (reference names)
    # False: the branch re-uses the model's own ViT and needs none of the encoder methods below.
    has_encoder: ClassVar[bool] = True
    # Encoder weights a new VPT model starts from unless the recipe names others (hub id).
    pretrained_id: ClassVar[str | None] = None
    # ``vpt init --<name>`` help: which checkpoints the encoder loads from.
    encoder_help: ClassVar[str] = ""
    # The folder ``vpt tiny`` writes the branch's tiny encoder to.
    tiny_folder: ClassVar[str | None] = None
    # True: the encoder reads the row's question beside each image (:meth:`preprocess` gets it).
    text_conditioned: ClassVar[bool] = False

    @property
    def data_column(self) -> str:
        """Dataset column of this branch's images in the released data (e.g. ``detection_images``)."""
        return f"{self.tokens.prefix}_images"

    @property
    def encoder_attribute(self) -> str:
        """Model attribute of the branch encoder (published name, e.g. ``detection_model``)."""
        return f"{self.tokens.prefix}_model"

    @property
    def projector_attribute(self) -> str:
        """Model attribute of the branch projector (published name, e.g. ``detection_projector``)."""
        return f"{self.tokens.prefix}_projector"

    def default_encoder_config(self):
        """Encoder config used when a checkpoint carries none (the published encoder's shape)."""
        raise NotImplementedError

    def encoder_config(self, vpt_config):
        """The branch encoder's transformers config, rebuilt from ``config.branch_encoder_configs``."""
        stored = vpt_config.branch_encoder_configs.get(self.name)
        default = self.default_encoder_config()
        return default if stored is None else type(default).from_dict(stored)

    def tiny_encoder_config(self):
        """A toy-sized encoder config for tests and the demos (offline, fast on a CPU)."""
        raise NotImplementedError

    def save_tiny_encoder(self, folder, seed: int = 0):
        """A random encoder of :meth:`tiny_encoder_config` saved as a hub-style folder :meth:`pretrained_encoder` reads."""
        raise NotImplementedError

    def build_encoder(self, vpt_config) -> nn.Module | None:
        raise NotImplementedError

    def pretrained_encoder(self, path: str, encoder_config=None):
        """``(encoder config, encoder state dict)`` read from a checkpoint (hub id or local path)."""
        raise NotImplementedError

    def load_assets(self, model, source, source_is_encoder: bool) -> None:
        """Attach to ``model`` what the encoder needs beside its weights (e.g. a text tokenizer), read from
        ``source``: a VPT checkpoint, or (``source_is_encoder``) the encoder checkpoint a new VPT model
        starts from (None: none was given)."""

    def save_assets(self, model, directory) -> None:
        """Write what :meth:`load_assets` attached into a VPT checkpoint folder being saved."""

    def build_projector(self, vpt_config) -> ControlProjector:
        raise NotImplementedError

    def extra_inputs(self) -> tuple[str, ...]:
        """Further model inputs this branch reads besides ``pixel_key``."""
        return ()

    def encode(self, model, inputs: dict):
        """Run the encoder on this branch's images; ``inputs`` holds ``pixel_key`` and ``extra_inputs``."""
        raise NotImplementedError

    def dummy_inputs(self, model, like: torch.Tensor) -> dict:
        """The smallest model inputs :meth:`encode` runs on (one blank image), with the device and dtype
        of ``like``: under DeepSpeed ZeRO-3 a micro-batch without this branch's images still runs it."""
        raise NotImplementedError

    def dummy_features(self, vpt_config, like: torch.Tensor):
        """The smallest raw encoder output the projector accepts (one image), for :meth:`project_features`,
        with the device and dtype of ``like``."""
        raise NotImplementedError

    def preprocess(self, images, processor, questions: list[str] | None = None) -> dict:
        """PIL images -> this branch's model inputs, with the branch encoder's own preprocessing.

        ``processor`` is the model's processor (the base ViT's branch uses its image processor).
        ``questions``: for a :attr:`text_conditioned` branch, the question each image answers
        (:func:`vpt_plugin.perception.question_before`); other branches ignore it.
        """
        raise NotImplementedError

    def feature_tokens(self, vpt_config, images, processor) -> list[int]:
        """How many ``<|B_image_pad|>`` tokens each of these PIL images fills."""
        raise NotImplementedError
