"""PNet-LLaMA as a native vLLM model: vLLM's LLaMA (paged attention, fused RMSNorm, rotary, sampler) with the FFN
replaced by `PNetLlamaMLP`, whose routed projections are top-1 routed over `num_experts` experts.

Imported by vLLM only (lazily, through the registration in `pnet.vllm_plugin`); it imports vLLM at module level.

The routed projection is written for vLLM's execution model: every shape depends only on the number of tokens in the
batch and nothing reads a device value on the host, so it runs under vLLM's torch.compile (traced once with a
dynamic token dimension) and inside CUDA graphs. Tokens are sorted by expert and multiplied in one `F.grouped_mm`
whose group offsets come from `searchsorted` (a static-shape count, unlike `bincount`); the matmul is a vLLM custom op,
opaque to the compiler, because inductor's fake-tensor `grouped_mm` rejects fp32 on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from vllm.model_executor.models.adapters import as_seq_cls_model
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import WeightsMapper
from vllm.utils.torch_utils import direct_register_custom_op

# The HF model's rule for when F.grouped_mm takes the operands (dtype/device/alignment): one rule for both runtimes.
from modeling_pnet_llama.modeling_pnet_llama import use_grouped_mm

PROJECTIONS = ("gate", "up", "down")


# ----------------------------------------------------------------------------------------------------------------------
# Routed matmul (a vLLM custom op)
# ----------------------------------------------------------------------------------------------------------------------


def routed_linear(hidden_states: torch.Tensor, weight: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """`out[t] = hidden_states[t] @ weight[expert_index[t]].T`: hidden_states (T, in), weight (E, out, in),
    expert_index (T,) int64 -> (T, out). No host sync, no data-dependent shape."""
    num_experts = weight.shape[0]
    if not use_grouped_mm(hidden_states, weight):
        # Masked sum over experts: E times the FLOPs of the grouped path, but equally sync-free (CUDA graphs);
        # reached only by dtypes/devices `grouped_mm` lacks (e.g. fp16/fp32 on CUDA).
        output = hidden_states.new_zeros(hidden_states.shape[0], weight.shape[1])
        for expert in range(num_experts):
            chosen = (expert_index == expert).unsqueeze(-1).to(hidden_states.dtype)
            output += F.linear(hidden_states, weight[expert]) * chosen
        return output
    order = torch.argsort(expert_index, stable=True)
    sorted_experts = expert_index.index_select(0, order)
    experts = torch.arange(num_experts, device=expert_index.device, dtype=expert_index.dtype)
    # End offset of each expert's rows = number of tokens routed to experts <= it; empty experts get empty groups.
    end_offsets = torch.searchsorted(sorted_experts, experts, right=True).to(torch.int32)
    sorted_out = F.grouped_mm(hidden_states.index_select(0, order), weight.transpose(-2, -1), offs=end_offsets)
    return torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)


def _routed_linear_fake(hidden_states: torch.Tensor, weight: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape[0], weight.shape[1])


direct_register_custom_op("pnet_routed_linear", routed_linear, fake_impl=_routed_linear_fake)


# ----------------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------------


class TopOneRouter(nn.Module):
    """Switch top-1 router at inference: `logits = x W^T` in float32, softmax, argmax. Returns the chosen expert per
    token and the factor on its output: the top-1 probability (`"router_prob"`), or None for `"straight_through"`,
    whose factor p / stop_grad(p) is exactly 1.0."""

    def __init__(self, in_features: int, num_experts: int, expert_output_scaling: str):
        super().__init__()
        self.in_features = in_features
        self.scale_by_prob = expert_output_scaling == "router_prob"
        self.weight = nn.Parameter(torch.empty(num_experts, in_features), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        router_probs = torch.softmax(F.linear(hidden_states.float(), self.weight.float()), dim=-1)
        top_prob, expert_index = router_probs.max(dim=-1)
        return expert_index, (top_prob if self.scale_by_prob else None)


class ExpertLinear(nn.Module):
    """`num_experts` bias-free linear maps in one `(num_experts, out_features, in_features)` weight, the checkpoint's
    layout; each token goes through the expert its router chose, scaled by the router's factor."""

    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features), requires_grad=False)

    def forward(
        self, hidden_states: torch.Tensor, expert_index: torch.Tensor, expert_scale: torch.Tensor | None
    ) -> torch.Tensor:
        if expert_scale is None:
            return torch.ops.vllm.pnet_routed_linear(hidden_states, self.weight, expert_index)
        scale = expert_scale.to(hidden_states.dtype).unsqueeze(-1)
        # W (s x) = s (W x): scale the narrower side (as the HF model does, so both round alike).
        if self.in_features <= self.out_features:
            return torch.ops.vllm.pnet_routed_linear(hidden_states * scale, self.weight, expert_index)
        return torch.ops.vllm.pnet_routed_linear(hidden_states, self.weight, expert_index) * scale

    def extra_repr(self) -> str:
        return f"num_experts={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"


