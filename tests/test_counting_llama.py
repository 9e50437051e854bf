"""Parameter / FLOPs arithmetic of LLaMA and PNet-LLaMA (paper Table 7) checked against instantiated models."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM
from pnet.counting import count_config, main
from pnet.llama_counting import count_llama

# The paper's Table 7 (0.94B / 1.54B / 2.35B), exact for bias-free experts and one Linear(in, E) router each.
TABLE7_PARAMS = {
    "llama-1b": 936_429_568,
    "pnet-1b-gate-e4": 1_540_507_648,
    "pnet-1b-up-e4": 1_540_507_648,
    "pnet-1b-down-e4": 1_540_802_560,
    "pnet-1b-gate-e8": 2_345_912_320,
    "pnet-1b-up-e8": 2_345_912_320,
    "pnet-1b-down-e8": 2_346_502_144,
}
DENSE_FLOPS_512 = 917_512_388_608  # 2 x MACs of a 512-token forward incl. lm_head and attention scores ("919G")


def _model_from_dict(config: dict) -> torch.nn.Module:
    if config["model_type"] == "llama":
        return LlamaForCausalLM(LlamaConfig(**config))
    return PNetLlamaForCausalLM(PNetLlamaConfig(**config))


def _active_numel(model: torch.nn.Module) -> int:
    """Parameters one token uses: every parameter, but only one expert of each routed projection."""
    total = 0
    for name, param in model.named_parameters():
        total += param[0].numel() if name.endswith("_proj.weight") and param.dim() == 3 else param.numel()
    return total


@pytest.mark.parametrize("name", sorted(TABLE7_PARAMS))
def test_table7_counts_match_paper_and_meta_model(repo_root, name):
    path = repo_root / "configs" / "models" / f"{name}.json"
    report = count_config(str(path))
    assert report.name == name
    assert report.total_params == TABLE7_PARAMS[name]
    assert report.flops == DENSE_FLOPS_512  # equal FLOPs across all rows
    config = json.loads(path.read_text())
    with torch.device("meta"):
        model = _model_from_dict(config)
    assert sum(p.numel() for p in model.parameters()) == report.total_params
    assert _active_numel(model) == report.active_params
    if config["model_type"] == "llama":
        assert report.details["router_flops"] == 0
        assert report.active_params == report.total_params
    else:
        (projection,) = config["moe_projections"]
        in_features = config["intermediate_size"] if projection == "down" else config["hidden_size"]
        routers = config["num_hidden_layers"] * in_features * config["num_experts"]
        assert report.details["router_params"] == routers
        assert report.details["router_flops"] == 2 * 512 * routers
        assert report.active_params == TABLE7_PARAMS["llama-1b"] + routers


@pytest.mark.parametrize("name", ["llama-tiny", "pnet-tiny-gate-e8", "pnet-tiny-up-e8", "pnet-tiny-down-e8"])
def test_tiny_cpu_configs_load_through_auto_config_and_count(repo_root, name):
    import modeling_pnet_llama  # noqa: F401  (registers pnet_llama with the Auto API)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((repo_root / "configs" / "models" / f"{name}.json").read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    report = count_llama(config, name=name)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.active_params == _active_numel(model)
    assert report.flops == count_llama({**config, "model_type": "llama"}).flops  # same FLOPs as the dense model


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_type": "llama"},
        {"model_type": "llama", "tie_word_embeddings": True, "num_key_value_heads": 2, "attention_bias": True},
        {"model_type": "pnet_llama", "num_experts": 3, "moe_projections": ["gate", "down"]},
        {"model_type": "pnet_llama", "num_experts": 4, "moe_projections": ["gate", "up", "down"],
         "shared_router": True},
        {"model_type": "pnet_llama", "num_experts": 1, "moe_projections": ["up"], "num_key_value_heads": 2},
    ],
)
def test_count_matches_real_tiny_models(overrides):
    config = {
        "vocab_size": 101,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **overrides,
    }
    report = count_llama(config, name="tiny", seq_len=16)
    model = _model_from_dict(config)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.active_params == _active_numel(model)
    # FLOPs by hand: per token 2*(q,k,v,o + 3 FFN projections + lm_head), plus 2*2*S^2*hidden per layer.
    kv = 32 // 4 * config.get("num_key_value_heads", 4)
    token_macs = 2 * (32 * 32 * 2 + 2 * 32 * kv + 3 * 32 * 48) + 32 * 101
    assert report.flops == 2 * (16 * token_macs + 2 * 2 * 16 * 16 * 32)


def test_count_rejects_unknown_model_type():
    with pytest.raises(ValueError, match="model_type"):
        count_llama({"model_type": "gpt2"})


def test_pnet_count_cli_prints_counts(repo_root, capsys):
    main([str(repo_root / "configs" / "models" / "pnet-1b-up-e8.json"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["total_params"] == TABLE7_PARAMS["pnet-1b-up-e8"]
    assert printed["flops"] == DENSE_FLOPS_512
