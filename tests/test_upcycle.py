"""pnet-upcycle: a dense LLaMA folder becomes a Hub-ready PNet-LLaMA folder that computes the same function."""

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pnet.upcycle import main

TINY = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)


@pytest.fixture
def dense_dir(tmp_path, repo_root):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp_path / "dense")
    for file in (repo_root / "data" / "tokenizer" / "llama").iterdir():
        if file.suffix in (".json", ".model"):
            shutil.copy(file, tmp_path / "dense" / file.name)
    return tmp_path / "dense"


def test_upcycled_folder_is_hub_ready_and_keeps_the_dense_function(dense_dir, tmp_path, capsys):
    main([str(dense_dir), str(tmp_path / "pnet"), "--num-experts", "4", "--projections", "up", "down"])
    assert "max |logit difference|" in capsys.readouterr().out
    folder = tmp_path / "pnet"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_pnet_llama.py", "configuration_pnet_llama.py",
            "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not (tmp_path / "pnet.tmp").exists()
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["moe_projections"]) == ("pnet_llama", 4, ["up", "down"])
    assert config["expert_output_scaling"] == "straight_through" and "AutoModelForCausalLM" in config["auto_map"]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 256 and "local_files_only" not in tokenizer_config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is not None and config["pad_token_id"] == tokenizer.pad_token_id
    assert "parameternet" in (folder / "README.md").read_text()

    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    upcycled = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(upcycled).__name__ == "PNetLlamaForCausalLM"
    assert sum(p.numel() for p in upcycled.parameters()) > sum(p.numel() for p in dense.parameters())
    batch = tokenizer(["The experts start as copies", "of the dense projection."], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(upcycled(**batch).logits, dense(**batch).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--num-experts", "0"], "--num-experts must be >= 1, got 0"),
    (["--projections", "ffn"], r"--projections must be distinct names from \['gate', 'up', 'down'\], got \['ffn'\]"),
])
def test_bad_arguments_fail_before_reading_weights(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main([str(tmp_path / "does-not-exist"), str(tmp_path / "out"), *args])
    assert error.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_llama_folder_and_an_existing_output(dense_dir, tmp_path, capsys):
    main([str(dense_dir), str(tmp_path / "pnet"), "--num-experts", "2"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pnet"), str(tmp_path / "again"), "--num-experts", "2"])
    assert "model_type 'pnet_llama'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(dense_dir), str(tmp_path / "pnet"), "--num-experts", "2"])
    assert "exists and is not empty" in capsys.readouterr().err
