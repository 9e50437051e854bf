"""The three checks of transformers' common model tests that PNet-LLaMA failed (issue 19), written here because the
common test suite is not shipped with the transformers wheel: GenerationMixin among the causal LM's bases, a forward
signature that introspection can read, and training under reentrant gradient checkpointing."""

import inspect

import pytest
import torch
from transformers import GenerationMixin

from modeling_pnet_llama import (
    PNetLlamaConfig,
    PNetLlamaForCausalLM,
    PNetLlamaForSequenceClassification,
    PNetLlamaModel,
)
from modeling_pnet_llama.routed_linear import TopOneRouter

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_experts=4, pad_token_id=0)


def test_inherits_generation_mixin():
    assert GenerationMixin in PNetLlamaForCausalLM.__bases__  # as transformers' common test reads it


@pytest.mark.parametrize("model_class", [PNetLlamaModel, PNetLlamaForCausalLM, PNetLlamaForSequenceClassification])
def test_model_main_input_name(model_class):
    """transformers reads `main_input_name` off the first argument of `forward` after `self`."""
    first_argument = list(inspect.signature(model_class.forward).parameters)[1]
    assert first_argument == model_class.main_input_name == "input_ids"


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_training_gradient_checkpointing_reaches_every_router(use_reentrant):
    """Mixtral and Qwen3-MoE train under reentrant checkpointing, and so does this model: same loss as without
    checkpointing, and every parameter (every router and expert included) gets a gradient. Reentrant checkpointing
    records the router logits without autograd, so there the gradients are the task loss's alone (the routers train
    through the expert output, scaled by the router probability); non-reentrant checkpointing gives exactly the
    gradients without checkpointing."""
    ids = torch.randint(1, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))

    def loss_and_gradients(checkpointing, router_aux_loss_coef=0.1):
        config = PNetLlamaConfig(**TINY, moe_projections=["gate", "down"], router_aux_loss_coef=router_aux_loss_coef)
        torch.manual_seed(0)
        model = PNetLlamaForCausalLM(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        output = model(ids, labels=ids)
        output.loss.backward()
        return output, {name: p.grad for name, p in model.named_parameters()}, model

    reference, reference_grads, _ = loss_and_gradients(checkpointing=False)
    output, grads, model = loss_and_gradients(checkpointing=True)
    assert model.model.gradient_checkpointing
    torch.testing.assert_close(output.loss, reference.loss, rtol=0, atol=0)
    assert output.aux_loss > 1.0  # the tiny model's routing is not balanced: the aux loss has a gradient to give
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads.values()), [
        name for name, grad in grads.items() if grad is None or grad.abs().sum() == 0]
    assert sum(isinstance(module, TopOneRouter) for module in model.modules()) == 4
    if use_reentrant:  # the gradients of the task loss alone
        _, reference_grads, _ = loss_and_gradients(checkpointing=False, router_aux_loss_coef=0.0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7)
