"""PNet-LLaMA: LLaMA with top-1 routed FFN projections (ParameterNet, Han et al., arXiv 2306.14525, Table 7).

Each routed projection (gate, up and/or down) holds `num_experts` weight matrices; a Switch top-1 router picks one per
token and scales its output by the router probability: the dense projection's compute, ~`num_experts` times its
parameters. Everything else is the running transformers release's LLaMA, inherited: this file defines only the MLP
(its routed projections come from `routed_linear.py`, shared with PNet-Swin and the vLLM model), the router losses
added to the heads' losses, and the output types.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import (
    ModelOutput,
    MoeCausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaPreTrainedModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, maybe_install_capturing_hooks

from .configuration_pnet_llama import PNetLlamaConfig
from .routed_linear import (
    ExpertLinear,
    RoutedWeightsLoading,
    RouterOutput,
    TopOneRouter,
    load_balancing_loss,
    relay_router_logits,
    replacing_dense_modules,
    router_z_loss,
    take_router_logits,
)


logger = logging.get_logger(__name__)


class PNetLlamaMLP(nn.Module):
    """LLaMA's SwiGLU FFN `down(act(gate(x)) * up(x))` in which the projections named in `config.moe_projections`
    are `ExpertLinear`s. Routers: one per routed projection on that projection's input (`shared_router=False`,
    official code), or one `router` on the FFN input whose choice every routed projection follows."""

    def __init__(self, config: PNetLlamaConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.moe_projections = list(config.moe_projections)
        self.shared_router = config.shared_router
        self.act_fn = ACT2FN[config.hidden_act]
        shapes = {
            "gate": (config.hidden_size, config.intermediate_size),
            "up": (config.hidden_size, config.intermediate_size),
            "down": (config.intermediate_size, config.hidden_size),
        }

        def router(in_features: int) -> TopOneRouter:
            return TopOneRouter(
                in_features, config.num_experts, config.router_jitter_noise, config.expert_output_scaling
            )

        self.router = router(config.hidden_size) if self.shared_router else None
        for name, (in_features, out_features) in shapes.items():
            if name in self.moe_projections:
                projection = ExpertLinear(in_features, out_features, config.num_experts, config.expert_capacity_factor)
                setattr(self, f"{name}_router", None if self.shared_router else router(in_features))
            else:
                projection = nn.Linear(in_features, out_features, bias=False)
            setattr(self, f"{name}_proj", projection)

    def _project(self, name: str, hidden_states: torch.Tensor, shared_route: RouterOutput | None) -> torch.Tensor:
        projection = getattr(self, f"{name}_proj")
        if name not in self.moe_projections:
            return projection(hidden_states)
        route = shared_route if self.shared_router else getattr(self, f"{name}_router")(hidden_states)
        return projection(hidden_states, route.expert_index, route.expert_scale)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_shape = hidden_states.shape[:-1]
        tokens = hidden_states.reshape(-1, self.hidden_size)
        shared_route = self.router(tokens) if self.shared_router else None
        gate = self._project("gate", tokens, shared_route)
        up = self._project("up", tokens, shared_route)
        down = self._project("down", self.act_fn(gate) * up, shared_route)
        return down.reshape(*batch_shape, self.hidden_size)

    def router_names(self) -> list[str]:
        """Names of this MLP's routers in call order (the order of their `router_logits`)."""
        return ["shared"] if self.shared_router else list(self.moe_projections)


class PNetLlamaDecoderLayer(LlamaDecoderLayer):
    """LLaMA's decoder layer (attention, norms, forward: inherited) whose MLP is a `PNetLlamaMLP`."""

    def __init__(self, config: PNetLlamaConfig, layer_idx: int):
        with replacing_dense_modules(self):  # LlamaDecoderLayer's dense LlamaMLP
            super().__init__(config, layer_idx)
            self.mlp = PNetLlamaMLP(config)


@dataclass
class PNetCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """Output of `PNetLlamaForCausalLM`.

    `loss` = `lm_loss` + router_aux_loss_coef * `aux_loss` + router_z_loss_coef * `z_loss` (when labels are given);
    `aux_loss` is the unscaled load-balancing loss averaged over routers (1.0 at uniform routing), `z_loss` the
    unscaled router z-loss; both are computed whenever labels are given or router logits are requested.
    """

    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


