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
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.swin.modeling_swin import (
    SwinEncoder,
    SwinForImageClassification,
    SwinImageClassifierOutput,
    SwinMLP,
    SwinModel,
    SwinPreTrainedModel,
)
from transformers.utils import can_return_tuple

from .configuration_pnet_swin import PNetSwinConfig


class PNetSwinExpertLinear(nn.Module):
    """`num_experts` linear maps with bias in one `(num_experts, out_features, in_features)` weight; each token goes
    through the expert its router chose. Dropless: tokens are sorted by expert and each expert multiplies its
    contiguous slice (one host sync for the slice sizes)."""

    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))

    def forward(self, hidden_states: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """hidden_states (T, in_features), expert_index (T,) -> (T, out_features)."""
        if self.num_experts == 1:
            return F.linear(hidden_states, self.weight[0], self.bias[0])
        order = torch.argsort(expert_index, stable=True)
        tokens_per_expert = torch.bincount(expert_index, minlength=self.num_experts).tolist()
        sorted_states = hidden_states.index_select(0, order)
        sorted_output = torch.cat(
            [
                F.linear(chunk, self.weight[expert], self.bias[expert])
                for expert, chunk in enumerate(sorted_states.split(tokens_per_expert))
            ]
        )
        return torch.empty_like(sorted_output).index_copy_(0, order, sorted_output)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}"


class PNetSwinMoEMLP(SwinMLP):
    """Swin's MLP `fc2(act(fc1(x)))` with fc2 routed: a top-1 `router` (Linear, no bias) on act(fc1(x)) picks one of
    `num_experts` fc2 experts per token; its output is scaled by the top-1 router probability."""

    def __init__(self, config: PNetSwinConfig, dim: int):
        super().__init__(config, dim)
        hidden_features = self.fc1.out_features
        self.router = nn.Linear(hidden_features, config.num_experts, bias=False)
        self.fc2 = PNetSwinExpertLinear(hidden_features, dim, config.num_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        # float32 routing (Switch's selective precision); the model collects these logits for the balancing loss.
        router_logits = self.router(tokens).float()
        top_prob, expert_index = router_logits.softmax(dim=-1).max(dim=-1)
        output = self.fc2(tokens, expert_index) * top_prob.to(tokens.dtype)[:, None]
        return output.view(*hidden_states.shape[:-1], output.shape[-1])


def load_balancing_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """Switch load-balancing loss averaged over routers: `N * sum_i f_i * P_i` per router, f_i the fraction of tokens
    whose argmax is expert i, P_i their mean router probability for i. 1.0 at uniform routing; only P has gradient."""
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = logits.float().softmax(dim=-1)
        fraction = F.one_hot(probs.argmax(dim=-1), num_experts).float().mean(dim=0)
        losses.append(num_experts * torch.sum(fraction * probs.mean(dim=0)))
    return torch.stack(losses).mean()


@dataclass
class PNetSwinImageClassifierOutput(SwinImageClassifierOutput):
    r"""
    aux_loss (`torch.Tensor`, *optional*): Switch load-balancing loss (already in `loss`, times its coefficient).
    router_logits (`tuple(torch.Tensor)`, *optional*): one `(tokens, num_experts)` float32 tensor per routed MLP.
    """

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class PNetSwinPreTrainedModel(SwinPreTrainedModel):
    config: PNetSwinConfig
    config_class = PNetSwinConfig

    def _init_weights(self, module: nn.Module) -> None:
        """Swin's initialisation; every fc2 expert like Swin's own linear layers (normal(0, initializer_range), zero
        bias)."""
        super()._init_weights(module)
        if isinstance(module, PNetSwinExpertLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)


class PNetSwinEncoder(PNetSwinPreTrainedModel, SwinEncoder):
    """Swin's encoder with the MLPs of `config.moe_blocks` routed."""

    def __init__(self, config: PNetSwinConfig, grid_size: tuple[int, int]):
        super().__init__(config, grid_size)
        blocks = [block for stage in self.layers for block in stage.blocks]
        for index in config.moe_blocks:
            blocks[index].mlp = PNetSwinMoEMLP(config, blocks[index].mlp.fc1.in_features)
        self.post_init()


class PNetSwinModel(PNetSwinPreTrainedModel, SwinModel):
    """`SwinModel` with a `PNetSwinEncoder` (swapped in after Swin's own constructor)."""

    def __init__(self, config: PNetSwinConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        self.encoder = PNetSwinEncoder(config, self.embeddings.patch_grid)
        self.post_init()


class PNetSwinForImageClassification(PNetSwinPreTrainedModel, SwinForImageClassification):
    """`SwinForImageClassification` on a `PNetSwinModel`; the loss adds `router_aux_loss_coef` times the Switch
    load-balancing loss, and the output carries `aux_loss` and `router_logits`."""

    def __init__(self, config: PNetSwinConfig):
        super().__init__(config)
        self.swin = PNetSwinModel(config)
        self.post_init()

    def routed_mlps(self) -> list[PNetSwinMoEMLP]:
        return [module for module in self.modules() if isinstance(module, PNetSwinMoEMLP)]

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> PNetSwinImageClassifierOutput:
        router_logits: list[torch.Tensor] = []
        hooks = [
            mlp.router.register_forward_hook(lambda module, args, output: router_logits.append(output.float()))
            for mlp in self.routed_mlps()
        ]
        try:
            outputs = super().forward(
                pixel_values, labels=labels, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
            )
        finally:
            for hook in hooks:
                hook.remove()
        aux_loss = load_balancing_loss(router_logits) if router_logits else None
        loss = outputs.loss
        if loss is not None and aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * aux_loss
        return PNetSwinImageClassifierOutput(
            loss=loss,
            logits=outputs.logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            reshaped_hidden_states=outputs.reshaped_hidden_states,
            aux_loss=aux_loss,
            router_logits=tuple(router_logits) if router_logits else None,
        )


PNetSwinModel.register_for_auto_class("AutoModel")
PNetSwinForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "PNetSwinExpertLinear",
    "PNetSwinForImageClassification",
    "PNetSwinImageClassifierOutput",
    "PNetSwinMoEMLP",
    "PNetSwinModel",
    "PNetSwinPreTrainedModel",
    "load_balancing_loss",
]
