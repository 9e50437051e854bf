"""pnet model code that travels with checkpoints: PNet-LLaMA.

Importing this package registers every class with the transformers Auto API, so `AutoConfig.for_model("pnet_llama")`
and `AutoModelForCausalLM.from_config(...)` work without `trust_remote_code`; saved folders additionally carry the code
(`auto_map`) and load anywhere with `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_pnet_llama import PNetLlamaConfig
from .modeling_pnet_llama import (
    PNetCausalLMOutputWithPast,
    PNetLlamaForCausalLM,
    PNetLlamaForSequenceClassification,
    PNetLlamaModel,
    PNetLlamaPreTrainedModel,
    PNetSequenceClassifierOutputWithPast,
)

AutoConfig.register("pnet_llama", PNetLlamaConfig, exist_ok=True)
AutoModel.register(PNetLlamaConfig, PNetLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(PNetLlamaConfig, PNetLlamaForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(PNetLlamaConfig, PNetLlamaForSequenceClassification, exist_ok=True)

__all__ = [
    "PNetCausalLMOutputWithPast",
    "PNetLlamaConfig",
    "PNetLlamaForCausalLM",
    "PNetLlamaForSequenceClassification",
    "PNetLlamaModel",
    "PNetLlamaPreTrainedModel",
    "PNetSequenceClassifierOutputWithPast",
]
