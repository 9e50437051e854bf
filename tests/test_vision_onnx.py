"""ONNX export of tiny ParameterNet / RepConv models (dynamic convolutions, reparameterized) and parity with
onnxruntime."""

import importlib.util
import json

import onnx
import pytest
import torch
from vision_helpers import randomize_batch_norms

from modeling_parameternet import ParameterNetConfig, ParameterNetForImageClassification

TINY = dict(
    num_channels=1, image_size=16, width_multiplier=0.25, stages=[[[3, 16, 16, 0, 1]], [[3, 48, 24, 0.25, 2]]],
    feature_channels=32, head_channels=32, num_labels=4,
)


def load_script(repo_root):
    spec = importlib.util.spec_from_file_location("export_onnx", repo_root / "scripts" / "export_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_like_eval(model: ParameterNetForImageClassification) -> ParameterNetForImageClassification:
    return randomize_batch_norms(model).eval()


def op_types(path) -> list[str]:
    return [node.op_type for node in onnx.load(path).graph.node]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_parity_tiny_parameternet(repo_root, tmp_path, exporter):
    export_onnx = load_script(repo_root)
    torch.manual_seed(0)
    model = trained_like_eval(ParameterNetForImageClassification(ParameterNetConfig(**TINY, num_experts=3)))
    path = export_onnx.export_onnx(model.reparameterize(), str(tmp_path / "tiny.onnx"), batch_size=2, exporter=exporter)
    graph = onnx.load(path).graph
    # The dynamic convolutions are grouped convolutions over the folded batch (group = batch * groups).
    groups = [a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert 2 in groups
    # Reparameterized: no BatchNormalization left for onnxruntime to run after a runtime-weight convolution.
    assert "BatchNormalization" not in op_types(path)
    diff, scale = export_onnx.onnx_logits_diff(model, path, batch_size=2, image_size=16)
    assert scale > 0.1  # the comparison is not between near-zero logits
    assert diff < 1e-4 * scale


def test_onnx_batch_one_and_repconv(repo_root, tmp_path):
    export_onnx = load_script(repo_root)
    torch.manual_seed(0)
    for name, overrides in (("pnet", {"num_experts": 4}), ("repconv", {"num_experts": 1, "num_branches": 4})):
        model = trained_like_eval(ParameterNetForImageClassification(ParameterNetConfig(**TINY, **overrides)))
        path = export_onnx.export_onnx(model.reparameterize(), str(tmp_path / f"{name}.onnx"), 1, exporter="torchscript")
        diff, scale = export_onnx.onnx_logits_diff(model, path, batch_size=1, image_size=16)
        assert diff < 1e-4 * scale, name
        assert "BatchNormalization" not in op_types(path)
    # The merged RepConv graph has one Conv per merged convolution: as many as the GhostNet it equals.
    ghostnet = ParameterNetForImageClassification(ParameterNetConfig(**TINY, num_experts=1)).eval()
    ghost_path = export_onnx.export_onnx(ghostnet, str(tmp_path / "ghost.onnx"), 1, exporter="torchscript")
    assert op_types(path).count("Conv") == op_types(ghost_path).count("Conv")


def test_export_cli_on_saved_folder(repo_root, tmp_path, capsys):
    """The command line: a saved RepConv folder loads with the installed classes (no folder code runs), its inference
    form is exported and checked against the folder's model as trained."""
    export_onnx = load_script(repo_root)
    torch.manual_seed(0)
    model = trained_like_eval(ParameterNetForImageClassification(ParameterNetConfig(**TINY, num_experts=1, num_branches=4)))
    model.save_pretrained(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_branches"] == 4
    status = export_onnx.main([str(tmp_path / "run"), "--output", str(tmp_path / "m.onnx"), "--exporter", "torchscript"])
    out = capsys.readouterr().out
    assert status == 0 and "reparameterized=True" in out and " OK" in out
    with pytest.raises(ValueError, match="--batch-size 0 is invalid"):
        export_onnx.main([str(tmp_path / "run"), "--output", str(tmp_path / "x.onnx"), "--batch-size", "0"])
