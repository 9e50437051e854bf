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
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main([str(tmp_path / "run"), "--output", str(tmp_path / "x.onnx"), "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--batch-size: 0 is invalid; allowed: an integer >= 1" in capsys.readouterr().err


def tiny_config_json(tmp_path) -> str:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, "num_experts": 2}))
    return str(path)


def cli_error(export_onnx, argv, capsys, monkeypatch) -> str:
    """Run the command line expecting a usage error before any model is built; return its error line."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(export_onnx, "load_model", no_model)
    monkeypatch.setattr(export_onnx, "ParameterNetForImageClassification", no_model)
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "error: " in lines[-1]
    return lines[-1]


@pytest.mark.parametrize("exporter, opset, allowed", [("dynamo", 5, "18 to 23"), ("dynamo", 17, "18 to 23"),
                                                      ("torchscript", 6, "7 to 20"), ("torchscript", 21, "7 to 20")])
def test_export_cli_rejects_unsupported_opset(repo_root, tmp_path, capsys, monkeypatch, exporter, opset, allowed):
    """An opset the exporter cannot write is refused before any work (the dynamo exporter used to write opset 18 for
    --opset 5 and report success)."""
    export_onnx = load_script(repo_root)
    output = tmp_path / "m.onnx"
    line = cli_error(export_onnx, [tiny_config_json(tmp_path), "--output", str(output), "--exporter", exporter,
                                   "--opset", str(opset)], capsys, monkeypatch)
    assert f"--opset: opset {opset} is not supported by the {exporter} exporter; allowed: {allowed}" in line
    assert not output.exists()
    with pytest.raises(ValueError, match=f"opset {opset} is not supported"):
        export_onnx.export_onnx(None, str(output), exporter=exporter, opset=opset)


def test_export_onnx_checks_written_opset(repo_root, tmp_path, monkeypatch):
    """A file whose default-domain opset is not the requested one is an error, and is removed."""
    export_onnx = load_script(repo_root)
    model = ParameterNetForImageClassification(ParameterNetConfig(**TINY, num_experts=2)).eval()
    real_export = torch.onnx.export

    def off_by_one(*args, **kwargs):  # an exporter that silently writes another opset than asked
        return real_export(*args, **{**kwargs, "opset_version": kwargs["opset_version"] + 1})

    monkeypatch.setattr(torch.onnx, "export", off_by_one)
    output = tmp_path / "m.onnx"
    with pytest.raises(export_onnx.ExportError, match="wrote opset 18 instead of the requested opset 17"):
        export_onnx.export_onnx(model, str(output), exporter="torchscript", opset=17)
    assert not output.exists()
    monkeypatch.setattr(torch.onnx, "export", real_export)
    path = export_onnx.export_onnx(model, str(output), exporter="torchscript", opset=17)
    assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [17]


@pytest.mark.parametrize("size, allowed", [("0", "an integer >= 1"), ("-16", "an integer >= 1"),
                                           ("3", "an integer >= 4 (the network's total stride")])
def test_export_cli_rejects_bad_image_size(repo_root, tmp_path, capsys, monkeypatch, size, allowed):
    """--image-size 0 used to fall back to the config's size; one below the network's total stride used to surface as
    a TorchExportError traceback."""
    export_onnx = load_script(repo_root)
    line = cli_error(export_onnx, [tiny_config_json(tmp_path), "--output", str(tmp_path / "m.onnx"),
                                   "--image-size", size], capsys, monkeypatch)
    assert "--image-size: " in line and f"{size} is " in line and f"allowed: {allowed}" in line
    model = ParameterNetForImageClassification(ParameterNetConfig(**TINY, num_experts=2)).eval()
    with pytest.raises(ValueError, match=f"image size {size} is too small; allowed: an integer >= 4"):
        export_onnx.export_onnx(model, str(tmp_path / "f.onnx"), image_size=int(size))


def test_export_cli_rejects_bad_paths(repo_root, tmp_path, capsys, monkeypatch):
    """A missing model path, or an --output that is a folder, is a one-line usage error naming it."""
    export_onnx = load_script(repo_root)
    missing = str(tmp_path / "no-such-run")
    line = cli_error(export_onnx, [missing, "--output", str(tmp_path / "m.onnx")], capsys, monkeypatch)
    assert f"argument model: {missing!r} does not exist; allowed: a saved model folder or a config .json" in line
    (tmp_path / "empty").mkdir()
    line = cli_error(export_onnx, [str(tmp_path / "empty"), "--output", str(tmp_path / "m.onnx")], capsys, monkeypatch)
    assert "is a folder without config.json" in line
    folder = tmp_path / "out"
    folder.mkdir()
    line = cli_error(export_onnx, [tiny_config_json(tmp_path), "--output", str(folder)], capsys, monkeypatch)
    assert f"argument --output: {str(folder)!r} is a folder; allowed: the path of an .onnx file to write" in line
    line = cli_error(export_onnx, [tiny_config_json(tmp_path), "--output", str(tmp_path / "tiny.json" / "m.onnx")],
                     capsys, monkeypatch)
    assert "which is a file" in line
