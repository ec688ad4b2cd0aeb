"""PerceptionGPT's adaptive multi-layer ViT fusion (vit_fusion.py) on each base's own ViT."""

import pytest
import torch
from conftest import shape_image
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from vpt_plugin.checkpoint import init_vpt_checkpoint
from vpt_plugin.tiny import build_tiny_base

BASES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module")
def vpt_dir(tmp_path_factory):
    made = {}

    def make(base):
        if base not in made:
            root = tmp_path_factory.mktemp(f"fusion-{base}")
            made[base] = init_vpt_checkpoint(str(build_tiny_base(root / "base", base=base)), root / "vpt", ["clip"])
        return made[base]

    return make


def image_inputs(processor):
    images = [shape_image((2, 5), "red"), shape_image((6, 1), "blue", size=168)]
    out = processor.image_processor(images=images, return_tensors="pt")
    return out.pixel_values, out.image_grid_thw


class PassThrough(nn.Module):
    """A ViT block that returns its input: the model then merges what the last block was given."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize("base", BASES)
def test_fusion_on_the_last_layers_input_is_that_input_merged(base, vpt_dir):
    fused = AutoModelForImageTextToText.from_pretrained(vpt_dir(base), vit_layer_fusion=True).eval()
    plain = AutoModelForImageTextToText.from_pretrained(vpt_dir(base)).eval()
    pixels, grid = image_inputs(AutoProcessor.from_pretrained(vpt_dir(base)))
    depth = len(plain.model.visual.blocks)
    with torch.no_grad():
        fused.vit_fusion.weights.copy_(torch.tensor([-1e4] * (depth - 1) + [0.0]))  # all weight on the last input
        plain.model.visual.blocks[-1] = PassThrough()
        expected = plain.model.get_image_features(pixels, grid).pooler_output
        found = fused.model.get_image_features(pixels, grid).pooler_output
    assert all(torch.equal(f, e) for f, e in zip(found, expected))


def test_fresh_fusion_merges_the_mean_of_every_layers_input_and_learns(vpt_dir):
    fused = AutoModelForImageTextToText.from_pretrained(vpt_dir("qwen2_vl"), vit_layer_fusion=True)
    plain = AutoModelForImageTextToText.from_pretrained(vpt_dir("qwen2_vl")).eval()
    pixels, grid = image_inputs(AutoProcessor.from_pretrained(vpt_dir("qwen2_vl")))
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for block in plain.model.visual.blocks]
    with torch.no_grad():
        plain.model.get_image_features(pixels, grid)
        expected = plain.model.visual.merger(torch.stack(inputs).mean(dim=0))
    for hook in hooks:
        hook.remove()
    found = torch.cat(fused.model.get_image_features(pixels, grid).pooler_output)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)
    found.square().sum().backward()
    assert fused.vit_fusion.weights.grad.abs().sum() > 0


def test_fusion_weights_save_and_load(vpt_dir, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(vpt_dir("qwen3_vl"), vit_layer_fusion=True).eval()
    with torch.no_grad():
        model.vit_fusion.weights.copy_(torch.tensor([0.3, -0.2]))
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.vit_layer_fusion and torch.equal(loaded.vit_fusion.weights, model.vit_fusion.weights)
    pixels, grid = image_inputs(AutoProcessor.from_pretrained(vpt_dir("qwen3_vl")))
    with torch.no_grad():
        assert torch.equal(torch.cat(loaded.model.get_image_features(pixels, grid).pooler_output),
                           torch.cat(model.model.get_image_features(pixels, grid).pooler_output))


def test_the_last_block_stays_in_the_graph(vpt_dir):
    """Its output is not fused, but DDP expects a gradient for every trainable parameter: it gets zeros."""
    fused = AutoModelForImageTextToText.from_pretrained(vpt_dir("qwen2_vl"), vit_layer_fusion=True)
    pixels, grid = image_inputs(AutoProcessor.from_pretrained(vpt_dir("qwen2_vl")))
    torch.cat(fused.model.get_image_features(pixels, grid).pooler_output).sum().backward()
    last = list(fused.model.visual.blocks[-1].parameters())
    assert all(p.grad is not None and not p.grad.any() for p in last)
