"""vLLM plugin (entry point `vllm.general_plugins` -> `pnet = pnet.vllm_plugin:register`, see pyproject.toml).

vLLM calls `register()` in every process it starts (API server, engine core, workers). It makes saved PNet-LLaMA
folders servable as they are, with or without `trust_remote_code`:
  * the `pnet_llama` config class is registered with transformers' AutoConfig, so the folder's config.json loads
    without running the folder's code;
  * the architectures in config.json map to pnet's native vLLM model classes (`pnet.vllm_pnet_llama`), imported by
    vLLM only when such a model is loaded.

This module imports nothing from vLLM at import time: pnet is used without vLLM.
"""

from __future__ import annotations

VLLM_MODEL_CLASSES = {
    "PNetLlamaForCausalLM": "pnet.vllm_pnet_llama:PNetLlamaForCausalLM",
    "PNetLlamaForSequenceClassification": "pnet.vllm_pnet_llama:PNetLlamaForSequenceClassification",
}


def register() -> None:
    """Register the PNet-LLaMA config with transformers and its architectures with vLLM's model registry."""
    from vllm import ModelRegistry

    import modeling_pnet_llama  # noqa: F401  (registers PNetLlamaConfig with AutoConfig on import)

    supported = set(ModelRegistry.get_supported_archs())
    for architecture, model_class in VLLM_MODEL_CLASSES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, model_class)