@dataclass
class PNetSequenceClassifierOutputWithPast(SequenceClassifierOutputWithPast):
    """Output of `PNetLlamaForSequenceClassification`: `loss` = `task_loss` + router_aux_loss_coef * `aux_loss` +
    router_z_loss_coef * `z_loss` (when labels are given)."""

    task_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


def _as_output(output_class: type[ModelOutput], base_outputs: ModelOutput, **fields) -> ModelOutput:
    """`output_class` holding `fields` plus every field of `base_outputs` (the base model's output) that it declares:
    the cache travels under whatever name this transformers release gives it (`past_key_values`, or `cache` from
    5.24 on), without this file naming it."""
    carried = {key: value for key, value in base_outputs.items() if key in output_class.__dataclass_fields__}
    return output_class(**{**carried, **fields})


_AUTO_MAP = {
    "AutoConfig": "configuration_pnet_llama.PNetLlamaConfig",
    "AutoModel": "modeling_pnet_llama.PNetLlamaModel",
    "AutoModelForCausalLM": "modeling_pnet_llama.PNetLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_pnet_llama.PNetLlamaForSequenceClassification",
}


class PNetLlamaPreTrainedModel(RoutedWeightsLoading, LlamaPreTrainedModel):
    """LLaMA's pretrained-model base plus what the routed projections need: weight init of experts and routers,
    router-logit capture (an `OutputRecorder` hook on every `TopOneRouter`), the router losses, and loading that
    refuses to random-initialise routers or experts (`RoutedWeightsLoading`)."""

    config: PNetLlamaConfig
    routing_config_keys = ("num_experts", "moe_projections", "shared_router")
    dense_checkpoint_hint = (
        "To upcycle a dense LLaMA use the pnet-upcycle command (pnet.upcycle.upcycle_llama)."
    )
    _no_split_modules = ["PNetLlamaDecoderLayer"]
    _can_record_outputs = {
        **LlamaPreTrainedModel._can_record_outputs,
        "router_logits": OutputRecorder(TopOneRouter, index=0),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The parent initialises Linear/Embedding/RMSNorm and recomputes the rotary buffers (without this call
        # `inv_freq` is garbage after `from_pretrained`).
        super()._init_weights(module)
        if isinstance(module, (ExpertLinear, TopOneRouter)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers records in `auto_map` only the class being saved; this one modeling file serves every head,
        # so list them all and the folder loads with any of the Auto classes (e.g. a pretrained causal LM as
        # `AutoModelForSequenceClassification` for SST-2 fine-tuning).
        self.config.auto_map = {**_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _forward_with_router_losses(
        self, head_forward, output_class, task_loss_name, labels, output_router_logits, **inputs
    ) -> ModelOutput:
        """`head_forward` (the inherited LLaMA head's forward: its logits and task loss; the backbone's router logits
        reach here through `relay_router_logits`) plus the router losses:
        `loss = task loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`, the unscaled losses over
        the non-padding tokens, averaged over routers."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        need_router_logits = output_router_logits or labels is not None
        outputs = head_forward(labels=labels, output_router_logits=need_router_logits, return_dict=True, **inputs)
        # Not asked for, the backbone returned none (its hook kept None): nothing to take, nothing pinned.
        router_logits = take_router_logits(self.model) if need_router_logits else None
        fields = {task_loss_name: outputs.loss, "router_logits": router_logits if output_router_logits else None}
        if need_router_logits:
            if self.training and torch.is_grad_enabled() and not router_logits[0].requires_grad:
                # Reentrant checkpointing runs each layer's first forward without autograd: the routers still train
                # through the task loss (the expert output is scaled by the router probability), as Mixtral's do.
                logger.warning_once(
                    "router logits were recorded without gradient (reentrant gradient checkpointing): the "
                    "load-balancing and z-losses are reported but do not train the routers. Non-reentrant "
                    "checkpointing (gradient_checkpointing_kwargs={'use_reentrant': False}, transformers' default) "
                    "trains them."
                )
            tokens = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            # the (batch, seq_len) mask of the current tokens: a 2-D attention mask may also cover the cache
            mask = inputs.get("attention_mask")
            mask = mask[:, -tokens.shape[1]:] if mask is not None and mask.dim() == 2 else None
            fields["aux_loss"] = load_balancing_loss(router_logits, mask)
            fields["z_loss"] = router_z_loss(router_logits, mask)
        if labels is not None:
            fields["loss"] = (
                outputs.loss
                + self.config.router_aux_loss_coef * fields["aux_loss"].to(outputs.loss.device)
                + self.config.router_z_loss_coef * fields["z_loss"].to(outputs.loss.device)
            )
        return _as_output(output_class, outputs, **fields)


class PNetLlamaModel(PNetLlamaPreTrainedModel, LlamaModel):
    """LLaMA's decoder stack (embeddings, cache, positions, masks, layer loop, final norm: `LlamaModel.forward`)
    built from `PNetLlamaDecoderLayer`s; `output_router_logits=True` also returns the router logits."""

    def __init__(self, config: PNetLlamaConfig):
        with replacing_dense_modules(self):  # LlamaModel's dense decoder layers
            super().__init__(config)
            self.layers = nn.ModuleList(PNetLlamaDecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.post_init()
        # Every training step records the router logits (they feed the loss): install the recording hooks now, not
        # lazily inside the first forward, where the installation lock breaks `torch.compile(fullgraph=True)`.
        maybe_install_capturing_hooks(self)

    def router_names(self) -> list[str]:
        """One name per entry of `router_logits`, e.g. `layers.3.mlp.down` (`layers.3.mlp.shared` when shared)."""
        return [f"layers.{i}.mlp.{name}" for i, layer in enumerate(self.layers) for name in layer.mlp.router_names()]


class PNetLlamaForCausalLM(PNetLlamaPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    """`PNetLlamaModel` with LLaMA's LM head; training loss = LM loss + weighted router losses."""

    def __init__(self, config: PNetLlamaConfig):
        with replacing_dense_modules(self):  # LlamaForCausalLM's dense LlamaModel
            super().__init__(config)
            self.model = PNetLlamaModel(config)
        self.post_init()
        relay_router_logits(self.model)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PNetCausalLMOutputWithPast:
        r"""
        `LlamaForCausalLM.forward` (named here because generation reads the signature) plus the router losses. The
        cache (`cache=` from transformers 5.24 on, `past_key_values=` before) passes through `kwargs` under the name
        the caller used, and comes back in the output under this release's name.

        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside the loss); -100 is ignored. When given, `loss` includes the router
            losses: lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss.
        output_router_logits (`bool`, *optional*):
            Return the router logits (defaults to `config.output_router_logits`).
        """
        return self._forward_with_router_losses(
            super().forward, PNetCausalLMOutputWithPast, "lm_loss", labels, output_router_logits,
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
        )


class PNetLlamaForSequenceClassification(PNetLlamaPreTrainedModel, LlamaForSequenceClassification):
    """`PNetLlamaModel` with LLaMA's classification head: transformers' forward (score of the last non-padding
    token, task loss), plus the router losses as in `PNetLlamaForCausalLM`."""

    def __init__(self, config: PNetLlamaConfig):
        # transformers' generic head builds its backbone through AutoModel.from_config, which does not resolve a
        # remote-code config to this file's classes: build it directly.
        super(GenericForSequenceClassification, self).__init__(config)
        self.num_labels = config.num_labels
        self.model = PNetLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
        relay_router_logits(self.model)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PNetSequenceClassifierOutputWithPast:
        r"""
        `LlamaForSequenceClassification.forward` (positions, cache, embeddings: through `kwargs`) plus the router
        losses.

        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (or regression targets with `num_labels == 1`); `problem_type` picks the loss as in
            transformers. `loss` = task loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss.
        """
        return self._forward_with_router_losses(
            super().forward, PNetSequenceClassifierOutputWithPast, "task_loss", labels, output_router_logits,
            input_ids=input_ids, attention_mask=attention_mask, **kwargs,
        )


PNetLlamaModel.register_for_auto_class("AutoModel")
PNetLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PNetLlamaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ExpertLinear",
    "PNetCausalLMOutputWithPast",
    "PNetLlamaDecoderLayer",
    "PNetLlamaForCausalLM",
    "PNetLlamaForSequenceClassification",
    "PNetLlamaMLP",
    "PNetLlamaModel",
    "PNetLlamaPreTrainedModel",
    "PNetSequenceClassifierOutputWithPast",
    "TopOneRouter",
    "load_balancing_loss",
    "router_z_loss",
]
