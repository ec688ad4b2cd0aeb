"""The prefix-reusing two-pass forward (``config.reuse_first_pass``) against the straightforward one.

The straightforward forward (two full passes, ``reuse_first_pass=False``) is the oracle: the
reusing one must give the same loss, logits and gradients (1e-5 relative in fp32) while
computing each position before the first changed one once.
"""

import pytest
import torch
from conftest import batch_of, reencoding_example, region_example, shape_image
from peft import LoraConfig, get_peft_model

from vpt_plugin.conversation import encode_conversation


def plain_example(processor, config):
    image = shape_image((2, 2), "yellow")
    messages = [{"role": "user", "content": "<image>What colour is the square?"}, {"role": "assistant", "content": "yellow"}]
    return encode_conversation(processor, config, messages, [image])


def mixed_batch(processor, config):
    """Re-encoding rows for each branch, a region row and a row without perception."""
    examples = [
        reencoding_example(processor, config, "clip"),
        region_example(processor, config),
        reencoding_example(processor, config, "dino", colour="blue", cell=(0, 0)),
        reencoding_example(processor, config, "sam", colour="green", cell=(3, 7)),
        plain_example(processor, config),
    ]
    return batch_of(processor, examples)


def loss_and_gradients(model, batch, reuse: bool, seed: int = 0):
    model.zero_grad(set_to_none=True)
    model.config.reuse_first_pass = reuse
    torch.manual_seed(seed)  # para masking draws per batch
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def assert_same_gradients(expected: dict, found: dict, rtol: float) -> None:
    assert expected.keys() == found.keys()
    difference = torch.sqrt(sum(((expected[n] - found[n]).float() ** 2).sum() for n in expected))
    scale = torch.sqrt(sum((g.float() ** 2).sum() for g in expected.values()))
    assert difference <= rtol * scale, f"gradients differ by {difference / scale:.2e} relative"
    for name in expected:
        # Per parameter, relative to the whole gradient's largest entry: some parameters' true
        # gradient is exactly zero (an attention key bias), where only rounding noise is left.
        largest = max(g.abs().max() for g in expected.values())
        torch.testing.assert_close(found[name], expected[name], rtol=rtol, atol=rtol * largest, msg=name)


@pytest.mark.parametrize(
    "checkpointing, para_mask_id",
    [(None, 0), (None, 2), ("non-reentrant", 1), ("reentrant", 0), ("reentrant", 2)],
)
def test_loss_and_gradients_equal_the_straightforward_forward(model, processor, checkpointing, para_mask_id):
    check_reuse_equals_straightforward(model, processor, checkpointing, para_mask_id)


def check_reuse_equals_straightforward(model, processor, checkpointing, para_mask_id, batch=None) -> None:
    """Loss, logits and gradients of a batch (default: the mixed batch), reusing against straightforward
    (also run per base, and per branch on a batch of its rows)."""
    model.train()
    model.config.para_mask_id, model.config.para_mask_ratio = para_mask_id, 1.0
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    batch = mixed_batch(processor, model.config) if batch is None else batch
    loss, logits, grads = loss_and_gradients(model, batch, reuse=False)
    fast_loss, fast_logits, fast_grads = loss_and_gradients(model, batch, reuse=True)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast_logits, logits, rtol=1e-5, atol=1e-5)
    assert_same_gradients(grads, fast_grads, rtol=1e-5)
    # Reused keys and values carry gradient back to pass 1: the action start's embedding trains.
    action_start = model.config.branch_ids("clip")["action_start"]
    assert fast_grads["model.language_model.embed_tokens.weight"][action_start].abs().sum() > 0


def test_para_mask_ratio_draws_alike_in_both_forwards(model, processor):
    model.train()
    model.config.para_mask_id, model.config.para_mask_ratio = 2, 0.5
    batch = mixed_batch(processor, model.config)
    losses = set()
    for seed in range(4):
        loss, _, grads = loss_and_gradients(model, batch, reuse=False, seed=seed)
        fast_loss, _, fast_grads = loss_and_gradients(model, batch, reuse=True, seed=seed)
        torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=0)
        assert_same_gradients(grads, fast_grads, rtol=1e-5)
        losses.add(round(loss.item(), 5))
    assert len(losses) > 1, "the seeds should draw both masked and unmasked batches"


