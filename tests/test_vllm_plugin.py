"""pnet's vLLM plugin, as far as it concerns installs without vLLM (its behaviour under vLLM: tests_vllm/)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import modeling_pnet_llama
from pnet import vllm_plugin

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_is_declared():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"pnet": "pnet.vllm_plugin:register"}


def test_registers_the_model_architectures():
    """Every HF head that a saved folder names in `architectures` maps to pnet's vLLM class of the same name."""
    assert set(vllm_plugin.VLLM_MODEL_CLASSES) == {"PNetLlamaForCausalLM", "PNetLlamaForSequenceClassification"}
    for architecture, target in vllm_plugin.VLLM_MODEL_CLASSES.items():
        assert hasattr(modeling_pnet_llama, architecture)
        assert target == f"pnet.vllm_pnet_llama:{architecture}"


def test_importing_pnet_and_the_plugin_loads_no_vllm():
    """pnet is used without vLLM: here (no vLLM installed) a module-level vLLM import would fail the import itself;
    beside vLLM it would show in sys.modules."""
    code = "import sys, pnet, pnet.vllm_plugin; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
