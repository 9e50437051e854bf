"""`pnet-count` and `pnet-card` on invalid configs and files: a clear error naming the file, key and what is
allowed, never a traceback nor a negative parameter count or active above total (issue 20, item 8)."""

import json
import shutil

import pytest

from pnet.counting import count_config, main as pnet_count_main
from pnet_eval import model_card

BAD_VALUES = [
    ("configs/models/pnet-tiny-down-e8.json", "num_experts", 0, "num_experts must be an integer >= 1"),
    ("configs/models/pnet-tiny-down-e8.json", "hidden_size", -64, "hidden_size must be an integer >= 1"),
    ("configs/models/pnet-tiny-down-e8.json", "head_dim", -3, "head_dim=-3 is invalid; allowed: a number >= 1"),
    ("configs/models/llama-1b.json", "num_hidden_layers", -2,
     "num_hidden_layers=-2 is invalid; allowed: a number >= 1"),
    ("configs/vision/parameternet-300m.json", "num_experts", -1, "num_experts=-1 is invalid"),
    ("configs/vision/swin-300m.json", "embed_dim", -24, "embed_dim=-24 is invalid; allowed: a number >= 1"),
    ("configs/vision/swin-300m.json", "depths", [2, 2, -6, 2], r"depths=\[2, 2, -6, 2\] is invalid"),
]


@pytest.mark.parametrize("source,key,value,message", BAD_VALUES)
def test_count_refuses_invalid_config(repo_root, tmp_path, capsys, source, key, value, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**json.loads((repo_root / source).read_text()), key: value}))
    with pytest.raises(ValueError, match=message):
        count_config(str(path))
    with pytest.raises(SystemExit) as exit_info:
        pnet_count_main([str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pnet-count: error: ") and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("content,message", [
    ("model_type: llama\nhidden_size: 64\n", "is not JSON"),
    (b"GGUF\x03\x00\x00\x00\x80\x81 binary", "is not JSON ('utf-8' codec can't decode"),  # the file was not named
    (None, "no config file at"),
])
def test_count_yaml_or_missing_file_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "model.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        pnet_count_main([str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pnet-count: error: ") and message in err and str(path) in err


def test_card_refuses_invalid_config_and_writes_nothing(repo_root, tmp_path, capsys):
    folder = tmp_path / "final"
    folder.mkdir()
    config = json.loads((repo_root / "configs/models/pnet-tiny-down-e8.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": -64}))
    with pytest.raises(SystemExit) as exit_info:
        model_card.main([str(folder)])
    assert exit_info.value.code == 2
    assert "hidden_size must be an integer >= 1" in capsys.readouterr().err
    assert not (folder / "README.md").exists()
    shutil.rmtree(folder)
