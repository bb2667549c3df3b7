"""pmoe: progressive mixture of LoRA experts for continual fine-tuning in the Hugging Face stack.

`import pmoe` registers the `"pmoe"` model type with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, and marks
the classes for remote code, so that `save_pretrained` writes `configuration_pmoe.py` / `modeling_pmoe.py` and an
`auto_map` next to the weights: the checkpoint then loads with `trust_remote_code=True` where pmoe is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_pmoe import PMOE_FORMAT_VERSION, SUPPORTED_DENSE_MODEL_TYPES, PMoEConfig
from .modeling_pmoe import (
    PMoEForCausalLM,
    PMoELinear,
    PMoELoRAExpert,
    PMoEModel,
    PMoEPreTrainedModel,
    PMoERouter,
)
from .metrics import continual_metrics, exact_match
from .trainer_callbacks import PMoEContinualCallback, schedule_from_task_column


__version__ = "0.1.0"

AutoConfig.register(PMoEConfig.model_type, PMoEConfig, exist_ok=True)
AutoModel.register(PMoEConfig, PMoEModel, exist_ok=True)
AutoModelForCausalLM.register(PMoEConfig, PMoEForCausalLM, exist_ok=True)

PMoEConfig.register_for_auto_class()
PMoEModel.register_for_auto_class("AutoModel")
PMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PMOE_FORMAT_VERSION",
    "SUPPORTED_DENSE_MODEL_TYPES",
    "PMoEConfig",
    "PMoEContinualCallback",
    "PMoEForCausalLM",
    "PMoELinear",
    "PMoELoRAExpert",
    "PMoEModel",
    "PMoEPreTrainedModel",
    "PMoERouter",
    "continual_metrics",
    "exact_match",
    "schedule_from_task_column",
    "__version__",
]
