"""pnet vision model code that travels with checkpoints: GhostNet / ParameterNet (dynamic convolutions), RepConv
GhostNet (Tables 2, 4, 6 of the paper) and PNet-Swin (Swin with a routed MLP, Table 5).

Importing this package registers every class with the transformers Auto API, so
`AutoModelForImageClassification.from_config(AutoConfig.for_model("parameternet"))` works without
`trust_remote_code`; saved folders additionally carry the code (`auto_map`) and load anywhere with
`trust_remote_code=True`. Imports only torch, transformers and this package.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .configuration_parameternet import ParameterNetConfig
from .configuration_pnet_swin import PNetSwinConfig
from .image_processing_parameternet import ParameterNetImageProcessor
from .modeling_parameternet import (
    DynamicConv2d,
    ParameterNetForImageClassification,
    ParameterNetModel,
    ParameterNetPreTrainedModel,
    RepConv2d,
)
from .modeling_pnet_swin import (
    PNetSwinForImageClassification,
    PNetSwinImageClassifierOutput,
    PNetSwinMoEMLP,
    PNetSwinModel,
    PNetSwinPreTrainedModel,
)

AutoConfig.register("parameternet", ParameterNetConfig, exist_ok=True)
AutoModel.register(ParameterNetConfig, ParameterNetModel, exist_ok=True)
AutoModelForImageClassification.register(ParameterNetConfig, ParameterNetForImageClassification, exist_ok=True)
AutoImageProcessor.register(ParameterNetConfig, slow_image_processor_class=ParameterNetImageProcessor, exist_ok=True)

AutoConfig.register("pnet_swin", PNetSwinConfig, exist_ok=True)
AutoModel.register(PNetSwinConfig, PNetSwinModel, exist_ok=True)
AutoModelForImageClassification.register(PNetSwinConfig, PNetSwinForImageClassification, exist_ok=True)
AutoImageProcessor.register(PNetSwinConfig, slow_image_processor_class=ParameterNetImageProcessor, exist_ok=True)

__all__ = [
    "DynamicConv2d",
    "ParameterNetConfig",
    "ParameterNetForImageClassification",
    "ParameterNetImageProcessor",
    "ParameterNetModel",
    "ParameterNetPreTrainedModel",
    "PNetSwinConfig",
    "PNetSwinForImageClassification",
    "PNetSwinImageClassifierOutput",
    "PNetSwinMoEMLP",
    "PNetSwinModel",
    "PNetSwinPreTrainedModel",
    "RepConv2d",
]
