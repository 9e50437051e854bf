"""PNet-LLaMA: LLaMA with top-1 routed FFN projections (ParameterNet, Han et al., arXiv 2306.14525, Table 7).

Each routed projection (gate, up and/or down) holds `num_experts` weight matrices in one 3-D tensor
`(num_experts, out_features, in_features)`. A Switch top-1 router (linear, no bias, softmax in float32) picks one
expert per token and the expert's output is multiplied by the router probability, so the per-token compute equals
the dense projection's while the parameter count grows about `num_experts`-fold for that projection.

Everything else is transformers' LLaMA, inherited rather than copied: the decoder layer, the model (embeddings,
cache, positions, masks, the layer loop) and the heads' plumbing come from `LlamaDecoderLayer`, `LlamaModel`,
`LlamaForCausalLM` and `LlamaForSequenceClassification` of the transformers release that runs this file. This file
defines only what ParameterNet changes: the MLP (routers, `ExpertLinear`), the router losses and the output types.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import (
    ModelOutput,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, maybe_install_capturing_hooks

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
        # (Conversions only where needed: in decoding every op of the router is a measurable share of a token.)
        if hidden_states.dim() != 2:
            hidden_states = hidden_states.reshape(-1, self.in_features)
        if hidden_states.dtype != torch.float32:
            hidden_states = hidden_states.float()
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        if torch.is_autocast_enabled(hidden_states.device.type):  # autocast would run the matmul in bf16/fp16
            with torch.autocast(hidden_states.device.type, enabled=False):
                router_logits = F.linear(hidden_states, weight)
        else:
            router_logits = F.linear(hidden_states, weight)
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


def use_grouped_mm(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands. The rules transformers applies to its own experts
    (`transformers.integrations.moe._can_use_grouped_mm`): under `torch.compile` / `torch.export` only bfloat16 (the
    fake-tensor rule rejects other dtypes); on CUDA bfloat16 on compute capability >= 8.0; on CPU float32, bfloat16
    and float16. Ours on top: one dtype for both operands, and rows of a multiple of 16 bytes (the CPU backward
    kernels reject other strides)."""
    dtype = hidden_states.dtype
    if not hasattr(F, "grouped_mm") or weight.dtype != dtype:
        return False
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    if weight.device.type == "cuda":
        supported = dtype == torch.bfloat16 and torch.cuda.get_device_capability(weight.device) >= (8, 0)
    elif weight.device.type == "cpu":
        supported = dtype in (torch.float32, torch.bfloat16, torch.float16)
    else:
        return False
    row_bytes = hidden_states.element_size()
    return supported and (weight.shape[-1] * row_bytes) % 16 == 0 and (weight.shape[-2] * row_bytes) % 16 == 0


