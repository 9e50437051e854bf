"""Exact parameter and FLOPs counts of the paper's vision models (Tables 2, 4 and 6) from the real model."""

import json

import pytest
import torch

from pnet.counting import count_config, main as pnet_count_main
from pnet.vision_counting import build_meta_model, count_parameternet

# (config file, exact params, exact FLOPs, paper params in M, paper FLOPs in M)
PAPER_MODELS = [
    ("ghostnet-300m", 8_633_106, 288_704_676, 8.63, 288.7),
    ("parameternet-300m", 15_737_100, 298_151_088, 15.74, 298.2),
    ("ghostnet-600m", 19_822_198, 579_187_700, 19.82, 579.2),
    ("parameternet-600m", 34_504_504, 598_722_768, 34.50, 598.7),
]


@pytest.mark.parametrize("name,params,flops,paper_params_m,paper_flops_m", PAPER_MODELS)
def test_paper_models_exact(repo_root, name, params, flops, paper_params_m, paper_flops_m):
    report = count_config(str(repo_root / "configs" / "vision" / f"{name}.json"))
    assert report.total_params == params
    assert report.flops == flops
    assert round(report.total_params / 1e6, 2) == paper_params_m
    assert round(report.flops / 1e6, 1) == paper_flops_m


@pytest.mark.parametrize("num_experts,paper_params_m", [(1, 8.6), (2, 11.0), (4, 15.7), (8, 25.2)])
def test_expert_sweep_table4(repo_root, num_experts, paper_params_m):
    config = json.loads((repo_root / "configs/vision/parameternet-300m.json").read_text())
    report = count_parameternet({**config, "num_experts": num_experts})
    assert round(report.total_params / 1e6, 1) == paper_params_m
    # FLOPs grow only by the kernel-mixing and routing overhead.
    base = count_parameternet({**config, "num_experts": 1})
    overhead = report.details["flops_dynamic_mixing"] + report.details["flops_dynamic_routing"]
    assert report.flops - base.flops == overhead
    if num_experts > 1:
        assert report.details["flops_dynamic_mixing"] == report.details["expert_params"]


def test_ghostnet_1x_sanity():
    """GhostNet-v1 at width 1.0: the published 5.18M parameters and 141.7M multiply-adds (no BatchNorm term)."""
    report = count_parameternet({"width_multiplier": 1.0, "num_experts": 1, "num_labels": 1000})
    assert report.total_params == 5_182_508
    assert round(report.details["multiply_adds"] / 1e6, 1) == 141.7


def test_meta_count_matches_real_model():
    config = {"width_multiplier": 0.35, "num_experts": 3, "num_labels": 7, "image_size": 64}
    report = count_parameternet(config)
    from modeling_parameternet import ParameterNetConfig, ParameterNetForImageClassification

    real = ParameterNetForImageClassification(ParameterNetConfig(**config))
    assert report.total_params == sum(p.numel() for p in real.parameters())
    assert build_meta_model(config).config.num_experts == 3


def test_pnet_count_cli(repo_root, capsys):
    pnet_count_main([str(repo_root / "configs/vision/parameternet-600m.json")])
    out = capsys.readouterr().out
    assert "34,504,504" in out and "598,722,768" in out and "(598.72M)" in out


def test_repconv_table6_exact(repo_root):
    """RepConv GhostNet-300M (Table 6): 15.7M training parameters, 8.6M inference parameters, 289M FLOPs; its
    inference form is a GhostNet-300M, so its FLOPs are exactly GhostNet-300M's."""
    report = count_config(str(repo_root / "configs/vision/repconv-ghostnet-300m.json"))
    assert report.total_params == 15_748_032 and round(report.total_params / 1e6, 1) == 15.7
    assert report.details["inference_params"] == 8_617_150 and round(report.details["inference_params"] / 1e6, 1) == 8.6
    assert report.flops == 288_704_676 == PAPER_MODELS[0][2] and round(report.flops / 1e6) == 289
    # Training runs four conv + BatchNorm branches per convolution: the training FLOPs are not the inference FLOPs.
    assert report.details["training_flops"] > 3 * report.flops


def test_reparameterized_counts_equal_flops_and_fewer_params(repo_root):
    """Folding a BatchNorm into its convolution keeps one op per output element (the bias add) and one parameter per
    channel (the bias) instead of two."""
    config = json.loads((repo_root / "configs/vision/parameternet-300m.json").read_text())
    trained = count_parameternet(config)
    folded = count_parameternet({**config, "reparameterized": True})
    assert folded.flops == trained.flops == 298_151_088
    norms = [m for m in build_meta_model(config).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert trained.total_params - folded.total_params == sum(m.num_features for m in norms)


def test_fmnist_trap_models_at_equal_flops(repo_root):
    """The three models of the low-FLOPs trap experiment at Fashion-MNIST scale (28x28): GhostNet, ParameterNet (E=4,
    narrower to keep FLOPs) and RepConv, FLOPs within 3% of each other."""
    reports = {name: count_config(str(repo_root / f"configs/vision/fmnist-{name}.json"))
               for name in ("ghostnet", "parameternet", "repconv")}
    assert {k: (r.total_params, r.flops) for k, r in reports.items()} == {
        "ghostnet": (315_706, 1_307_176), "parameternet": (478_886, 1_342_680), "repconv": (619_330, 1_307_176)}
    assert reports["repconv"].details["inference_params"] == 313_394
    assert max(r.flops for r in reports.values()) / min(r.flops for r in reports.values()) < 1.03


def test_pnet_count_cli_repconv(repo_root, capsys):
    pnet_count_main([str(repo_root / "configs/vision/repconv-ghostnet-300m.json")])
    out = capsys.readouterr().out
    assert "15,748,032" in out and "inference_params" in out and "8,617,150" in out and "288,704,676" in out
