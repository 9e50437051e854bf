"""The tokenizer saved beside a model (`pnet.model_loading.prepare_tokenizer_for_model`) is a standard LLaMA
tokenizer: in a fresh process without this package, with stdin closed, it loads with no custom code and no question.

`AutoTokenizer.from_pretrained(DIR)` (transformers 5.19-5.25) always resolves DIR's config.json first, and a
model type transformers does not know needs the folder's config code for that: it asks, whatever the tokenizer
files say. So the no-code ways are the tokenizer classes themselves, and `AutoTokenizer` takes
`trust_remote_code=True` (which runs only `configuration_pnet_llama.py`) like the model does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM
from pnet.model_loading import prepare_tokenizer_for_model

LLAMA_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizer" / "llama"
TEXT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer") / "final"
    config = PNetLlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, num_experts=2)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER)
    prepare_tokenizer_for_model(tokenizer, config)
    PNetLlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("load", [
    "transformers.LlamaTokenizer.from_pretrained(folder)",
    "transformers.PreTrainedTokenizerFast.from_pretrained(folder)",
    "transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)",
])
def test_saved_tokenizer_loads_without_package_or_question(model_folder, tmp_path, load):
    expected = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER)(TEXT).input_ids
    saved = json.loads((model_folder / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved and saved["pad_token"] == "<unk>" and saved["model_max_length"] == 2048
    script = (
        "import json, sys, transformers\n"
        f"folder = {str(model_folder)!r}\n"
        f"tokenizer = {load}\n"
        "assert not {'pnet', 'pnet_eval', 'modeling_pnet_llama'} & set(sys.modules), 'this package was imported'\n"
        f"print(json.dumps([tokenizer({TEXT!r}).input_ids, tokenizer.pad_token, tokenizer.model_max_length]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.splitlines()[-1]) == [expected, "<unk>", 2048]
    output = run.stdout + run.stderr
    assert "Do you wish to run the custom code" not in output
    assert "model of type" not in output
