"""pmoe: progressive mixture of LoRA experts for continual fine-tuning in the Hugging Face stack.

`import pmoe` registers the `"pmoe"` model type with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoModelForSequenceClassification`, and marks the classes for remote code, so that `save_pretrained` writes
`configuration_pmoe.py` / `modeling_pmoe.py` (with its siblings `experts_pmoe.py`, `growth_pmoe.py`, `loading_pmoe.py`)
and an `auto_map` next to the weights: the checkpoint then loads with `trust_remote_code=True` where pmoe is not
installed. It also gives the models the Hub methods that are not shipped (`pmoe.hub`: `push_to_hub` with the PMoE
model card, `model_card`, `record_task_scores`).

It also checks the installed transformers against the range pmoe is tested with (`check_transformers_version`) and
warns once when it is outside.
"""

import importlib.metadata
import warnings
from pathlib import Path

import transformers


def tested_transformers_specifier():
    """The transformers versions pmoe is tested with, as a `packaging.specifiers.SpecifierSet`, read from the
    `transformers` requirement of pmoe's installed distribution metadata (pyproject.toml's `dependencies`, the one
    place the range is written); `None` when that metadata is not found (pmoe run from a source tree) or declares no
    transformers requirement."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    try:
        requirements = importlib.metadata.requires("pmoe")
    except importlib.metadata.PackageNotFoundError:
        return None
    specifier, found = SpecifierSet(), False
    for text in requirements or ():
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) != "transformers":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra's requirement, not the install's
        specifier &= requirement.specifier
        found = True
    return specifier if found else None


def format_specifier(specifier) -> str:
    """`>=5.23,<5.25` (lower bounds first) rather than packaging's alphabetical `<5.25,>=5.23`."""
    order = {">": 0, ">=": 0, "~=": 1, "==": 1, "===": 1, "!=": 2, "<=": 3, "<": 3}
    return ",".join(str(spec) for spec in sorted(specifier, key=lambda spec: (order.get(spec.operator, 2), str(spec))))


def check_transformers_version(installed: str | None = None) -> str | None:
    """The warning pmoe gives when transformers `installed` (default: the imported `transformers.__version__`) is
    outside the range pmoe is tested with, or `None` when it is inside, when pmoe's distribution metadata is not
    found (a source tree), or when `installed` is not a version number.

    `import pmoe` calls it and emits the message once as a `UserWarning`. To silence it (knowingly), filter on its
    text before importing pmoe: `warnings.filterwarnings("ignore", message=r"pmoe .* is tested with transformers")`.
    """
    from packaging.version import InvalidVersion, Version

    specifier = tested_transformers_specifier()
    if specifier is None:
        return None
    installed = transformers.__version__ if installed is None else installed
    try:
        if specifier.contains(Version(installed), prereleases=True):
            return None
    except InvalidVersion:
        return None
    tested = f"transformers{format_specifier(specifier)}"
    return (
        f"pmoe {importlib.metadata.version('pmoe')} is tested with {tested}, but transformers {installed} is "
        "installed: pmoe builds on transformers internals (model, config, cache and Trainer APIs) that change between "
        f"minor releases, so it may fail or behave differently. Pin a tested version (pip install '{tested}') or run "
        "pmoe's test suite against it (see README 'Tested versions')."
    )


# Before importing any pmoe module, so that the warning is out even when an untested transformers breaks an import.
_transformers_version_warning = check_transformers_version()
if _transformers_version_warning is not None:
    warnings.warn(_transformers_version_warning, UserWarning, stacklevel=2)
del _transformers_version_warning

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .checkpointing import is_complete_checkpoint, is_complete_save, last_complete_checkpoint, save_pretrained_atomic
from .configuration_pmoe import PMOE_FORMAT_VERSION, PMOE_VERSION, SUPPORTED_DENSE_MODEL_TYPES, PMoEConfig
from .modeling_pmoe import (
    PMoEEmbedding,
    PMoEForCausalLM,
    PMoEForSequenceClassification,
    PMoELinear,
    PMoELoRAExpert,
    PMoEModel,
    PMoEPreTrainedModel,
    PMoERouter,
)
from .hub import add_hub_methods
from .metrics import accuracy, continual_metrics, exact_match, rouge_l
from .peft_interop import export_expert_to_peft, import_peft_adapter
from .trainer_callbacks import PMoEContinualCallback, schedule_from_task_column


# The version of this code (pyproject.toml reads the package version from `configuration_pmoe.PMOE_VERSION`, which
# checkpoints record in config.json as `pmoe_version`).
__version__ = PMOE_VERSION

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


add_hub_methods(PMoEPreTrainedModel)  # model.push_to_hub (PMoE card), model.model_card, model.record_task_scores
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
    "PMOE_VERSION",
    "SUPPORTED_DENSE_MODEL_TYPES",
    "PMoEConfig",
    "PMoEContinualCallback",
    "PMoEEmbedding",
    "PMoEForCausalLM",
    "PMoEForSequenceClassification",
    "PMoELinear",
    "PMoELoRAExpert",
    "PMoEModel",
    "PMoEPreTrainedModel",
    "PMoERouter",
    "accuracy",
    "check_transformers_version",
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
