"""PNet-LLaMA: LLaMA with top-1 routed FFN projections (ParameterNet, Han et al., arXiv 2306.14525, Table 7).

Each routed projection (gate, up and/or down) holds `num_experts` weight matrices in one 3-D tensor
`(num_experts, out_features, in_features)`. A Switch top-1 router (linear, no bias, softmax in float32) picks one
expert per token and the expert's output is multiplied by the router probability, so the per-token compute equals
the dense projection's while the parameter count grows about `num_experts`-fold for that projection.

Attention, RMSNorm and rotary embeddings are LLaMA's, imported from `transformers`.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_pnet_llama import PNetLlamaConfig


# ----------------------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------------------


class RouterOutput(NamedTuple):
    """What a `TopOneRouter` returns for `T` tokens."""

    router_logits: torch.Tensor  # (T, num_experts), float32
    expert_index: torch.Tensor  # (T,), int64: the argmax expert of each token
    expert_scale: torch.Tensor  # (T,): multiplies the chosen expert's output (top-1 probability, or p / stop_grad(p))


class TopOneRouter(nn.Module):
    """Switch-Transformer top-1 router: `logits = x W^T` (no bias), softmax in float32, argmax.

    The router runs in float32 whatever the model dtype (Switch's "selective precision"): with bf16 logits the
    softmax and the argmax are noticeably noisier. Jitter (Switch) multiplies the router input by U(1 - eps, 1 + eps)
    in training only; the experts still see the clean input.
    """

    def __init__(self, in_features: int, num_experts: int, jitter_noise: float, expert_output_scaling: str):
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.jitter_noise = jitter_noise
        self.expert_output_scaling = expert_output_scaling
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))

    def forward(self, hidden_states: torch.Tensor) -> RouterOutput:
        hidden_states = hidden_states.reshape(-1, self.in_features).float()
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        router_logits = F.linear(hidden_states, self.weight.float())
        router_probs = torch.softmax(router_logits, dim=-1)
        top_prob, expert_index = router_probs.max(dim=-1)
        if self.expert_output_scaling == "straight_through":
            # Value exactly 1.0; gradient d(p)/p reaches the router (see PNetLlamaConfig.expert_output_scaling).
            expert_scale = top_prob / top_prob.detach()
        else:
            expert_scale = top_prob
        return RouterOutput(router_logits, expert_index, expert_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}, jitter_noise={self.jitter_noise}"


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Switch capacity: the most tokens one expert processes in a forward, ceil(tokens / experts * factor)."""
    return math.ceil(num_tokens / num_experts * capacity_factor)


def _grouped_mm_supported(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands (torch 2.13): one dtype for both, CPU fp32/bf16/fp16 or CUDA bf16,
    and on both rows of a multiple of 16 bytes (the backward kernels reject other strides)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if hidden_states.device.type == "cpu":
        dtype_ok = hidden_states.dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif hidden_states.device.type == "cuda":
        dtype_ok = hidden_states.dtype == torch.bfloat16
    else:
        return False
    row_bytes = hidden_states.element_size()
    rows_aligned = (weight.shape[-1] * row_bytes) % 16 == 0 and (weight.shape[-2] * row_bytes) % 16 == 0
    return dtype_ok and weight.dtype == hidden_states.dtype and rows_aligned


class ExpertLinear(nn.Module):
    """`num_experts` bias-free linear maps in one `(num_experts, out_features, in_features)` weight; each token goes
    through the one expert its router chose.

    Training / prefill path (dropless): tokens are sorted by expert (stable, so within an expert they keep their
    order, which is also the capacity priority) and multiplied in one `F.grouped_mm` whose `offs` are the cumulative
    int32 end offsets of each expert's rows; experts that get no tokens have empty groups. Where `grouped_mm` is
    missing or rejects the dtype/device, the same sorted layout is multiplied expert by expert (a correct fallback).
    Single-token decode path: the chosen expert's weight is a view `weight[e]` and one `F.linear` - no sorting.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, capacity_factor: float | None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def forward(
        self, hidden_states: torch.Tensor, expert_index: torch.Tensor, expert_scale: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states (T, in_features), expert_index (T,), expert_scale (T,) -> (T, out_features)."""
        num_tokens = hidden_states.shape[0]
        autocast = torch.is_autocast_enabled(hidden_states.device.type)
        if autocast:
            hidden_states = hidden_states.to(torch.get_autocast_dtype(hidden_states.device.type))
        expert_scale = expert_scale.to(hidden_states.dtype)
        if self.num_experts == 1 and self.capacity_factor is None:
            return F.linear(hidden_states, self.weight[0]) * expert_scale[:, None]
        if num_tokens == 1:
            # Decode: one token, one expert, whose weight is a view (indexing reads the index on the host); a capacity
            # of ceil(1 / E * factor) >= 1 never drops it. Under autocast F.linear casts just that expert.
            return F.linear(hidden_states, self.weight[expert_index[0]]) * expert_scale[:, None]
        # F.grouped_mm is not on autocast's op list (F.linear is): cast the weight as autocast would, or the bf16
        # activation meets the fp32 master weight.
        weight = self.weight.to(hidden_states.dtype) if autocast else self.weight

        order = torch.argsort(expert_index, stable=True)
        tokens_per_expert = torch.bincount(expert_index, minlength=self.num_experts)
        end_offsets = torch.cumsum(tokens_per_expert, dim=0)
        if self.capacity_factor is not None:
            # Position of each sorted token inside its expert's queue; overflow tokens get a zero output.
            capacity = expert_capacity(num_tokens, self.num_experts, self.capacity_factor)
            sorted_expert = expert_index[order]
            position_in_expert = torch.arange(num_tokens, device=expert_index.device) - (
                end_offsets - tokens_per_expert
            )[sorted_expert]
            kept_sorted = position_in_expert < capacity
            kept = torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted)
            expert_scale = expert_scale * kept.to(expert_scale.dtype)

        # W (s x) = s (W x): scale whichever side of the matmul is narrower.
        scale_input = self.in_features <= self.out_features
        if scale_input:
            hidden_states = hidden_states * expert_scale[:, None]
        # index_select (not x[order]): the dedicated gather kernel is several times faster on CPU.
        sorted_states = hidden_states.index_select(0, order)
        if _grouped_mm_supported(hidden_states, weight):
            sorted_out = F.grouped_mm(sorted_states, weight.transpose(-2, -1), offs=end_offsets.to(torch.int32))
        else:
            chunks = sorted_states.split(tokens_per_expert.tolist())
            sorted_out = torch.cat([F.linear(chunk, weight[e]) for e, chunk in enumerate(chunks)])
        inverse_order = torch.empty_like(order).scatter_(0, order, torch.arange(num_tokens, device=order.device))
        output = sorted_out.index_select(0, inverse_order)
        return output if scale_input else output * expert_scale[:, None]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
            f"capacity_factor={self.capacity_factor}"
        )


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss, averaged over routers: for each router `N * sum_i f_i * P_i`, with `f_i` the
    fraction of (non-padding) tokens whose argmax is expert i and `P_i` their mean router probability for i.
    Equals 1.0 at perfectly uniform routing; only `P` carries gradient.

    router_logits: one (T, N) tensor per router, T = batch * seq_len; attention_mask: (batch, seq_len), 1 = token.
    """
    token_weight = None if attention_mask is None else attention_mask.reshape(-1).float()
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = F.one_hot(probs.argmax(dim=-1), num_experts).float()
        if token_weight is None:
            fraction, mean_prob = chosen.mean(dim=0), probs.mean(dim=0)
        else:
            weight = token_weight.to(probs.device)[:, None]
            total = weight.sum().clamp_min(1.0)
            fraction, mean_prob = (chosen * weight).sum(dim=0) / total, (probs * weight).sum(dim=0) / total
        losses.append(num_experts * torch.sum(fraction * mean_prob))
    return torch.stack(losses).mean()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss averaged over routers: mean over (non-padding) tokens of logsumexp(logits)^2."""
    token_weight = None if attention_mask is None else attention_mask.reshape(-1).float()
    losses = []
    for logits in router_logits:
        squared = torch.logsumexp(logits.float(), dim=-1) ** 2
        if token_weight is None:
            losses.append(squared.mean())
        else:
            weight = token_weight.to(squared.device)
            losses.append((squared * weight).sum() / weight.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------------------


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


class PNetLlamaDecoderLayer(GradientCheckpointingLayer):
    """LLaMA's pre-norm decoder layer with a `PNetLlamaMLP`."""

    def __init__(self, config: PNetLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = PNetLlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PNetModelOutputWithPast(MoeModelOutputWithPast):
    """Output of `PNetLlamaModel`. `router_logits` (when requested): one float32 `(batch * seq_len, num_experts)`
    tensor per router, layer by layer and within a layer gate, up, down (see `PNetLlamaModel.router_names`)."""


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


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------

_AUTO_MAP = {
    "AutoConfig": "configuration_pnet_llama.PNetLlamaConfig",
    "AutoModel": "modeling_pnet_llama.PNetLlamaModel",
    "AutoModelForCausalLM": "modeling_pnet_llama.PNetLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_pnet_llama.PNetLlamaForSequenceClassification",
}

# Checkpoint keys that must never be random-initialised on load: routers and (expert) FFN weights.
_FFN_KEY_MARKER = ".mlp."


class PNetLlamaPreTrainedModel(PreTrainedModel):
    """Weight init, checkpoint checks and output capture (router logits by hooks on `TopOneRouter`) shared by the
    PNet-LLaMA heads."""

    config: PNetLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PNetLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(TopOneRouter, index=0),
        "hidden_states": PNetLlamaDecoderLayer,
        "attentions": LlamaAttention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers records in `auto_map` only the class being saved; this one modeling file serves every head,
        # so list them all and the folder loads with any of the Auto classes (e.g. a pretrained causal LM as
        # `AutoModelForSequenceClassification` for SST-2 fine-tuning).
        self.config.auto_map = {**_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def router_losses(
        self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (load-balancing loss, z-loss) over the non-padding tokens, averaged over routers."""
        token_mask = _token_mask(attention_mask, seq_len)
        return load_balancing_loss(router_logits, token_mask), router_z_loss(router_logits, token_mask)

    def add_router_losses(self, task_loss: torch.Tensor, aux_loss: torch.Tensor, z_loss: torch.Tensor) -> torch.Tensor:
        """`loss = task_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`."""
        return (
            task_loss
            + self.config.router_aux_loss_coef * aux_loss.to(task_loss.device)
            + self.config.router_z_loss_coef * z_loss.to(task_loss.device)
        )

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The parent initialises Linear/Embedding/RMSNorm and recomputes the rotary buffers (v5: without this call
        # `inv_freq` is garbage after `from_pretrained`).
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (ExpertLinear, TopOneRouter)):
            init.normal_(module.weight, mean=0.0, std=std)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """Fail loudly instead of random-initialising routers or experts that a checkpoint lacks or whose shape
        differs (e.g. a folder saved with another `num_experts`)."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        missing = sorted(key for key in loading_info.missing_keys if _FFN_KEY_MARKER in key)
        mismatched = sorted(
            f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(model)}"
            for key, ckpt, model in loading_info.mismatched_keys
            if _FFN_KEY_MARKER in key
        )
        if missing or mismatched:
            raise ValueError(
                "checkpoint does not match this PNet-LLaMA config (num_experts="
                f"{self.config.num_experts}, moe_projections={self.config.moe_projections}, "
                f"shared_router={self.config.shared_router}); refusing to random-initialise FFN weights. "
                f"Missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                f"mismatched: {mismatched[:8]}{' ...' if len(mismatched) > 8 else ''}. "
                "To upcycle a dense LLaMA use PNetLlamaForCausalLM.from_llama."
            )


class PNetLlamaModel(PNetLlamaPreTrainedModel):
    """The decoder stack: embeddings, `num_hidden_layers` `PNetLlamaDecoderLayer`s, final RMSNorm."""

    def __init__(self, config: PNetLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [PNetLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def router_names(self) -> list[str]:
        """One name per entry of `router_logits`, e.g. `layers.3.mlp.down` (`layers.3.mlp.shared` when shared)."""
        return [f"layers.{i}.mlp.{name}" for i, layer in enumerate(self.layers) for name in layer.mlp.router_names()]

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PNetModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return PNetModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


def _token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The (batch, seq_len) 0/1 mask of the current tokens from a 2-D attention mask that may also cover the cache."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:]


class PNetLlamaForCausalLM(PNetLlamaPreTrainedModel, GenerationMixin):
    """`PNetLlamaModel` with an LM head; training loss = LM loss + weighted router losses; `from_llama` upcycles."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: PNetLlamaConfig):
        super().__init__(config)
        self.model = PNetLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PNetCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside the loss); -100 is ignored. When given, `loss` includes the router
            losses: lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss.
        output_router_logits (`bool`, *optional*):
            Return the router logits (defaults to `config.output_router_logits`).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        need_router_logits = output_router_logits or labels is not None
        outputs: PNetModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=need_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        aux_loss = z_loss = None
        if need_router_logits:
            aux_loss, z_loss = self.router_losses(
                outputs.router_logits, attention_mask, outputs.last_hidden_state.shape[1]
            )
        loss = lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = self.add_router_losses(lm_loss, aux_loss, z_loss)
        return PNetCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )

    @classmethod
    def from_llama(
        cls,
        dense_model_or_path: "PreTrainedModel | str",
        num_experts: int = 8,
        moe_projections: list[str] | tuple[str, ...] = ("down",),
        **config_overrides,
    ) -> "PNetLlamaForCausalLM":
        """Sparse upcycling: a PNet-LLaMA whose experts are all copies of a dense LLaMA's projections.

        `dense_model_or_path`: a `LlamaForCausalLM` (or any causal LM with LLaMA's parameter names), or a Hub id /
        local folder loaded with `AutoModelForCausalLM.from_pretrained` (one code path for both).

        With `expert_output_scaling="router_prob"` (Switch) an upcycled token would compute p * W x with p < 1, not
        the dense W x; so upcycled models default to `expert_output_scaling="straight_through"`: the expert output is
        multiplied by p / stop_gradient(p), exactly 1.0 in value, and the router still gets the gradient of p (divided
        by p). At step 0 the upcycled model therefore computes the dense function for any `num_experts`, while the
        routers (freshly initialised) learn as in Switch. Pass `expert_output_scaling="router_prob"` to override.
        """
        if isinstance(dense_model_or_path, (str, bytes)) or hasattr(dense_model_or_path, "__fspath__"):
            from transformers import AutoModelForCausalLM

            dense = AutoModelForCausalLM.from_pretrained(dense_model_or_path)
        else:
            dense = dense_model_or_path
        dense_config = dense.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
            dense_config.pop(key, None)
        dense_config.update(
            num_experts=num_experts,
            moe_projections=list(moe_projections),
            expert_output_scaling="straight_through",
        )
        dense_config.update(config_overrides)
        config = PNetLlamaConfig(**dense_config)

        model = cls(config).to(dtype=dense.dtype, device=dense.device)
        dense_state = dense.state_dict()
        upcycled_state = {}
        for key, value in dense_state.items():
            name = key.rsplit(".", 2)
            # "...mlp.down_proj.weight" -> copy into every expert of the routed projection
            if len(name) == 3 and name[-1] == "weight" and name[-2].endswith("_proj") and ".mlp" in name[0]:
                projection = name[-2][: -len("_proj")]
                if projection in config.moe_projections:
                    value = value.unsqueeze(0).expand(config.num_experts, *value.shape).clone()
            upcycled_state[key] = value
        result = model.load_state_dict(upcycled_state, strict=False)
        not_routers = [key for key in result.missing_keys if not key.endswith("router.weight")]
        if not_routers or result.unexpected_keys:
            raise ValueError(
                f"dense model {type(dense).__name__} does not have LLaMA's parameter layout: missing "
                f"{not_routers[:8]}, unexpected {list(result.unexpected_keys)[:8]}"
            )
        return model


class PNetLlamaForSequenceClassification(PNetLlamaPreTrainedModel):
    """`PNetLlamaModel` with a linear head on the last non-padding token (as `LlamaForSequenceClassification`);
    the training loss adds the router losses as in `PNetLlamaForCausalLM`."""

    def __init__(self, config: PNetLlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PNetLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PNetSequenceClassifierOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (or regression targets with `num_labels == 1`); `problem_type` picks the loss as in
            transformers. `loss` = task loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        need_router_logits = output_router_logits or labels is not None
        outputs: PNetModelOutputWithPast = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=need_router_logits,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError(
                f"batch size {batch_size} needs config.pad_token_id to find each sequence's last token; it is None"
            )
        if self.config.pad_token_id is None or input_ids is None:
            last_token = torch.full((batch_size,), logits.shape[1] - 1, device=logits.device)
        else:
            # Rightmost non-padding token: works for left and right padding.
            non_pad = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_token = (positions * non_pad).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]

        aux_loss = z_loss = None
        if need_router_logits:
            aux_loss, z_loss = self.router_losses(
                outputs.router_logits, attention_mask, outputs.last_hidden_state.shape[1]
            )
        loss = task_loss = None
        if labels is not None:
            task_loss = self.loss_function(
                logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config
            )
            loss = self.add_router_losses(task_loss, aux_loss, z_loss)
        return PNetSequenceClassifierOutputWithPast(
            loss=loss,
            task_loss=task_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=pooled_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )


PNetLlamaModel.register_for_auto_class("AutoModel")
PNetLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PNetLlamaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ExpertLinear",
    "PNetCausalLMOutputWithPast",
    "PNetLlamaForCausalLM",
    "PNetLlamaForSequenceClassification",
    "PNetLlamaMLP",
    "PNetLlamaModel",
    "PNetLlamaPreTrainedModel",
    "PNetModelOutputWithPast",
    "PNetSequenceClassifierOutputWithPast",
    "TopOneRouter",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
]
