"""pmoe: progressive mixture of LoRA experts for continual fine-tuning in the Hugging Face stack.

`import pmoe` registers the `"pmoe"` model type with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoModelForSequenceClassification`, and marks the classes for remote code, so that `save_pretrained` writes
`configuration_pmoe.py` / `modeling_pmoe.py` and an `auto_map` next to the weights: the checkpoint then loads with
`trust_remote_code=True` where pmoe is not installed.
"""

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .checkpointing import is_complete_checkpoint, is_complete_save, last_complete_checkpoint, save_pretrained_atomic
from .configuration_pmoe import PMOE_FORMAT_VERSION, SUPPORTED_DENSE_MODEL_TYPES, PMoEConfig
from .modeling_pmoe import (
    PMoEForCausalLM,
    PMoEForSequenceClassification,
    PMoELinear,
    PMoELoRAExpert,
    PMoEModel,
    PMoEPreTrainedModel,
    PMoERouter,
)
from .metrics import accuracy, continual_metrics, exact_match, rouge_l
from .peft_interop import export_expert_to_peft, import_peft_adapter
from .trainer_callbacks import PMoEContinualCallback, schedule_from_task_column


__version__ = "0.1.0"

_EVALUATE_MODULES = Path(__file__).resolve().parent / "evaluate_modules"


def evaluate_module_path(name: str) -> str:
    """Absolute directory of one of the `evaluate` metric modules shipped with pmoe, for `evaluate.load`, which then
    needs no network: `evaluate.load(pmoe.evaluate_module_path("continual_learning"))`.

    The modules (`accuracy`, `continual_learning`, `exact_match`, `rouge_l`) call the functions of `pmoe.metrics`.
    """
    available = sorted(
        entry.name for entry in _EVALUATE_MODULES.iterdir() if (entry / f"{entry.name}.py").is_file()
    )
    if name not in available:
        raise ValueError(f"Unknown pmoe evaluate module {name!r}; available: {', '.join(available)}.")
    return str(_EVALUATE_MODULES / name)


AutoConfig.register(PMoEConfig.model_type, PMoEConfig, exist_ok=True)
AutoModel.register(PMoEConfig, PMoEModel, exist_ok=True)
AutoModelForCausalLM.register(PMoEConfig, PMoEForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(PMoEConfig, PMoEForSequenceClassification, exist_ok=True)

PMoEConfig.register_for_auto_class()
PMoEModel.register_for_auto_class("AutoModel")
PMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PMoEForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "PMOE_FORMAT_VERSION",
    "SUPPORTED_DENSE_MODEL_TYPES",
    "PMoEConfig",
    "PMoEContinualCallback",
    "PMoEForCausalLM",
    "PMoEForSequenceClassification",
    "PMoELinear",
    "PMoELoRAExpert",
    "PMoEModel",
    "PMoEPreTrainedModel",
    "PMoERouter",
    "accuracy",
    "continual_metrics",
    "evaluate_module_path",
    "exact_match",
    "export_expert_to_peft",
    "import_peft_adapter",
    "is_complete_checkpoint",
    "is_complete_save",
    "last_complete_checkpoint",
    "rouge_l",
    "save_pretrained_atomic",
    "schedule_from_task_column",
    "__version__",
]
