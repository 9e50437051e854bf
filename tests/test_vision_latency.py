"""bench/vision_latency.py --routing-ablation: the ablated ParameterNet copies compute what they claim to."""

import pytest
import torch
from test_vision_onnx import TINY
from vision_helpers import randomize_batch_norms

from modeling_parameternet import ParameterNetConfig, ParameterNetForImageClassification
from modeling_parameternet.modeling_parameternet import DynamicConv2d


@pytest.fixture
def vision_latency(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    import vision_latency

    return vision_latency


@pytest.mark.parametrize("pool", [False, True])
def test_routing_ablation_mixes_with_fixed_coefficients_on_a_copy(vision_latency, monkeypatch, pool):
    torch.manual_seed(0)
    model = randomize_batch_norms(ParameterNetForImageClassification(ParameterNetConfig(**TINY))).eval()
    model = model.reparameterize()
    pixel_values = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        routed = model(pixel_values).logits
        ablated = vision_latency.with_fixed_routing(model, pool=pool)(pixel_values).logits
        assert model(pixel_values).logits.equal(routed)  # the original keeps its routing
        monkeypatch.setattr(
            DynamicConv2d, "routing_weights",
            lambda self, hidden_states: torch.full((1, self.num_experts), 1.0 / self.num_experts),
        )
        uniform = model(pixel_values).logits
    assert sum(isinstance(m, DynamicConv2d) for m in model.modules()) > 0
    torch.testing.assert_close(ablated, uniform, rtol=0, atol=0)
    assert not torch.allclose(ablated, routed, atol=1e-4)  # the ablation did change the routing