def test_lora_gradients_equal_the_straightforward_forward(model, processor):
    check_lora_gradients_equal_straightforward(model, processor, para_mask_id=0)


def check_lora_gradients_equal_straightforward(model, processor, para_mask_id) -> None:
    model.config.para_mask_id, model.config.para_mask_ratio = para_mask_id, 1.0
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    lora.train()
    lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora.enable_input_require_grads()
    for name, parameter in lora.named_parameters():  # start LoRA B away from zero so A gets gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    batch = mixed_batch(processor, model.config)
    _, _, grads = loss_and_gradients(lora, batch, reuse=False)
    _, _, fast_grads = loss_and_gradients(lora, batch, reuse=True)
    assert fast_grads and all("lora_" in name for name in fast_grads)
    assert_same_gradients(grads, fast_grads, rtol=1e-5)


def test_bf16_close_to_the_straightforward_forward(model, processor):
    model.to(torch.bfloat16).train()
    batch = mixed_batch(processor, model.config)
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    loss, _, grads = loss_and_gradients(model, batch, reuse=False)
    fast_loss, _, fast_grads = loss_and_gradients(model, batch, reuse=True)
    torch.testing.assert_close(fast_loss.float(), loss.float(), rtol=1e-2, atol=0)
    # bf16 rounds differently where the computation is split; the direction must be the same.
    flat = torch.cat([grads[n].float().flatten() for n in grads])
    fast_flat = torch.cat([fast_grads[n].float().flatten() for n in grads])
    assert torch.nn.functional.cosine_similarity(flat, fast_flat, dim=0) > 0.999


class TokensThroughLayers:
    """Counts the positions the first decoder layer computes, call by call (forward and recomputation)."""

    def __init__(self, model):
        self.calls = []
        layer = model.model.language_model.layers[0].self_attn.q_proj
        self.handle = layer.register_forward_hook(lambda module, args, out: self.calls.append(args[0].shape[1]))


def test_positions_before_the_first_change_are_computed_once(model, processor):
    model.train()
    model.config.para_mask_id = 0
    batch = mixed_batch(processor, model.config)
    ids = batch["input_ids"]
    config = model.config
    actions = torch.zeros_like(ids, dtype=torch.bool)
    changed = torch.zeros_like(ids, dtype=torch.bool)
    for name in config.vision_encoder_ls:
        branch = config.branch_ids(name)
        actions |= ids == branch["action"]
        changed |= (ids == branch["action"]) | (ids == branch["image"])
    first_change = int(changed.any(dim=0).nonzero()[0])
    last_action = int(actions.any(dim=0).nonzero()[-1])

    counter = TokensThroughLayers(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.config.reuse_first_pass = True
    model(**batch).loss.backward()
    counter.handle.remove()
    length = ids.shape[1]
    # Pass 1 up to the last action start, pass 2 from the first change, then the same again when
    # checkpointing recomputes in backward; never the whole sequence twice.
    assert counter.calls == [last_action, length - first_change, length - first_change, last_action]
    assert last_action + length - first_change < 2 * length


def test_batch_without_perception_runs_one_pass(model, processor):
    model.train()
    batch = batch_of(processor, [plain_example(processor, model.config)])
    counter = TokensThroughLayers(model)
    model(**batch).loss.backward()
    counter.handle.remove()
    assert counter.calls == [batch["input_ids"].shape[1]]


def test_checkpointing_runs_backward_through_branch_encoders_only_while_they_train(model, processor):
    """transformers' gradient checkpointing hooks every sub-model's patch embeddings; a frozen
    branch encoder's must not make backward run through it."""
    model.train()
    model.gradient_checkpointing_enable()
    outputs_require_grad = []
    model.detection_model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: outputs_require_grad.append(output.requires_grad)
    )
    batch = batch_of(processor, [reencoding_example(processor, model.config, "dino")])
    model.detection_model.requires_grad_(False)
    model(**batch).loss.backward()
    model.detection_model.requires_grad_(True)
    model(**batch).loss.backward()
    assert outputs_require_grad == [False, True]
    assert model.detection_model.encoder.layer[0].mlp.fc1.weight.grad.abs().sum() > 0
