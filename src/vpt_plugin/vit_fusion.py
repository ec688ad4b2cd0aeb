"""PerceptionGPT's adaptive multi-layer ViT fusion (perceptiongpt.md section 4), for the base model's own ViT.

Learnable per-layer scalars, initialised equal and softmax-normalised, weight the ViT's layer outputs
(the embedding output and every layer but the last, i.e. the input of each block); their sum replaces
the last layer's output as what the ViT's merger turns into the LLM's visual tokens. It applies to
every image the base ViT encodes (the model's own images, region crops, clip-branch images).

Every Qwen-VL ViT runs ``blocks`` in order, then ``merger`` on the result (Qwen2.5-VL in its window
order, which all block inputs share); the fusion reads each block's input and hands the merger the
weighted sum, with PyTorch's forward hooks on those two public submodules, so no base's ViT forward
is restated. Off by default (``config.vit_layer_fusion``): published checkpoints keep their logits.
"""

import torch
from torch import nn


class ViTLayerFusion(nn.Module):
    """The fusion weights of one ViT, and the hooks that apply them (:meth:`attach`)."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))
        self._layer_inputs: list[torch.Tensor] = []

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weights)  # equal weights after the softmax

    def attach(self, visual: nn.Module) -> None:
        """Read each block's input and give the merger their weighted sum, in every forward of ``visual``."""
        if len(visual.blocks) != self.weights.numel():
            raise ValueError(f"ViT fusion has {self.weights.numel()} weights for {len(visual.blocks)} ViT layers")
        # Each ViT calls its blocks and its merger with the hidden states as first positional argument.
        for index, block in enumerate(visual.blocks):
            block.register_forward_pre_hook(self._keep_layer_input(index))
        visual.merger.register_forward_pre_hook(self._fused_merger_input)

    def _keep_layer_input(self, index: int):
        def hook(module, args):
            if index == 0:  # a new forward (or, under checkpointing, a recomputation) starts
                self._layer_inputs = []
            self._layer_inputs.append(args[0])

        return hook

    def _fused_merger_input(self, module, args):
        layers = self._layer_inputs
        self._layer_inputs = []
        return (self(layers, args[0]), *args[1:])

    def forward(self, layers: list[torch.Tensor], last_output: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the layer inputs. A module forward, so DeepSpeed ZeRO-3 gathers the weights
        here; the last layer's output enters with weight 0, so the last block stays in the graph (DDP
        expects a gradient for every trainable parameter) and changes nothing."""
        if len(layers) != self.weights.numel():
            raise RuntimeError(f"ViT fusion saw {len(layers)} layer inputs for {self.weights.numel()} layers")
        weights = torch.softmax(self.weights.float(), dim=0).to(layers[0].dtype)
        return torch.einsum("l,l...->...", weights, torch.stack(layers)) + 0.0 * last_output
