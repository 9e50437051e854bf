"""pnet-import-gguf: a LLaMA GGUF file becomes a plain HF folder that computes what the GGUF-loaded model computes.

The GGUF files are built here from a tiny random LLaMA with the `gguf` package's writer, laid out as llama.cpp's
converter writes them (its tensor names, query/key rows permuted for its rotary layout, a byte-level BPE vocabulary):
no download.
"""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pnet.gguf_import import main

gguf = pytest.importorskip("gguf")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "e r", "o n", "Ġ c", "Ġc a", "p i", "Ġca pi", "t a", "Ġcapi ta", "Ġcapita l"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["The capital of France is Paris.", "  spaces, tabs\tand ünïcödé ✓ 123", "<|im_start|>user\nhi<|im_end|>"]


def vocabulary() -> tuple[list[str], list[int]]:
    """Byte-level BPE tokens (GPT-2's byte alphabet, then one token per merge, then special tokens) and their GGUF
    token types (1 normal, 3 control)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIAL[:1] + list(bytes_to_unicode().values()) + ["".join(m.split()) for m in MERGES] + SPECIAL[1:]
    types = [3] + [1] * (len(tokens) - len(SPECIAL)) + [3, 3]
    return tokens, types


def llama_cpp_rotary_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores the query/key rows of each head interleaved (its rotary layout); the GGUF reader undoes it."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_llama_gguf(path, architecture: str = "llama") -> LlamaForCausalLM:
    tokens, types = vocabulary()
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("Tiny Llama Test")
    writer.add_license("apache-2.0")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: a GGUF without output.weight
        data = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = llama_cpp_rotary_permute(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_rotary_permute(data, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "source" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    return path, write_llama_gguf(path)


def test_converted_folder_equals_the_gguf_model(tiny_gguf, tmp_path, capsys):
    path, original = tiny_gguf
    main([str(path), str(tmp_path / "hf")])
    assert "max |logit difference| to the GGUF-loaded model on a probe batch: 0.00e+00" in capsys.readouterr().out
    folder = tmp_path / "hf"
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "README.md"} <= {p.name for p in folder.iterdir()}
    assert not (tmp_path / "hf.tmp").exists()
    config = json.loads((folder / "config.json").read_text())
    assert not {"quantization_config", "_model_name_or_path"} & set(config) and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (2, 32, 2)
    card = (folder / "README.md").read_text()
    assert "tiny-llama.F32.gguf" in card and "license: apache-2.0" in card

    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert type(converted) is LlamaForCausalLM and converted.config.tie_word_embeddings
    ids = torch.randint(0, original.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = converted(ids).logits
        assert torch.equal(logits, from_gguf(ids).logits)
        # F32 tensors: the round trip through llama.cpp's layout gives back the model written.
        torch.testing.assert_close(logits, original(ids).logits, rtol=0, atol=1e-5)


def test_tokenizer_round_trip(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    main([str(path), str(tmp_path / "hf")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == from_gguf(text).input_ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the capital").input_ids) == ["Ġthe", "Ġcapital"]
    assert tokenizer("<|im_end|>").input_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|endoftext|>")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_converted_folder_is_accepted_by_pnets_own_tools(tiny_gguf, tmp_path):
    """transformers' GGUF loader sets `unk_token_id` on the config, a key LlamaConfig does not define; written to
    config.json it made `pnet-count` refuse the folder and `pnet-upcycle` fail at its last step (the model card counts
    the upcycled config). The importer writes only the keys LlamaConfig knows; the tokenizer keeps its unk token."""
    from pnet.counting import count_config

    path, original = tiny_gguf
    main([str(path), str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "unk_token_id" not in config
    report = count_config(str(tmp_path / "hf"))
    assert report.total_params == sum(p.numel() for p in original.parameters())
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").unk_token == "<|endoftext|>"


def test_refuses_another_architecture(tmp_path, capsys):
    path = tmp_path / "gpt2.gguf"
    write_llama_gguf(path, architecture="gpt2")
    with pytest.raises(SystemExit) as error:
        main([str(path), str(tmp_path / "hf")])
    assert error.value.code == 2
    assert f"{path}: general.architecture is 'gpt2'; pnet-import-gguf converts 'llama' models only" in \
        capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_refuses_a_corrupt_or_missing_file(damage, tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    if damage == "garbage":
        path.write_bytes(b"not a gguf file at all" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.unlink()
    with pytest.raises(SystemExit) as error:
        main([str(path), str(tmp_path / "hf")])
    assert error.value.code == 2
    expected = "no such file" if damage == "missing" else "not a readable GGUF file"
    assert f"{path}: {expected}" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_refuses_an_existing_output_and_one_that_holds_the_input(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main([str(path), str(tmp_path / "hf")])
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(path), str(path.parent), "--overwrite"])
    assert "holds the input file tiny-llama.F32.gguf" in capsys.readouterr().err
    assert path.is_file() and (tmp_path / "hf" / "keep.txt").is_file()


def test_an_output_tmp_folder_that_pnet_did_not_leave_is_never_deleted(tiny_gguf, tmp_path, capsys, monkeypatch):
    """OUT_DIR is written as OUT_DIR.tmp, then renamed. A OUT_DIR.tmp holding the user's notes, or the input file
    itself, used to be deleted without a word (the input: the command then failed, and the GGUF file was gone)."""
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the output folder was checked")

    path, _ = tiny_gguf
    inside = tmp_path / "m.tmp" / path.name
    inside.parent.mkdir()
    inside.write_bytes(path.read_bytes())
    (tmp_path / "o.tmp").mkdir()
    (tmp_path / "o.tmp" / "notes.txt").write_text("precious")
    (tmp_path / "afile").write_text("x")
    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
        for gguf, out, message in ((inside, tmp_path / "m", "m.tmp exists and was not left by an interrupted pnet run"),
                                   (path, tmp_path / "o", "o.tmp exists and was not left by an interrupted pnet run"),
                                   (path, tmp_path / "afile", "afile is a file; allowed: a folder to write")):
            with pytest.raises(SystemExit):
                main([str(gguf), str(out), "--overwrite"])
            assert message in capsys.readouterr().err
    assert inside.is_file() and (tmp_path / "o.tmp" / "notes.txt").read_text() == "precious"
    # A OUT_DIR.tmp left by an interrupted run (marked) is replaced, and the marker is not published.
    (tmp_path / "m2.tmp").mkdir()
    (tmp_path / "m2.tmp" / ".pnet-partial").touch()
    (tmp_path / "m2.tmp" / "model.safetensors").write_bytes(b"half written")
    main([str(path), str(tmp_path / "m2")])
    assert not (tmp_path / "m2.tmp").exists() and (tmp_path / "m2" / "config.json").is_file()
    assert not (tmp_path / "m2" / ".pnet-partial").exists()