def _per_expert_mm(sorted_states: torch.Tensor, weight: torch.Tensor, end_offsets: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm`'s result computed expert by expert: rows `[end_offsets[e-1], end_offsets[e])` times
    `weight[e].T`. weight: (num_experts, out_features, in_features)."""
    output = sorted_states.new_empty(sorted_states.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(end_offsets.tolist()):  # one host sync for all experts
        torch.mm(sorted_states[start:end], weight[expert].T, out=output[start:end])
        start = end
    return output


def _per_expert_mm_backward(
    sorted_states: torch.Tensor, weight: torch.Tensor, end_offsets: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_states = torch.empty_like(sorted_states)
    grad_weight = torch.zeros_like(weight)  # experts without tokens get zero gradient
    start = 0
    for expert, end in enumerate(end_offsets.tolist()):
        torch.mm(grad_output[start:end], weight[expert], out=grad_states[start:end])
        torch.mm(grad_output[start:end].T, sorted_states[start:end], out=grad_weight[expert])
        start = end
    return grad_states, grad_weight


# The fallback is a custom operator so that `torch.compile(fullgraph=True)` and `torch.export` treat its data-dependent
# loop as one opaque node (transformers registers its own experts fallback the same way). A folder's copy of this file
# loaded with trust_remote_code may run beside the installed package: register once per process.
if not hasattr(torch.ops.pnet, "per_expert_mm"):
    torch.library.custom_op("pnet::per_expert_mm", _per_expert_mm, mutates_args=())
    torch.library.custom_op("pnet::per_expert_mm_backward", _per_expert_mm_backward, mutates_args=())

    @torch.library.register_fake("pnet::per_expert_mm")
    def _(sorted_states, weight, end_offsets):
        return sorted_states.new_empty(sorted_states.shape[0], weight.shape[1])

    @torch.library.register_fake("pnet::per_expert_mm_backward")
    def _(sorted_states, weight, end_offsets, grad_output):
        return torch.empty_like(sorted_states), torch.empty_like(weight)

    def _setup_context(ctx, inputs, output):
        sorted_states, weight, end_offsets = inputs
        ctx.save_for_backward(sorted_states, weight, end_offsets)

    def _backward(ctx, grad_output):
        sorted_states, weight, end_offsets = ctx.saved_tensors
        grad_states, grad_weight = torch.ops.pnet.per_expert_mm_backward(
            sorted_states, weight, end_offsets, grad_output.contiguous()
        )
        return grad_states, grad_weight, None

    torch.library.register_autograd("pnet::per_expert_mm", _backward, setup_context=_setup_context)


def grouped_linear(sorted_states: torch.Tensor, weight: torch.Tensor, end_offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `sorted_states` grouped by expert (group e ends at `end_offsets[e]`, int32) times their expert's
    `weight[e].T`: one `F.grouped_mm` where it takes the operands, else the per-expert custom operator. Both are
    differentiable and traceable by `torch.compile` / `torch.export`."""
    if use_grouped_mm(sorted_states, weight):
        return F.grouped_mm(sorted_states, weight.transpose(-2, -1), offs=end_offsets)
    return torch.ops.pnet.per_expert_mm(sorted_states, weight, end_offsets)


class _PermutedGroupedLinear(torch.autograd.Function):
    """`y[t] = W[e_t] x[t]` for tokens `order`-sorted by expert: gather, one grouped matmul, scatter back.

    The eager training path. Autograd's own composition of the same three ops would, in backward, zero-fill and
    scatter-add the input gradient through `index_select`'s backward and keep both row permutations as separate
    buffers; `order` is a permutation, so both backward permutations are plain gathers here, and the backward is two
    grouped matmuls (input and weight gradients) over the already-sorted rows."""

    @staticmethod
    def forward(ctx, hidden_states, weight, order, inverse_order, end_offsets):
        sorted_states = hidden_states.index_select(0, order)
        grouped = use_grouped_mm(sorted_states, weight)
        if grouped:
            sorted_out = F.grouped_mm(sorted_states, weight.transpose(-2, -1), offs=end_offsets)
        else:
            sorted_out = _per_expert_mm(sorted_states, weight, end_offsets)
        ctx.grouped = grouped
        ctx.save_for_backward(sorted_states, weight, order, inverse_order, end_offsets)
        return sorted_out.index_select(0, inverse_order)

    @staticmethod
    def backward(ctx, grad_output):
        sorted_states, weight, order, inverse_order, end_offsets = ctx.saved_tensors
        grad_sorted = grad_output.index_select(0, order)  # contiguous, whatever the upstream strides
        if not ctx.grouped:
            grad_states, grad_weight = _per_expert_mm_backward(sorted_states, weight, end_offsets, grad_sorted)
            return grad_states.index_select(0, inverse_order), grad_weight, None, None, None
        grad_states = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_states = F.grouped_mm(grad_sorted, weight, offs=end_offsets).index_select(0, inverse_order)
        if ctx.needs_input_grad[1]:  # (E, out, T_e) x (T_e, in) per expert; experts without tokens get zeros
            grad_weight = F.grouped_mm(grad_sorted.transpose(0, 1), sorted_states, offs=end_offsets)
        return grad_states, grad_weight, None, None, None


def permuted_grouped_linear(
    hidden_states: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, end_offsets: torch.Tensor
) -> torch.Tensor:
    """`y[t] = weight[e_t] @ hidden_states[t]` where `order` sorts the tokens by expert (stable) and expert e's
    sorted rows end at `end_offsets[e]` (int32)."""
    num_tokens = hidden_states.shape[0]
    inverse_order = torch.empty_like(order).scatter_(0, order, torch.arange(num_tokens, device=order.device))
    if torch.compiler.is_compiling():  # traceable ops: the autograd.Function above calls grouped_mm directly
        sorted_out = grouped_linear(hidden_states.index_select(0, order), weight, end_offsets)
        return sorted_out.index_select(0, inverse_order)
    return _PermutedGroupedLinear.apply(hidden_states, weight, order, inverse_order, end_offsets)


class ExpertLinear(nn.Module):
    """`num_experts` bias-free linear maps in one `(num_experts, out_features, in_features)` weight; each token goes
    through the one expert its router chose.

    Training / prefill path (dropless): tokens are sorted by expert (stable, so within an expert they keep their
    order, which is also the capacity priority) and multiplied in one grouped matmul whose offsets are the
    cumulative int32 end offsets of each expert's rows; experts that get no tokens have empty groups.
    Single-token decode path: one linear map with the chosen expert's weight, no sorting.
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
        if expert_scale.dtype != hidden_states.dtype:
            expert_scale = expert_scale.to(hidden_states.dtype)
        if self.num_experts == 1 and self.capacity_factor is None:
            return F.linear(hidden_states, self.weight[0]) * expert_scale[:, None]
        if num_tokens == 1:  # decode; a capacity of ceil(1 / E * factor) >= 1 never drops the token
            return self._single_token(hidden_states, expert_index) * expert_scale[:, None]
        # The grouped matmul is not on autocast's op list (F.linear is): cast the weight as autocast would, or the
        # bf16 activation meets the fp32 master weight.
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
        output = permuted_grouped_linear(hidden_states, weight, order, end_offsets.to(torch.int32))
        return output if scale_input else output * expert_scale[:, None]

    def _single_token(self, hidden_states: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """One token through its expert, at the cost of one dense projection. On the CPU the expert's weight is a
        view (reading the index on the host syncs with nothing there). Elsewhere, and in compiled graphs, without a
        host sync (static caches, CUDA graphs): a grouped matmul whose only non-empty group is that expert, or where
        grouped_mm does not take the operands (e.g. fp32 master weights under autocast, which F.linear casts), a
        gather of that one expert."""
        if hidden_states.device.type == "cpu" and not torch.compiler.is_compiling():
            return F.linear(hidden_states, self.weight[expert_index.item()])
        if use_grouped_mm(hidden_states, self.weight):
            end_offsets = (torch.arange(self.num_experts, device=expert_index.device) >= expert_index).to(torch.int32)
            return F.grouped_mm(hidden_states, self.weight.transpose(-2, -1), offs=end_offsets)
        return F.linear(hidden_states, self.weight.index_select(0, expert_index)[0])

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
# MLP
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


# ----------------------------------------------------------------------------------------------------------------------
# Decoder layer
# ----------------------------------------------------------------------------------------------------------------------


class PNetLlamaDecoderLayer(LlamaDecoderLayer):
    """LLaMA's decoder layer (attention, norms, forward: inherited) whose MLP is a `PNetLlamaMLP`."""

    def __init__(self, config: PNetLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = PNetLlamaMLP(config)


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


def _as_output(output_class: type[ModelOutput], base_outputs: ModelOutput, **fields) -> ModelOutput:
    """`output_class` holding `fields` plus every field of `base_outputs` (the base model's output) that it declares:
    the cache travels under whatever name this transformers release gives it (`past_key_values`, or `cache` from
    5.24 on), without this file naming it."""
    carried = {key: value for key, value in base_outputs.items() if key in output_class.__dataclass_fields__}
    return output_class(**{**carried, **fields})


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------

_AUTO_MAP = {
    "AutoConfig": "configuration_pnet_llama.PNetLlamaConfig",
    "AutoModel": "modeling_pnet_llama.PNetLlamaModel",
    "AutoModelForCausalLM": "modeling_pnet_llama.PNetLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_pnet_llama.PNetLlamaForSequenceClassification",
}


class PNetLlamaPreTrainedModel(LlamaPreTrainedModel):
    """LLaMA's pretrained-model base plus what the routed projections need: weight init of experts and routers,
    router-logit capture (an `OutputRecorder` hook on every `TopOneRouter`), the router losses, and loading that
    refuses to random-initialise routers or experts."""

    config: PNetLlamaConfig
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

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint that lacks router or expert weights (or holds them
        in another shape, e.g. saved with another `num_experts`): those would be random-initialised silently. Other
        missing weights get transformers' usual report."""
        return_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        routed = {
            f"{name}.weight" for name, module in model.named_modules() if isinstance(module, (ExpertLinear, TopOneRouter))
        }
        missing = sorted(key for key in loading_info["missing_keys"] if key in routed)
        mismatched = sorted(
            f"{key}: checkpoint {tuple(ckpt)} vs model {tuple(shape)}"
            for key, ckpt, shape in loading_info["mismatched_keys"]
            if key in routed
        )
        if missing or mismatched:
            config = model.config
            raise ValueError(
                f"checkpoint does not match this PNet-LLaMA config (num_experts={config.num_experts}, "
                f"moe_projections={config.moe_projections}, shared_router={config.shared_router}); refusing to "
                f"random-initialise routers or experts. Missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
                f"mismatched: {mismatched[:8]}{' ...' if len(mismatched) > 8 else ''}. "
                "To upcycle a dense LLaMA use PNetLlamaForCausalLM.from_llama (or the pnet-upcycle command)."
            )
        return (model, loading_info) if return_loading_info else model

    def router_losses(
        self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (load-balancing loss, z-loss) over the non-padding tokens, averaged over routers."""
        if self.training and torch.is_grad_enabled() and not router_logits[0].requires_grad:
            if any(module.weight.requires_grad for module in self.modules() if isinstance(module, TopOneRouter)):
                raise ValueError(
                    "the router logits were recorded without gradient, so the router losses would not train the "
                    "routers: reentrant gradient checkpointing (use_reentrant=True) runs each layer's first forward "
                    "without autograd and records its outputs detached. Use non-reentrant checkpointing, "
                    "transformers' default: gradient_checkpointing_kwargs={'use_reentrant': False}."
                )
        token_mask = _token_mask(attention_mask, seq_len)
        return load_balancing_loss(router_logits, token_mask), router_z_loss(router_logits, token_mask)

    def add_router_losses(self, task_loss: torch.Tensor, aux_loss: torch.Tensor, z_loss: torch.Tensor) -> torch.Tensor:
        """`loss = task_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`."""
        return (
            task_loss
            + self.config.router_aux_loss_coef * aux_loss.to(task_loss.device)
            + self.config.router_z_loss_coef * z_loss.to(task_loss.device)
        )


def _token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The (batch, seq_len) 0/1 mask of the current tokens from a 2-D attention mask that may also cover the cache."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:]


class PNetLlamaModel(PNetLlamaPreTrainedModel, LlamaModel):
    """LLaMA's decoder stack (embeddings, cache, positions, masks, layer loop, final norm: `LlamaModel.forward`)
    built from `PNetLlamaDecoderLayer`s."""

    def __init__(self, config: PNetLlamaConfig):
        # The modules of LlamaModel.__init__, with PNet decoder layers (calling it would first build and initialise
        # a dense decoder stack only to replace it: seconds and gigabytes at 1B scale).
        super(LlamaModel, self).__init__(config)
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
        # Every training step records the router logits (they feed the loss): install the recording hooks now, not
        # lazily inside the first forward, where the installation lock breaks `torch.compile(fullgraph=True)`.
        maybe_install_capturing_hooks(self)

    def forward(self, *args, **kwargs) -> PNetModelOutputWithPast:
        """`LlamaModel.forward` (same arguments); `output_router_logits=True` also returns the router logits."""
        outputs = super().forward(*args, **kwargs)
        return _as_output(PNetModelOutputWithPast, outputs) if isinstance(outputs, ModelOutput) else outputs

    def router_names(self) -> list[str]:
        """One name per entry of `router_logits`, e.g. `layers.3.mlp.down` (`layers.3.mlp.shared` when shared)."""
        return [f"layers.{i}.mlp.{name}" for i, layer in enumerate(self.layers) for name in layer.mlp.router_names()]


class PNetLlamaForCausalLM(PNetLlamaPreTrainedModel, LlamaForCausalLM):
    """`PNetLlamaModel` with LLaMA's LM head; training loss = LM loss + weighted router losses; `from_llama` upcycles."""

    def __init__(self, config: PNetLlamaConfig):
        super(LlamaForCausalLM, self).__init__(config)  # LlamaForCausalLM.__init__ would build a dense LlamaModel
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
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PNetCausalLMOutputWithPast:
        r"""
        The arguments of `LlamaForCausalLM.forward`. The cache (`cache=` from transformers 5.24 on, `past_key_values=`
        before) reaches `LlamaModel` through `kwargs` under the name the caller used, and comes back in the output
        under this release's name.

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
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=need_router_logits,
            **kwargs,
        )
        # Logits only where needed: an int keeps the last n positions (0: all), a tensor selects positions.
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, positions, :])

        aux_loss = z_loss = None
        if need_router_logits:
            aux_loss, z_loss = self.router_losses(
                outputs.router_logits, attention_mask, outputs.last_hidden_state.shape[1]
            )
        loss = lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = self.add_router_losses(lm_loss, aux_loss, z_loss)
        return _as_output(
            PNetCausalLMOutputWithPast,
            outputs,
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            router_logits=outputs.router_logits if output_router_logits else None,
        )

    @classmethod
    def from_llama(
        cls,
        dense_model_or_path: "nn.Module | str",
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


class PNetLlamaForSequenceClassification(PNetLlamaPreTrainedModel, LlamaForSequenceClassification):
    """`PNetLlamaModel` with LLaMA's classification head on the last non-padding token; the training loss adds the
    router losses as in `PNetLlamaForCausalLM`."""

    def __init__(self, config: PNetLlamaConfig):
        # transformers' generic head builds its backbone through AutoModel.from_config, which does not resolve a
        # remote-code config to this file's classes: build it directly.
        super(GenericForSequenceClassification, self).__init__(config)
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
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PNetSequenceClassifierOutputWithPast:
        r"""
        The arguments of `LlamaForSequenceClassification.forward` (a cache passes through `kwargs`).

        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (or regression targets with `num_labels == 1`); `problem_type` picks the loss as in
            transformers. `loss` = task loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        need_router_logits = output_router_logits or labels is not None
        outputs: PNetModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
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
        return _as_output(
            PNetSequenceClassifierOutputWithPast,
            outputs,
            loss=loss,
            task_loss=task_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=pooled_logits,
            router_logits=outputs.router_logits if output_router_logits else None,
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
    "PNetModelOutputWithPast",
    "PNetSequenceClassifierOutputWithPast",
    "TopOneRouter",
    "expert_capacity",
    "grouped_linear",
    "load_balancing_loss",
    "router_z_loss",
    "use_grouped_mm",
]
