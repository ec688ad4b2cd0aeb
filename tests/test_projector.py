"""Projector maths (method.md section 2) against computations written out by hand."""

import torch

from vpt_plugin.branches.clip import ClipProjector
from vpt_plugin.branches.dino import DinoProjector
from vpt_plugin.branches.sam import SamProjector
from vpt_plugin.vision_features import VisionFeatures


def layer_norm(v, weight, bias, eps=1e-5):
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / (var + eps) ** 0.5 * w + b for x, w, b in zip(v, weight.tolist(), bias.tolist())]


def linear(v, weight, bias):
    return [sum(w * x for w, x in zip(row, v)) + b for row, b in zip(weight.tolist(), bias.tolist())]


def randomise(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)  # away from the identity-like initialisation


def test_dino_projector_reweights_by_the_plain_dot_product():
    projector = DinoProjector(feature_size=3, hidden_size=4)
    randomise(projector)
    features = torch.randn(1, 2, 3)  # one image, two tokens
    control = torch.randn(1, 4)  # its control state
    with torch.no_grad():
        (out,) = projector.reweight(projector.project_features(features), control)

    c = linear(layer_norm(control[0].tolist(), projector.layernorm_condition.weight, projector.layernorm_condition.bias),
               projector.linear_condition.weight, projector.linear_condition.bias)
    for s in range(2):
        f = linear(layer_norm(features[0, s].tolist(), projector.layernorm_feature.weight, projector.layernorm_feature.bias),
                   projector.linear_feature.weight, projector.linear_feature.bias)
        a = sum(fo * co for fo, co in zip(f, c))  # no softmax, no scaling
        expected = [fo + a * co for fo, co in zip(f, c)]
        torch.testing.assert_close(out[s], torch.tensor(expected), atol=1e-5, rtol=1e-5)

    # Without a control state the projected features pass as they are.
    with torch.no_grad():
        (plain,) = projector.reweight(projector.project_features(features), None)
    f0 = linear(layer_norm(features[0, 0].tolist(), projector.layernorm_feature.weight, projector.layernorm_feature.bias),
                projector.linear_feature.weight, projector.linear_feature.bias)
    torch.testing.assert_close(plain[0], torch.tensor(f0), atol=1e-5, rtol=1e-5)


def test_sam_projector_turns_256x64x64_into_256_tokens_by_a_4x4_stride_4_conv():
    projector = SamProjector(feature_channels=256, hidden_size=8)
    randomise(projector)
    features = torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        per_image = projector.project_features(features)
    assert [t.shape for t in per_image] == [(256, 8), (256, 8)]

    # Token (row 3, column 5) of image 1: layer norm over channels at each pixel of its 4x4 patch, then the conv.
    with torch.no_grad():
        patch = features[1, :, 12:16, 20:24].permute(1, 2, 0)
        normed = torch.nn.functional.layer_norm(patch, (256,), projector.layernorm_feature.weight, projector.layernorm_feature.bias)
        weight = projector.conv_feature.weight  # (8, 256, 4, 4)
        expected = torch.einsum("hwc,ochw->o", normed, weight) + projector.conv_feature.bias
    torch.testing.assert_close(per_image[1][3 * 16 + 5], expected, atol=1e-4, rtol=1e-4)


def test_clip_projector_is_the_identity_without_control_and_reweights_per_image():
    projector = ClipProjector(hidden_size=4)
    randomise(projector)
    features = (torch.randn(3, 4), torch.randn(5, 4))  # two images of different sizes
    assert all(a is b for a, b in zip(projector.reweight(list(features), None), features))
    control = torch.randn(2, 4)
    with torch.no_grad():
        out = projector.reweight(projector.project_features(VisionFeatures(list(features))), control)
        for image, (f, ctrl) in enumerate(zip(features, control)):
            c = projector.linear_condition(projector.layernorm_condition(ctrl))
            torch.testing.assert_close(out[image], f + (f @ c)[:, None] * c)
