"""Parameters and forward FLOPs of LLaMA / PNet-LLaMA configs: the arithmetic behind the paper's Table 7.

FLOPs convention (`FLOPS_CONVENTION`): 2 x multiply-accumulates of one forward pass over a `seq_len`-token sequence
(default 512), counting every matmul: q/k/v/o, the FFN projections (one expert per token per routed projection),
the lm_head on every position, and the attention scores QK^T and weights x V over the full seq_len x seq_len square
(no causal halving). Norms, activations, softmax, rotary and embedding lookups are not counted. The routers' FLOPs
(2 x in_features x num_experts per token per router) are reported separately in `details["router_flops"]` so the
headline FLOPs are equal across all Table-7 rows. This gives 917.5G for LLaMA-1B, the paper's "919G".

Active parameters: the parameters one token uses, i.e. the dense parameters with one expert per routed projection,
plus the routers.
"""

from __future__ import annotations

from pnet.count_report import CountReport


DEFAULT_SEQ_LEN = 512
FLOPS_CONVENTION = (
    "2 x multiply-accumulates of one forward over a {seq_len}-token sequence: all matmuls incl. lm_head on every "
    "position and attention scores QK^T and AV over the full {seq_len}x{seq_len} square; norms/activations/softmax "
    "not counted; router FLOPs excluded (see router_flops)"
)
_LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}
_PNET_DEFAULTS = {"num_experts": 8, "moe_projections": ["down"], "shared_router": False}


def _get(config: dict, key: str, defaults: dict):
    value = config.get(key)
    return defaults[key] if value is None else value


def _ffn_and_router_params(projections: dict[str, tuple[int, int]], routed: list[str], num_experts: int,
                           shared_router: bool, mlp_bias: bool, hidden: int) -> tuple[int, int]:
    """Per layer: the FFN's parameters (every expert of a routed projection) and the routers' parameters."""
    ffn_params = router_params = 0
    for proj, (in_features, out_features) in projections.items():
        if proj in routed:
            ffn_params += num_experts * in_features * out_features
            if not shared_router:
                router_params += in_features * num_experts
        else:
            ffn_params += in_features * out_features + (out_features if mlp_bias else 0)
    if shared_router and routed:
        router_params += hidden * num_experts
    return ffn_params, router_params


def count_llama(config: dict, name: str = "model", seq_len: int = DEFAULT_SEQ_LEN) -> CountReport:
    """Exact parameter count, active parameters and forward FLOPs of a `llama` or `pnet_llama` config dict.

    Mirrors `LlamaForCausalLM` / `PNetLlamaForCausalLM` module by module (the tests check it against
    `sum(p.numel())` of instantiated models).
    """
    model_type = config.get("model_type")
    if model_type not in ("llama", "pnet_llama"):
        raise ValueError(f"count_llama counts model_type 'llama' or 'pnet_llama', got {model_type!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len!r}")
    vocab = _get(config, "vocab_size", _LLAMA_DEFAULTS)
    hidden = _get(config, "hidden_size", _LLAMA_DEFAULTS)
    inter = _get(config, "intermediate_size", _LLAMA_DEFAULTS)
    layers = _get(config, "num_hidden_layers", _LLAMA_DEFAULTS)
    heads = _get(config, "num_attention_heads", _LLAMA_DEFAULTS)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    tied = _get(config, "tie_word_embeddings", _LLAMA_DEFAULTS)
    attention_bias = _get(config, "attention_bias", _LLAMA_DEFAULTS)
    mlp_bias = _get(config, "mlp_bias", _LLAMA_DEFAULTS)

    if model_type == "pnet_llama":
        num_experts = _get(config, "num_experts", _PNET_DEFAULTS)
        routed = list(_get(config, "moe_projections", _PNET_DEFAULTS))
        shared_router = _get(config, "shared_router", _PNET_DEFAULTS)
    else:
        num_experts, routed, shared_router = 1, [], False

    # Attention: q and o are heads*head_dim wide, k and v kv_heads*head_dim.
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attn_macs = hidden * q_out + 2 * hidden * kv_out + q_out * hidden  # per token
    attn_params = attn_macs + (q_out + 2 * kv_out + hidden if attention_bias else 0)  # + q, k, v, o biases

    projections = {"gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
    ffn_macs = sum(i * o for i, o in projections.values())  # per token, one expert per routed projection
    ffn_params, router_params = _ffn_and_router_params(projections, routed, num_experts, shared_router, mlp_bias,
                                                       hidden)
    norm_params = 2 * hidden

    layer_params = attn_params + ffn_params + router_params + norm_params
    embed_params = vocab * hidden
    head_params = 0 if tied else vocab * hidden
    total = embed_params + head_params + layers * layer_params + hidden

    inactive_per_layer = sum(
        (num_experts - 1) * projections[proj][0] * projections[proj][1] for proj in routed
    )
    active = total - layers * inactive_per_layer

    # Per-sequence MACs: projections and lm_head per token; attention scores + weighted values per layer.
    token_macs = layers * (attn_macs + ffn_macs) + hidden * vocab
    score_macs = layers * 2 * seq_len * seq_len * heads * head_dim
    flops = 2 * (seq_len * token_macs + score_macs)
    router_flops = 2 * seq_len * layers * router_params

    details: dict[str, int | float | str] = {
        "seq_len": seq_len,
        "router_flops": router_flops,
        "flops+routers": flops + router_flops,
        "router_params": layers * router_params,
        "expert_params": layers * sum(num_experts * projections[p][0] * projections[p][1] for p in routed),
        "embed_params": embed_params + head_params,
    }
    if routed:
        router_kind = " (shared router)" if shared_router else ""
        details["routed"] = f"{'+'.join(routed)} x {num_experts} experts{router_kind}"
    return CountReport(
        name=name,
        model_type=model_type,
        total_params=total,
        active_params=active,
        flops=flops,
        flops_convention=FLOPS_CONVENTION.format(seq_len=seq_len),
        details=details,
    )
