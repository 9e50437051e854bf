"""pnet-upcycle: a dense LLaMA folder becomes a Hub-ready PNet-LLaMA folder that computes the same function."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import pnet.upcycle as upcycle_module
from pnet.upcycle import upcycle_llama
from pnet_eval.upcycle_command import main

TINY = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)


def tiny_dense(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@pytest.mark.parametrize(
    "num_experts, projections", [(2, ["down"]), (4, ["gate"]), (8, ["up"]), (3, ["gate", "up", "down"])]
)
def test_upcycling_preserves_function(num_experts, projections):
    dense = tiny_dense(seed=num_experts)
    model = upcycle_llama(dense, num_experts=num_experts, moe_projections=projections).eval()
    assert model.config.expert_output_scaling == "straight_through"
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    out = model(input_ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, dense(input_ids).logits, rtol=0, atol=1e-4)
    # The routers are live: tokens spread over several experts, and every router gets gradient.
    assert len(set(torch.cat(out.router_logits).argmax(-1).tolist())) > 1
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        if "router" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_upcycling_from_a_saved_folder(tmp_path):
    dense = tiny_dense(seed=7)
    dense.save_pretrained(tmp_path / "dense")
    model = upcycle_llama(str(tmp_path / "dense"), num_experts=2, moe_projections=["down"]).eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (1, 7))
    torch.testing.assert_close(model(input_ids).logits, dense(input_ids).logits, rtol=0, atol=1e-4)


def test_upcycling_takes_config_overrides_over_its_defaults():
    """`expert_output_scaling` given explicitly replaces the straight-through default (Switch's p-scaled output:
    the dense function no longer holds at step 0); other PNet fields pass through."""
    dense = tiny_dense(seed=3)
    model = upcycle_llama(dense, num_experts=4, moe_projections=["up"], expert_output_scaling="router_prob",
                          shared_router=True, router_aux_loss_coef=0.1).eval()
    config = model.config
    settings = (config.expert_output_scaling, config.shared_router, config.router_aux_loss_coef)
    assert settings == ("router_prob", True, 0.1)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    assert (model(input_ids).logits - dense(input_ids).logits).abs().max() > 1e-3


@pytest.fixture
def dense_dir(tmp_path, repo_root):
    tiny_dense(seed=0).save_pretrained(tmp_path / "dense")
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
    card = (folder / "README.md").read_text()
    assert "parameternet" in card
    # named as published, not after the folder it was written in (pnet.tmp): title, model_name, usage snippet
    assert "# pnet\n" in card and "model_name: pnet\n" in card and 'repo = "pnet"' in card and ".tmp" not in card

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


def test_help_and_argument_errors_import_no_model_code(tmp_path):
    """`pnet-upcycle --help` answered without importing torch / transformers / the model (it took 5.8 s)."""
    code = ("import sys; from pnet_eval.upcycle_command import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'modeling_pnet_llama') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--perturb-fraction" in result.stdout and "--shared-router" in result.stdout


def test_names_match_the_model_config():
    from modeling_pnet_llama.configuration_pnet_llama import EXPERT_OUTPUT_SCALINGS, MOE_PROJECTION_NAMES

    assert (upcycle_module.MOE_PROJECTION_NAMES, upcycle_module.EXPERT_OUTPUT_SCALINGS) == (
        tuple(MOE_PROJECTION_NAMES), tuple(EXPERT_OUTPUT_SCALINGS))


def test_refuses_to_overwrite_the_dense_input(dense_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in dense_dir.iterdir()}
    for out in (dense_dir, dense_dir.parent):
        with pytest.raises(SystemExit) as error:
            main([str(dense_dir), str(out), "--num-experts", "2", "--overwrite"])
        assert error.value.code == 2
        assert f"{out} is, or holds, the dense input model {dense_dir}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in dense_dir.iterdir()} == before


@pytest.mark.parametrize("name", ["ABSOLUTE", "models/not-converted-yet", "./missing", "a/b/c"])
def test_a_missing_folder_fails_at_once_without_asking_the_hub(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    name = str(tmp_path / "missing") if name == "ABSOLUTE" else name

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", no_hub)
    with pytest.raises(SystemExit) as error:
        main([name, str(tmp_path / "out")])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert f"{name}: no such folder (expected a dense LLaMA folder or a Hub id owner/name)" in err
    assert len(err.splitlines()) <= 6  # usage lines + the one error line


def test_shared_router_and_drop_upcycling_perturbation(dense_dir, tmp_path):
    args = ["--num-experts", "4", "--projections", "gate", "up", "down", "--shared-router",
            "--perturb-fraction", "0.25", "--seed", "3"]
    main([str(dense_dir), str(tmp_path / "a"), *args])
    main([str(dense_dir), str(tmp_path / "b"), *args])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["shared_router"] is True and config["moe_projections"] == ["gate", "up", "down"]
    record = json.loads((tmp_path / "a" / upcycle_module.UPCYCLING_FILE).read_text())
    assert (record["dense_model"], record["num_experts"], record["perturb_fraction"], record["seed"]) == (
        "dense", 4, 0.25, 3)
    assert record["max_logit_difference_before_perturbation"] < 1e-4 < record["max_logit_difference"]
    assert record["perturbed_values"] == 2 * 4 * 3 * 16 * 32  # layers x experts x projections x dims x hidden

    dense = LlamaForCausalLM.from_pretrained(dense_dir).state_dict()
    weights = load_file(tmp_path / "a" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in load_file(tmp_path / "b" / "model.safetensors").items())
    for layer in range(2):
        key = f"model.layers.{layer}.mlp.{{}}_proj.weight"
        changed = {}
        for projection in ("gate", "up", "down"):
            experts, original = weights[key.format(projection)], dense[key.format(projection)]
            axis = 1 if projection == "down" else 0  # intermediate dimensions: rows of gate/up, columns of down
            differs = (experts != original).any(dim=2 - axis if axis == 0 else 1)
            for expert in range(4):
                dims = differs[expert].nonzero().flatten().tolist()
                assert len(dims) == 16  # round(0.25 * intermediate_size 64)
                changed.setdefault(expert, []).append(dims)
            fresh = experts[0].index_select(axis, torch.tensor(changed[0][-1]))
            assert abs(fresh.std().item() / original.std().item() - 1) < 0.25  # statistics-matched
        for expert, dims in changed.items():
            assert dims[0] == dims[1] == dims[2]  # expert e of gate, up and down: one FFN expert
        assert len({tuple(dims[0]) for dims in changed.values()}) == 4  # each expert its own dimensions
    card = (tmp_path / "a" / "README.md").read_text()
    assert "Upcycled from the dense LLaMA **dense** by `pnet-upcycle`" in card
    assert "Drop-Upcycling" in card and "25% of the intermediate dimensions" in card and "upcycled" in card


def test_the_folder_writer_leaves_the_card_to_its_caller(dense_dir, tmp_path):
    """`pnet.upcycle.upcycle` writes no card itself (the card writer is in pnet_eval, a layer above); `write_card`
    runs on the complete folder before it is published."""
    upcycle_module.upcycle(str(dense_dir), tmp_path / "plain", 2, ["down"])
    assert "config.json" in {p.name for p in (tmp_path / "plain").iterdir()}
    assert not (tmp_path / "plain" / "README.md").exists()
    seen = []

    def record(folder, name):
        seen.append((folder.name, name, (folder / "model.safetensors").is_file(), (folder / "upcycling.json").is_file()))
        (folder / "README.md").write_text("card")

    upcycle_module.upcycle(str(dense_dir), tmp_path / "carded", 2, ["down"], write_card=record)
    assert seen == [("carded.tmp", "carded", True, True)]
    assert (tmp_path / "carded" / "README.md").read_text() == "card"


@pytest.mark.parametrize("fraction", ["-0.1", "1.5"])
def test_bad_perturb_fraction(fraction, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "does-not-exist"), str(tmp_path / "out"), "--perturb-fraction", fraction])
    assert f"--perturb-fraction must lie in [0, 1], got {float(fraction)}" in capsys.readouterr().err


def test_a_second_upcycle_into_the_same_folder_refuses_at_once(dense_dir, tmp_path, capsys, monkeypatch):
    """Two pnet-upcycle runs writing one OUT_DIR share its `.tmp` sibling; the second now refuses before reading."""
    from pnet.run_lock import exclusive_output

    def no_read(*args, **kwargs):
        raise AssertionError("the dense model was read")

    monkeypatch.setattr(upcycle_module, "load_dense_config", no_read)
    out = tmp_path / "pnet"
    with exclusive_output(out, lock_path=tmp_path / ".pnet.pnet-upcycle.lock"):
        with pytest.raises(SystemExit) as error:
            main([str(dense_dir), str(out), "--num-experts", "2"])
    assert error.value.code == 2
    assert f"output folder {out} is in use by another run (pid " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no OUT_DIR, no .tmp, the lock released


def test_a_dense_config_key_pnet_does_not_know_fails_before_reading_weights(dense_dir, tmp_path, monkeypatch, capsys):
    """A SmolLM2 folder from pnet-import-gguf before its fix carries `unk_token_id`, which LlamaConfig does not
    define. The upcycled config inherits it, and the model card's config check refused it after every weight had been
    copied (minutes for the real model). Now refused first, naming the file, the key and the remedy."""
    config_path = dense_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "unk_token_id": 0}))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    with pytest.raises(SystemExit) as error:
        main([str(dense_dir), str(tmp_path / "out"), "--num-experts", "2"])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert f"{config_path}: unknown key(s) ['unk_token_id']" in err
    assert "remove them from the file" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
