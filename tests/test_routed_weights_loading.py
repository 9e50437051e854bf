"""`RoutedWeightsLoading` on the vision models (the LLaMA heads are covered in test_modeling_pnet_llama.py and
test_llama_contract.py): a checkpoint without a router or expert weight, or with another `num_experts`, is refused,
where transformers would random-initialise it; a missing plain weight still gets transformers' usual report."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_parameternet import (
    DynamicConv2d,
    ParameterNetConfig,
    ParameterNetForImageClassification,
    PNetSwinConfig,
    PNetSwinForImageClassification,
)
from modeling_parameternet.routed_linear import ExpertLinear, TopOneRouter


def parameternet(**overrides):
    config = dict(num_channels=3, image_size=32, width_multiplier=0.5,
                  stages=[[[3, 16, 16, 0, 1]], [[3, 48, 24, 0.25, 2]]], feature_channels=64, head_channels=64,
                  num_labels=5, num_experts=4)
    return ParameterNetForImageClassification, ParameterNetConfig(**{**config, **overrides})


def pnet_swin(**overrides):
    config = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                  num_labels=5, num_experts=4)
    return PNetSwinForImageClassification, PNetSwinConfig(**{**config, **overrides})


def first_key(model, module_type, parameter="weight") -> str:
    return next(f"{name}.{parameter}" for name, module in model.named_modules() if isinstance(module, module_type))


# (model builder, where its router lives, where its experts live)
FAMILIES = {
    "parameternet": (parameternet, (DynamicConv2d, "routing.weight"), (DynamicConv2d, "weight")),
    "pnet_swin": (pnet_swin, (TopOneRouter, "weight"), (ExpertLinear, "weight")),
}


@pytest.fixture(params=sorted(FAMILIES))
def saved(request, tmp_path):
    build, router, experts = FAMILIES[request.param]
    model_class, config = build()
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(tmp_path / "ok")
    return model, first_key(model, *router), first_key(model, *experts), tmp_path


def save_without(model, weights: dict, key: str, folder) -> None:
    model.save_pretrained(folder)
    save_file({k: v for k, v in weights.items() if k != key}, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_router_or_expert_weight_is_refused_naming_it(saved):
    model, router_key, experts_key, tmp_path = saved
    weights = load_file(tmp_path / "ok" / "model.safetensors")
    assert router_key in weights and experts_key in weights
    for key in (router_key, experts_key):
        save_without(model, weights, key, tmp_path / "partial")
        refusal = rf"refusing to random-initialise routers or experts\. Missing: \['{key}'\]"
        with pytest.raises(ValueError, match=refusal):
            type(model).from_pretrained(tmp_path / "partial")


def test_another_num_experts_is_refused(saved):
    model, router_key, experts_key, tmp_path = saved
    # transformers raises on the size mismatch itself unless told to ignore it; told so, it would random-initialise.
    with pytest.raises((RuntimeError, ValueError), match="mismatch"):
        type(model).from_pretrained(tmp_path / "ok", num_experts=2)
    with pytest.raises(ValueError, match=r"\(num_experts=2\b.*Missing: \[\]; mismatched: \['[^']+: checkpoint \(4[,)]"):
        type(model).from_pretrained(tmp_path / "ok", num_experts=2, ignore_mismatched_sizes=True)


def test_complete_checkpoint_loads_and_missing_plain_weight_gets_the_usual_report(saved):
    model, router_key, experts_key, tmp_path = saved
    loaded, info = type(model).from_pretrained(tmp_path / "ok", output_loading_info=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)
    assert not info["missing_keys"]

    weights = load_file(tmp_path / "ok" / "model.safetensors")
    save_without(model, weights, "classifier.weight", tmp_path / "no-head")
    _, info = type(model).from_pretrained(tmp_path / "no-head", output_loading_info=True)
    assert "classifier.weight" in info["missing_keys"]
