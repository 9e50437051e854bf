"""PNet-Swin: transformers' Swin Transformer in which the MLP of the blocks in `config.moe_blocks` routes its second
linear layer (fc2) over `num_experts` experts with a Switch top-1 router (ParameterNet, arXiv 2306.14525, Table 5).

A thin extension: every class inherits transformers' Swin class and only the routed MLP is new; its router sees fc2's
input, picks one expert per token (softmax in float32, argmax) and the expert's output is scaled by the top-1
probability, as in the official ParameterNet LLaMA code. The Switch load-balancing loss (times
`router_aux_loss_coef`) is added to the classification loss. Active FLOPs equal the dense Swin's plus the routers'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.swin.modeling_swin import (
    SwinEncoder,
    SwinForImageClassification,
    SwinImageClassifierOutput,
    SwinMLP,
    SwinModel,
    SwinModelOutput,
    SwinPreTrainedModel,
)
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder

from .configuration_pnet_swin import PNetSwinConfig
from .routed_linear import (
    ExpertLinear,
    RoutedWeightsLoading,
    TopOneRouter,
    load_balancing_loss,
    relay_router_logits,
    replacing_dense_modules,
    take_router_logits,
)


class PNetSwinMoEMLP(SwinMLP):
    """Swin's MLP `fc2(act(fc1(x)))` with fc2 routed: a top-1 `router` on act(fc1(x)) picks one of `num_experts` fc2
    experts (with bias) per token; the expert's output is scaled by the top-1 router probability."""

    def __init__(self, config: PNetSwinConfig, dim: int):
        with replacing_dense_modules(self):  # SwinMLP's dense fc2
            super().__init__(config, dim)
            hidden_features = self.fc1.out_features
            self.router = TopOneRouter(hidden_features, config.num_experts)
            self.fc2 = ExpertLinear(hidden_features, dim, config.num_experts, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        route = self.router(tokens)
        output = self.fc2(tokens, route.expert_index, route.expert_scale)
        return output.view(*hidden_states.shape[:-1], output.shape[-1])


@dataclass
class PNetSwinModelOutput(SwinModelOutput):
    r"""
    router_logits (`tuple(torch.Tensor)`, *optional*): one `(tokens, num_experts)` float32 tensor per routed MLP.
    """

    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class PNetSwinImageClassifierOutput(SwinImageClassifierOutput):
    r"""
    aux_loss (`torch.Tensor`, *optional*): Switch load-balancing loss (already in `loss`, times its coefficient).
    router_logits (`tuple(torch.Tensor)`, *optional*): one `(tokens, num_experts)` float32 tensor per routed MLP.
    """

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class PNetSwinPreTrainedModel(RoutedWeightsLoading, SwinPreTrainedModel):
    """Swin's pretrained-model base plus the routed MLPs' init, router-logit capture, and loading that refuses to
    random-initialise routers or experts (`RoutedWeightsLoading`)."""

    config: PNetSwinConfig
    config_class = PNetSwinConfig
    routing_config_keys = ("num_experts", "moe_blocks")
    _can_record_outputs = {
        **(SwinPreTrainedModel._can_record_outputs or {}),
        "router_logits": OutputRecorder(TopOneRouter, index=0),
    }

    def _init_weights(self, module: nn.Module) -> None:
        """Swin's initialisation; every fc2 expert and router like Swin's own linear layers (normal(0,
        initializer_range), zero bias)."""
        super()._init_weights(module)
        if isinstance(module, (ExpertLinear, TopOneRouter)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, ExpertLinear):
            init.zeros_(module.bias)


class PNetSwinEncoder(PNetSwinPreTrainedModel, SwinEncoder):
    """Swin's encoder with the MLPs of `config.moe_blocks` routed; records the router logits (transformers' output
    capturing, as in PNet-LLaMA) when called with `output_router_logits=True`."""

    def __init__(self, config: PNetSwinConfig, grid_size: tuple[int, int]):
        with replacing_dense_modules(self):  # the dense MLPs of the routed blocks
            super().__init__(config, grid_size)
            blocks = [block for stage in self.layers for block in stage.blocks]
            for index in config.moe_blocks:
                blocks[index].mlp = PNetSwinMoEMLP(config, blocks[index].mlp.fc1.in_features)
        self.post_init()


class PNetSwinModel(PNetSwinPreTrainedModel, SwinModel):
    """`SwinModel` with a `PNetSwinEncoder`; its output adds `router_logits`."""

    def __init__(self, config: PNetSwinConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        with replacing_dense_modules(self):  # SwinModel's dense encoder
            super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
            self.encoder = PNetSwinEncoder(config, self.embeddings.patch_grid)
        self.post_init()
        relay_router_logits(self.encoder)  # SwinModel.forward rebuilds its output without them

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs) -> PNetSwinModelOutput:
        """`SwinModel.forward` (same arguments)."""
        outputs = super().forward(pixel_values, return_dict=True, **{**kwargs, "output_router_logits": True})
        return PNetSwinModelOutput(**outputs, router_logits=take_router_logits(self.encoder))


class PNetSwinForImageClassification(PNetSwinPreTrainedModel, SwinForImageClassification):
    """`SwinForImageClassification` on a `PNetSwinModel`; the loss adds `router_aux_loss_coef` times the Switch
    load-balancing loss, and the output carries `aux_loss` and `router_logits`."""

    def __init__(self, config: PNetSwinConfig):
        with replacing_dense_modules(self):  # SwinForImageClassification's dense SwinModel
            super().__init__(config)
            self.swin = PNetSwinModel(config)
        self.post_init()
        relay_router_logits(self.swin)  # SwinForImageClassification.forward rebuilds its output without them

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> PNetSwinImageClassifierOutput:
        """`SwinForImageClassification.forward` (same arguments)."""
        outputs = super().forward(pixel_values, labels=labels, return_dict=True, **kwargs)
        router_logits = take_router_logits(self.swin)
        aux_loss = load_balancing_loss(router_logits) if router_logits else None
        loss = outputs.loss
        if loss is not None and aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * aux_loss
        return PNetSwinImageClassifierOutput(
            **{**outputs, "loss": loss}, aux_loss=aux_loss, router_logits=tuple(router_logits) or None
        )


PNetSwinModel.register_for_auto_class("AutoModel")
PNetSwinForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "PNetSwinForImageClassification",
    "PNetSwinImageClassifierOutput",
    "PNetSwinMoEMLP",
    "PNetSwinModel",
    "PNetSwinModelOutput",
    "PNetSwinPreTrainedModel",
]
