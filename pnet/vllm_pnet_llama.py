"""PNet-LLaMA as a native vLLM model: vLLM's LLaMA (paged attention, fused RMSNorm, rotary, sampler) with the FFN
replaced by `PNetLlamaMLP`, whose routed projections are top-1 routed over `num_experts` experts.

Imported by vLLM only (lazily, through the registration in `pnet.vllm_plugin`); it imports vLLM at module level.

The router and the experts are the HF model's own (`modeling_pnet_llama/routed_linear.py`): one implementation of
the routed projection. Every shape depends only on the number of tokens in the batch and, on the grouped_mm path,
nothing reads a device value on the host (tokens are sorted by expert with argsort + searchsorted), so it runs under
vLLM's torch.compile (traced once with a dynamic token dimension) and inside CUDA graphs. The routed matmul is a vLLM
custom op, opaque to the compiler and run eagerly inside, because inductor's fake-tensor `grouped_mm` rejects fp32 on
the CPU. On CUDA the experts run in bfloat16, grouped_mm's dtype there (`check_supported`).
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
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from modeling_pnet_llama.routed_linear import ExpertLinear, RouterOutput, TopOneRouter, routed_matmul

PROJECTIONS = ("gate", "up", "down")


# ----------------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------------


def _routed_matmul_fake(hidden_states: torch.Tensor, weight: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape[0], weight.shape[1])


direct_register_custom_op("pnet_routed_matmul", routed_matmul, fake_impl=_routed_matmul_fake)


class VllmExpertLinear(ExpertLinear):
    """The HF model's experts, their routed matmul called as the vLLM custom op above."""

    matmul = staticmethod(torch.ops.vllm.pnet_routed_matmul)


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

        def router(in_features: int) -> TopOneRouter:  # no jitter: inference
            return TopOneRouter(in_features, config.num_experts, expert_output_scaling=config.expert_output_scaling)

        self.router = router(hidden) if config.shared_router else None
        self.merged_gate_up = not {"gate", "up"} & set(self.routed)
        if self.merged_gate_up:
            self.gate_up_proj = MergedColumnParallelLinear(
                hidden, [intermediate] * 2, bias=False, disable_tp=True, prefix=f"{prefix}.gate_up_proj"
            )
            self.act_and_mul = SiluAndMul()
        for name, (in_features, out_features) in shapes.items():
            if name in self.routed:
                setattr(self, f"{name}_proj", VllmExpertLinear(in_features, out_features, config.num_experts))
                if not config.shared_router:
                    setattr(self, f"{name}_router", router(in_features))
            elif not (self.merged_gate_up and name in ("gate", "up")):
                setattr(
                    self,
                    f"{name}_proj",
                    ReplicatedLinear(in_features, out_features, bias=False, prefix=f"{prefix}.{name}_proj"),
                )

    def _project(self, name: str, hidden_states: torch.Tensor, shared_route: RouterOutput | None) -> torch.Tensor:
        projection = getattr(self, f"{name}_proj")
        if name not in self.routed:
            return projection(hidden_states)[0]
        route = shared_route or getattr(self, f"{name}_router")(hidden_states)
        return projection(hidden_states, route.expert_index, route.expert_scale)

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
    if current_platform.is_cuda() and vllm_config.model_config.dtype != torch.bfloat16:
        raise ValueError(
            f"PNet-LLaMA in vLLM runs its experts in bfloat16 on CUDA (the dtype of torch's grouped matmul kernel); "
            f"got dtype={vllm_config.model_config.dtype}: serve with --dtype bfloat16"
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
