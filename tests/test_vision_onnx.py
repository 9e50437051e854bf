"""ONNX export of a tiny ParameterNet (dynamic convolutions) and parity with onnxruntime."""

import importlib.util

import onnx
import pytest
import torch

from modeling_pnet_llama import ParameterNetConfig, ParameterNetForImageClassification


def load_script(repo_root):
    spec = importlib.util.spec_from_file_location("export_onnx", repo_root / "scripts" / "export_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_parity_tiny_parameternet(repo_root, tmp_path, exporter):
    export_onnx = load_script(repo_root)
    torch.manual_seed(0)
    config = ParameterNetConfig(
        num_channels=1, image_size=16, width_multiplier=0.25, num_experts=3,
        stages=[[[3, 16, 16, 0, 1]], [[3, 48, 24, 0.25, 2]]], feature_channels=32, head_channels=32, num_labels=4,
    )
    model = ParameterNetForImageClassification(config).eval()
    path = export_onnx.export_onnx(model, str(tmp_path / "tiny.onnx"), batch_size=2, exporter=exporter)
    graph = onnx.load(path).graph
    # The dynamic convolutions are grouped convolutions over the folded batch (group = batch * groups).
    groups = [a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert 2 in groups
    diff = export_onnx.onnx_max_abs_diff(model, path, batch_size=2, image_size=16)
    assert diff < 1e-4