class PNetLlamaMLP(nn.Module):
    """LLaMA's SwiGLU FFN `down(silu(gate(x)) * up(x))` with the projections in `config.moe_projections` routed.

    Parameter names follow the checkpoint: `{name}_proj.weight` (3-D when routed), `{name}_router.weight` per routed
    projection, or one `router.weight` on the FFN input when `config.shared_router`. When neither gate nor up is
    routed they are vLLM's merged `gate_up_proj` (one GEMM), loaded from `gate_proj`/`up_proj` by LLaMA's mapper.
    The FFN is replicated across tensor-parallel ranks (the down router needs the whole intermediate activation);
    attention is sharded as in vLLM's LLaMA.
    """

    def __init__(self, config, prefix: str = ""):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"PNet-LLaMA in vLLM supports hidden_act='silu' only, got {config.hidden_act!r}")
        self.routed = tuple(name for name in PROJECTIONS if name in config.moe_projections)
        hidden, intermediate = config.hidden_size, config.intermediate_size
        shapes = {"gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden)}

        def router(in_features: int) -> TopOneRouter:
            return TopOneRouter(in_features, config.num_experts, config.expert_output_scaling)

        self.router = router(hidden) if config.shared_router else None
        self.merged_gate_up = not {"gate", "up"} & set(self.routed)
        if self.merged_gate_up:
            self.gate_up_proj = MergedColumnParallelLinear(
                hidden, [intermediate] * 2, bias=False, disable_tp=True, prefix=f"{prefix}.gate_up_proj"
            )
            self.act_and_mul = SiluAndMul()
        for name, (in_features, out_features) in shapes.items():
            if name in self.routed:
                setattr(self, f"{name}_proj", ExpertLinear(in_features, out_features, config.num_experts))
                if not config.shared_router:
                    setattr(self, f"{name}_router", router(in_features))
            elif not (self.merged_gate_up and name in ("gate", "up")):
                setattr(
                    self,
                    f"{name}_proj",
                    ReplicatedLinear(in_features, out_features, bias=False, prefix=f"{prefix}.{name}_proj"),
                )

    def _project(
        self, name: str, hidden_states: torch.Tensor, shared_route: tuple[torch.Tensor, torch.Tensor | None] | None
    ) -> torch.Tensor:
        projection = getattr(self, f"{name}_proj")
        if name not in self.routed:
            return projection(hidden_states)[0]
        expert_index, expert_scale = shared_route or getattr(self, f"{name}_router")(hidden_states)
        return projection(hidden_states, expert_index, expert_scale)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shared_route = self.router(hidden_states) if self.router is not None else None
        if self.merged_gate_up:
            intermediate = self.act_and_mul(self.gate_up_proj(hidden_states)[0])
        else:
            gate = self._project("gate", hidden_states, shared_route)
            intermediate = F.silu(gate) * self._project("up", hidden_states, shared_route)
        return self._project("down", intermediate, shared_route)


class PNetLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's LLaMA decoder layer with a `PNetLlamaMLP`."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        config=None,
        attn_layer_type: type[nn.Module] = LlamaAttention,
    ) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=attn_layer_type)
        # The parent built a dense LlamaMLP; it is replaced (as vLLM's own Aria model does) and freed here.
        self.mlp = PNetLlamaMLP(config or vllm_config.model_config.hf_config, prefix=f"{prefix}.mlp")


class PNetLlamaModel(LlamaModel):
    """vLLM's LLaMA body with `PNetLlamaDecoderLayer`s. LLaMA's weight mapper stacks q/k/v into `qkv_proj` and
    gate/up into `gate_up_proj`; the latter only applies when neither gate nor up is routed."""

    def __init__(
        self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = PNetLlamaDecoderLayer
    ):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        if {"gate", "up"} & set(vllm_config.model_config.hf_config.moe_projections):
            stacked = LlamaModel.hf_to_vllm_mapper.orig_to_new_stacked
            self.hf_to_vllm_mapper = WeightsMapper(
                orig_to_new_stacked={k: v for k, v in stacked.items() if v[0] != ".gate_up_proj"}
            )


def check_supported(vllm_config: VllmConfig) -> None:
    """Refuse, before any weight is allocated, what this implementation does not compute as the HF model does."""
    config = vllm_config.model_config.hf_config
    if getattr(config, "expert_capacity_factor", None) is not None:
        raise ValueError(
            f"PNet-LLaMA in vLLM serves dropless routing only (expert_capacity_factor=None); this checkpoint has "
            f"expert_capacity_factor={config.expert_capacity_factor!r}, whose dropped tokens depend on how the "
            "server batches requests. Set it to null in config.json (capacity is a training-time device)."
        )
    if vllm_config.quant_config is not None:
        raise ValueError(
            f"PNet-LLaMA in vLLM does not support quantization (got {vllm_config.model_config.quantization!r}): "
            "the routed expert weights have no quantized kernel here"
        )
    if vllm_config.lora_config is not None:
        raise ValueError("PNet-LLaMA in vLLM does not support LoRA adapters (the routed projections are 3-D experts)")


class PNetLlamaForCausalLM(LlamaForCausalLM):
    """Causal LM: vLLM's `LlamaForCausalLM` with a `PNetLlamaModel`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_supported(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PNetLlamaDecoderLayer)

    def _init_model(
        self, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = PNetLlamaDecoderLayer
    ):
        return PNetLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


# Classifier (e.g. the SST-2 fine-tune): vLLM's adapter adds the `score` head on the last token, as the HF class does.
PNetLlamaForSequenceClassification = as_seq_cls_model(PNetLlamaForCausalLM)
