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


class _RecordingModelRegistry:
    """vLLM's `ModelRegistry` API as `register()` uses it (`get_supported_archs`, `register_model`), recording calls.
    The real registry is exercised in tests_vllm/ (vLLM is not installed here)."""

    def __init__(self, supported=()):
        self.models = dict.fromkeys(supported, "vllm-builtin")

    def get_supported_archs(self):
        return list(self.models)

    def register_model(self, architecture, model_class):
        assert architecture not in self.models, f"{architecture} registered twice"
        self.models[architecture] = model_class


def test_register_maps_each_architecture_and_the_config(monkeypatch):
    """`register()` maps each PNet architecture to its lazy `module:Class` target, leaves vLLM's own models alone,
    is idempotent (vLLM calls it in every process it starts) and makes `pnet_llama` a known AutoConfig type."""
    import types

    from transformers import AutoConfig

    registry = _RecordingModelRegistry(supported=["LlamaForCausalLM"])
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(ModelRegistry=registry))
    vllm_plugin.register()
    assert registry.models == {"LlamaForCausalLM": "vllm-builtin", **vllm_plugin.VLLM_MODEL_CLASSES}
    vllm_plugin.register()  # a second process-level call registers nothing twice
    assert len(registry.models) == 3
    assert type(AutoConfig.for_model("pnet_llama")) is modeling_pnet_llama.PNetLlamaConfig
