"""PNetLlamaConfig validation (issue 11, defect 3): sizes of zero are rejected at construction, and attributes set after
construction are validated too (a config that skips validation reaches the model and the saved config.json).

Written by the training-toolkit work; the fix belongs to modeling_pnet_llama/configuration_pnet_llama.py. Every bad
value raises ValueError naming the field and the value, like the construction-time checks already do."""

import pytest
from transformers import AutoConfig

from modeling_pnet_llama import PNetLlamaConfig

TINY = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64, "num_experts": 4}


@pytest.mark.parametrize("field", ["vocab_size", "num_hidden_layers", "hidden_size", "intermediate_size"])
def test_sizes_of_zero_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        PNetLlamaConfig(**{**TINY, field: 0})
    with pytest.raises(ValueError, match=field):  # the path pnet.pretrain and model files take
        AutoConfig.for_model("pnet_llama", **{**TINY, field: 0})


@pytest.mark.parametrize("field,value", [
    ("num_experts", 0),
    ("vocab_size", 0),
    ("num_hidden_layers", 0),
    ("router_jitter_noise", 2.0),
    ("router_aux_loss_coef", -1.0),
    ("moe_projections", ["ffn"]),
    ("expert_output_scaling", "sometimes"),
])
def test_assignment_after_construction_is_validated(field, value):
    config = PNetLlamaConfig(**TINY)
    before = getattr(config, field)
    with pytest.raises(ValueError, match=field):
        setattr(config, field, value)
    assert getattr(config, field) == before  # the bad value is not kept


def test_valid_assignment_still_works():
    config = PNetLlamaConfig(**TINY)
    config.num_experts = 8
    config.router_aux_loss_coef = 0.1
    config.moe_projections = ["up", "gate"]
    assert (config.num_experts, config.router_aux_loss_coef, config.moe_projections) == (8, 0.1, ["gate", "up"])
