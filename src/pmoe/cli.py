"""The `pmoe` command line (`pmoe --help`): convert, add-expert, info, report and demo.

Every command imports torch / transformers lazily, so `--help` is fast. A user mistake (missing path, not a PMoE
checkpoint, unknown repo id, bad number, unreadable JSON, ...) ends with one line on stderr,
`pmoe <command>: error: <what is wrong>`, and a non-zero exit code (2 for bad arguments, 1 otherwise).
"""

import argparse
import json
import os
import shutil
import sys
import textwrap


# Kept here (not imported from the config module) so that `--help` does not import torch.
CONVERT_ROUTING = ("sequence", "token")
CONVERT_ROUTER_KEYS = ("gaussian", "lda", "learned")
EXPERT_LAYERS = ("deep", "all")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Results files `pmoe report` finds in a folder: `pmoe demo`, examples/run_continual.py, benchmarks/continual.py.
RESULT_FILES = ("demo_results.json", "continual_results.json", "continual.json")
# Files `save_pretrained` writes for the weights: never carried over from the checkpoint being replaced.
WEIGHT_FILE_PREFIXES = ("model.safetensors", "model-", "pytorch_model")


class CommandError(Exception):
    """A user mistake the command reports in one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line (`pmoe convert: error: ... (see pmoe convert --help)`)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    value = parse_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = parse_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def one_line(error: BaseException) -> str:
    if isinstance(error, KeyError):
        return f"missing key {error.args[0]!r}" if error.args else "missing key"
    text = " ".join(str(error).split())
    return text or type(error).__name__


# ----------------------------------------------------------------------------------------------- loading helpers
def looks_like_local_path(source: str) -> bool:
    """A string that cannot be a Hub repo id (`name` or `org/name`), so a missing one is a missing path."""
    return (source.startswith((os.sep, ".", "~")) or source.count("/") > 1 or source.endswith(".json")
            or (os.altsep is not None and os.altsep in source))


def resolve_source(source: str, what: str = "checkpoint") -> None:
    if not os.path.exists(source) and looks_like_local_path(source):
        raise CommandError(f"{source}: no such file or directory")
    if os.path.isfile(source):
        raise CommandError(f"{source} is a file; the {what} must be a folder or a Hub repo id")


def load_config_dict(source: str) -> dict:
    from transformers import PreTrainedConfig

    resolve_source(source)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise CommandError(f"{source} is not a model checkpoint (no config.json)")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(source)
    except OSError as error:
        if os.path.isdir(source):
            raise CommandError(f"{source} is not a model checkpoint (no readable config.json)") from None
        raise CommandError(f"{source} is not a local folder, and no Hub repo of that name was found online or in the "
                           f"cache: {one_line(error)}") from None
    return config_dict


def load_pmoe_config(source: str):
    """The `PMoEConfig` of a PMoE checkpoint (folder or repo id); a clear error for anything else."""
    from .configuration_pmoe import PMoEConfig

    config_dict = load_config_dict(source)
    model_type = config_dict.get("model_type")
    if model_type != PMoEConfig.model_type:
        hint = " (convert it first with `pmoe convert`)" if model_type else ""
        raise CommandError(f"{source} is not a PMoE checkpoint: its config has model_type {model_type!r}{hint}")
    return PMoEConfig.from_pretrained(source)


def pmoe_model_class(config):
    """The PMoE class a checkpoint was saved from (causal LM unless it says sequence classification)."""
    import pmoe

    for name in config.architectures or ():
        if name.startswith("PMoE") and hasattr(pmoe, name):
            return getattr(pmoe, name)
    return pmoe.PMoEForCausalLM


def check_new_output_dir(path: str):
    if os.path.isfile(path):
        raise CommandError(f"{path} is a file; the output must be a new or empty folder")
    if os.path.isdir(path) and os.listdir(path):
        raise CommandError(f"{path} already exists and is not empty; choose a new folder (or remove it first)")


def is_weight_file(name: str) -> bool:
    return name.startswith(WEIGHT_FILE_PREFIXES) and name.endswith((".safetensors", ".bin", ".index.json"))


def carry_files(source_dir: str, staging: str):
    """Copy what `save_pretrained` did not write (tokenizer, README, ...) from the old checkpoint, old weights aside."""
    for name in os.listdir(source_dir):
        source, target = os.path.join(source_dir, name), os.path.join(staging, name)
        if os.path.exists(target) or is_weight_file(name) or (name.startswith(".") and ".tmp-" in name):
            continue
        if os.path.isdir(source):
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)


def copy_tokenizer(source: str, staging: str) -> bool:
    """Save the source's tokenizer into the new checkpoint; False (quietly) when the source has none."""
    from transformers import AutoTokenizer

    if os.path.isdir(source) and not any(
        os.path.exists(os.path.join(source, name))
        for name in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        return False
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer there, or one transformers cannot read
        return False
    tokenizer.save_pretrained(staging)
    return True


def layer_span(indices) -> str:
    indices = list(indices)
    if not indices:
        return "none"
    return str(indices[0]) if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"


# ----------------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import pmoe
    from .checkpointing import atomic_directory
    from .configuration_pmoe import SUPPORTED_DENSE_ARCHITECTURES

    check_new_output_dir(args.output_dir)
    model_type = load_config_dict(args.source).get("model_type")
    if model_type == pmoe.PMoEConfig.model_type:
        raise CommandError(f"{args.source} is already a PMoE checkpoint; grow experts with `pmoe add-expert`")
    if model_type not in SUPPORTED_DENSE_ARCHITECTURES:
        supported = ", ".join(f"{kind} ({name})" for kind, name in SUPPORTED_DENSE_ARCHITECTURES.items())
        raise CommandError(f"cannot convert model_type {model_type!r} from {args.source}; supported: {supported}")
    options = {key: value for key, value in {
        "num_shallow_layers": args.num_shallow_layers, "expert_rank": args.expert_rank,
        "expert_layers": args.expert_layers, "routing": args.routing, "router_keys": args.router_keys,
        "router_top_k": args.router_top_k,
    }.items() if value is not None}
    # Check the options against the source's shape before loading any weights.
    pmoe.PMoEConfig.from_dense_config(AutoConfig.from_pretrained(args.source), **options)

    dense = AutoModelForCausalLM.from_pretrained(args.source, dtype=args.dtype).eval()
    model = pmoe.PMoEForCausalLM.from_dense(dense, **options).eval()
    probe = torch.randint(0, dense.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(input_ids=probe).logits.float() - dense(input_ids=probe).logits.float()).abs().max().item()
    del dense

    with atomic_directory(args.output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer = copy_tokenizer(args.source, staging)

    config = model.config
    layers = config.num_hidden_layers
    print(f"converted {args.source} ({model_type}, {SUPPORTED_DENSE_ARCHITECTURES[model_type]}, {layers} layers, "
          f"{str(model.dtype).replace('torch.', '')}) to PMoE")
    print(f"  layers {layer_span(range(config.num_shallow_layers))} shallow (base weights only), "
          f"{layer_span(config.deep_layer_indices)} deep; experts will go in layers "
          f"{layer_span(config.expert_layer_indices)} (expert_layers={config.expert_layers})")
    print(f"  experts: none yet; rank {config.expert_rank}, alpha {config.expert_alpha:g}, targets "
          f"{', '.join(config.expert_target_modules)}; routing {config.routing}, {config.router_keys} router keys")
    print(f"  max |logit diff| against the dense model on a probe: {difference:.1e}")
    print(f"  tokenizer: {'copied' if tokenizer else 'none found in the source, not copied'}")
    print(f"saved to {args.output_dir} (loads with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)); "
          f"next: pmoe add-expert {args.output_dir} <task>")
    return 0


# ----------------------------------------------------------------------------------------------- add-expert
def cmd_add_expert(args) -> int:
    from .checkpointing import atomic_directory

    config = load_pmoe_config(args.checkpoint)
    local = os.path.isdir(args.checkpoint)
    in_place = args.output_dir is None or (
        local and os.path.realpath(args.output_dir) == os.path.realpath(args.checkpoint)
    )
    if in_place and not local:
        raise CommandError(f"{args.checkpoint} is not a local folder, so it cannot be updated in place; "
                           "pass --output-dir")
    if not in_place:
        check_new_output_dir(args.output_dir)

    model = pmoe_model_class(config).from_pretrained(args.checkpoint, dtype="auto")
    index = model.add_expert(args.task)
    trainable = sum(param.numel() for param in model.expert_parameters(index).values())
    target = os.path.realpath(args.checkpoint) if in_place else args.output_dir
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        if local:
            carry_files(args.checkpoint, staging)
        else:
            copy_tokenizer(args.checkpoint, staging)

    tasks = model.config.expert_tasks
    print(f"added expert {index} for task {args.task!r}: {trainable:,} trainable parameters (rank "
          f"{model.config.expert_rank} LoRA in {len(model.expert_linears())} linears of layers "
          f"{layer_span(model.config.expert_layer_indices)}"
          f"{' and the token embedding' if model.config.expert_embeddings else ''}); untrained, so the model's outputs are unchanged")
    print(f"the model now has {len(tasks)} expert(s): {', '.join(tasks)}")
    print(f"saved {'in place to ' + args.checkpoint if in_place else 'to ' + args.output_dir}; train it with "
          f"Trainer + pmoe.PMoEContinualCallback(tasks=[{args.task!r}]) (the callback reuses the newest expert)")
    return 0


# ----------------------------------------------------------------------------------------------- info
def router_buffer_names(model) -> list[str]:
    from .experts_pmoe import PMoERouter, PMoERouterKey

    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, (PMoERouter, PMoERouterKey)):
            names += [f"{prefix}.{name}" for name, _ in module.named_buffers(recurse=False)]
    return names


def weight_file(source: str, name: str) -> str | None:
    if os.path.isdir(source):
        path = os.path.join(source, name)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file

    return cached_file(source, name, _raise_exceptions_for_missing_entries=False)


def read_tensors(source: str, names: list[str]) -> dict | None:
    """The named tensors from a checkpoint's safetensors files (None when it has none)."""
    from safetensors import safe_open

    from .checkpointing import read_weight_map

    index = weight_file(source, "model.safetensors.index.json")
    if index is not None:
        weight_map = read_weight_map(index)
        if weight_map is None:
            raise CommandError(f"{source}: model.safetensors.index.json does not parse or maps no tensor")
        files = {}
        for name in names:
            if name in weight_map:
                files.setdefault(weight_map[name], []).append(name)
    else:
        single = weight_file(source, "model.safetensors")
        if single is None:
            return None
        files = {"model.safetensors": names}
    tensors = {}
    for filename, wanted in files.items():
        path = weight_file(source, filename)
        if path is None:
            raise CommandError(f"{source}: weight file {filename} is missing")
        try:
            with safe_open(path, framework="pt") as handle:
                present = set(handle.keys())
                tensors.update({name: handle.get_tensor(name) for name in wanted if name in present})
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            raise CommandError(f"{source}: {filename} is truncated or its header is corrupted ({one_line(error)}); "
                               "download or save the checkpoint again") from None
    return tensors


def load_for_info(source: str):
    """The model with its real router statistics and every other tensor on the meta device (no weights read), or a
    full load when the checkpoint has no safetensors."""
    import torch

    config = load_pmoe_config(source)
    model_class = pmoe_model_class(config)
    with torch.device("meta"):
        model = model_class(config)
    names = router_buffer_names(model)
    tensors = read_tensors(source, names)
    if tensors is None:
        return model_class.from_pretrained(source, dtype="auto")
    buffers = dict(model.named_buffers())
    for name in names:  # statistics an older checkpoint lacks are zero, as in a fresh model
        if name not in tensors:
            tensors[name] = torch.zeros(buffers[name].shape, dtype=torch.float32)
        elif tensors[name].shape != buffers[name].shape:
            raise CommandError(
                f"{source}: {name} has shape {list(tensors[name].shape)} in the weights but "
                f"{list(buffers[name].shape)} in a model built from config.json (num_experts={config.num_experts}, "
                f"expert_tasks={config.expert_tasks}): config.json does not match the weights"
            )
    model.load_state_dict(tensors, strict=False, assign=True)
    return model


def checkpoint_summary(source: str) -> dict:
    from .configuration_pmoe import SUPPORTED_DENSE_ARCHITECTURES

    model = load_for_info(source)
    config = model.config
    routers = model.expert_routers()
    usage_per_router = [router.usage.float().tolist() for router in routers]
    usage = model.expert_usage()
    total_usage = float(usage.sum()) if config.num_experts else 0.0
    fitted_keys = config.router_keys != "learned"  # Gaussian or LDA keys count the samples they were fitted on
    steps = list(getattr(config, "expert_train_steps", None) or [])
    dense_type = getattr(config, "dense_model_type", None)
    experts = []
    for index, task in enumerate(config.expert_tasks):
        experts.append({
            "index": index,
            "task": task,
            "trainable_parameters": sum(param.numel() for param in model.expert_parameters(index).values()),
            "train_steps": steps[index] if index < len(steps) else None,
            "usage": float(usage[index]),
            "usage_share": float(usage[index]) / total_usage if total_usage > 0 else None,
            "key_samples": [float(router.experts[index].count) for router in routers] if fitted_keys else None,
        })
    return {
        "checkpoint": source,
        # The versions that wrote config.json (None when not recorded, e.g. pmoe_version by an older pmoe).
        "pmoe_version": getattr(config, "pmoe_version", None),
        "transformers_version": getattr(config, "transformers_version", None),
        "architecture": (config.architectures or [type(model).__name__])[0],
        "base_model_type": dense_type,
        "base_architecture": SUPPORTED_DENSE_ARCHITECTURES.get(dense_type),
        "dtype": str(getattr(config, "dtype", None) or "").replace("torch.", "") or None,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_shallow_layers": config.num_shallow_layers,
        "num_deep_layers": config.num_hidden_layers - config.num_shallow_layers,
        "expert_layers": config.expert_layers,
        "expert_layer_indices": list(config.expert_layer_indices),
        "expert_target_modules": list(config.expert_target_modules),
        "expert_rank": config.expert_rank,
        "expert_alpha": config.expert_alpha,
        "expert_scaling": config.expert_scaling,
        "routing": config.routing,
        "router_keys": config.router_keys,
        "router_activation": config.router_activation,
        # LDA keys: the size of the (projected) feature they are fitted on; each key holds size * size float64 numbers.
        "router_feature_size": getattr(config, "router_feature_size", None) if config.router_keys == "lda" else None,
        "router_top_k": config.router_top_k or None,
        "router_input_layer": config.router_input_layer,
        "num_routers": len(routers),
        # The screens' margin where the model has them (`router_screen_margin`), else None.
        "router_screen_margin": config.router_screen_margin if config.uses_router_screen else None,
        "router_first_layer_screen": config.uses_first_layer_screen,
        "max_experts": config.max_experts,
        "base_parameters": sum(param.numel() for param in model.base_parameters().values()),
        "num_experts": config.num_experts,
        "experts": experts,
        "router": {
            "usage_total": total_usage,
            "usage_per_router": usage_per_router,
            "key_sample_unit": ("tokens" if config.routing == "token" else "sequences") if fitted_keys else None,
        },
    }


def format_info(summary: dict) -> str:
    s = summary
    base = s["base_model_type"]
    shallow = range(s["num_shallow_layers"])
    deep = range(s["num_shallow_layers"], s["num_hidden_layers"])
    top_k = f"top-{s['router_top_k']}" if s["router_top_k"] else "dense (every expert)"
    base_text = f"{base} ({s['base_architecture']})" if base else "not recorded"
    lines = [
        f"PMoE checkpoint {s['checkpoint']} ({s['architecture']}, {s['dtype'] or 'dtype not recorded'})",
        f"  base model      {base_text}",
        f"  saved by        pmoe {s['pmoe_version'] or 'version not recorded'}, "
        f"transformers {s['transformers_version'] or 'version not recorded'}",
        f"  layers          {s['num_hidden_layers']}: {layer_span(shallow)} shallow ({len(shallow)}), "
        f"{layer_span(deep)} deep ({len(deep)}); hidden {s['hidden_size']}, vocab {s['vocab_size']}",
        f"  expert layers   {layer_span(s['expert_layer_indices'])} (expert_layers={s['expert_layers']})",
        f"  targets         {', '.join(s['expert_target_modules'])}",
        f"  LoRA            rank {s['expert_rank']}, alpha {s['expert_alpha']:g} (scale {s['expert_scaling']:g})",
        f"  routing         {s['routing']}, {s['router_keys']} keys"
        + (f" on a {s['router_feature_size']}-dim feature" if s.get("router_feature_size") else "")
        + f", {s['router_activation']}, {top_k}; {s['num_routers']} router(s) reading layer {s['router_input_layer']}"
        + (f"; embedding {'and first-layer screens' if s.get('router_first_layer_screen') else 'screen'} at margin "
           f"{s['router_screen_margin']:g}" if s.get("router_screen_margin") else ""),
        f"  parameters      {s['base_parameters']:,} base"
        + (f"; max experts {s['max_experts']}" if s["max_experts"] else ""),
        "",
    ]
    if not s["experts"]:
        lines.append("experts: none yet (grow one with `pmoe add-expert CHECKPOINT TASK`)")
        return "\n".join(lines)
    unit = s["router"]["key_sample_unit"]
    headers = ["#", "task", "trainable params", "train steps", "usage"] + ([f"key fitted on ({unit})"] if unit else [])
    rows = []
    for expert in s["experts"]:
        share = expert["usage_share"]
        row = [str(expert["index"]), expert["task"], f"{expert['trainable_parameters']:,}",
               "-" if expert["train_steps"] is None else str(expert["train_steps"]),
               "-" if share is None else f"{share:.1%}"]
        if unit:
            row.append(", ".join(f"{count:,.0f}" for count in expert["key_samples"]))
        rows.append(row)
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    lines.append(f"experts ({len(rows)}):")
    for row in [headers, *rows]:
        lines.append("  " + "  ".join(cell.rjust(width) if i != 1 else cell.ljust(width)
                                      for i, (cell, width) in enumerate(zip(row, widths))))
    total = s["router"]["usage_total"]
    lines.append("")
    lines.append(f"router: {total:,.1f} gate mass recorded in training forwards (usage = each expert's share)"
                 if total > 0 else "router: no training forwards recorded yet (usage unknown)")
    if unit:
        unfitted = [str(expert["index"]) for expert in s["experts"] if not any(expert["key_samples"])]
        lines.append(f"Gaussian keys: each expert's key is fitted on its task's training {unit}"
                     + (f"; not fitted yet (not trained): expert {', '.join(unfitted)}" if unfitted else ""))
    return "\n".join(lines)


def cmd_info(args) -> int:
    summary = checkpoint_summary(args.checkpoint)
    print(json.dumps(summary, indent=2) if args.json else format_info(summary))
    return 0


# ----------------------------------------------------------------------------------------------- report
def read_results(path: str) -> dict:
    try:
        with open(path) as handle:
            results = json.load(handle)
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} is not valid JSON: {error}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not a text JSON file") from None
    if not isinstance(results, dict):
        raise CommandError(f"{path}: expected a JSON object at the top level, got {type(results).__name__}")
    return results


def check_matrix(matrix, what: str) -> list[list[float]]:
    if (not isinstance(matrix, list) or not matrix or not all(isinstance(row, list) for row in matrix)
            or any(len(row) != len(matrix) for row in matrix)
            or not all(isinstance(value, (int, float)) for row in matrix for value in row)):
        raise CommandError(f"{what}: the accuracy matrix must be a square list of lists of numbers")
    return [[float(value) for value in row] for row in matrix]


def matrix_panels(results: dict, path: str) -> tuple[list[str], list[tuple[str, list, dict]]]:
    """`(tasks, [(title, matrix, metrics)])` from a `pmoe demo` or run_continual.py results file."""
    from .metrics import continual_metrics

    if isinstance(results.get("methods"), dict):  # pmoe demo
        entries = [(name, method.get("matrix"), method.get("metrics") or {})
                   for name, method in results["methods"].items() if isinstance(method, dict)]
    else:  # examples/run_continual.py
        entries = [(f"accuracy ({results.get('metric', 'score')})", results["accuracy_matrix"], results)]
    if not entries:
        raise CommandError(f"{path}: no methods with an accuracy matrix")
    panels = []
    for name, matrix, metrics in entries:
        matrix = check_matrix(matrix, f"{path}: {name}")
        if not all(key in metrics for key in ("LA", "OP", "BWT")):
            metrics = continual_metrics(matrix)
        panels.append((name, matrix, metrics))
    size = len(panels[0][1])
    tasks = results.get("tasks")
    if not isinstance(tasks, list) or len(tasks) != size:
        tasks = [f"task {index}" for index in range(size)]
    return [str(task) for task in tasks], panels


def report_source(source: str) -> tuple[str, str]:
    """`("json", path)` or `("checkpoint", path or repo id)` for the report's INPUT."""
    if os.path.isfile(source):
        return "json", source
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            return "checkpoint", source
        for name in RESULT_FILES:
            if os.path.isfile(os.path.join(source, name)):
                return "json", os.path.join(source, name)
        raise CommandError(f"{source} is neither a checkpoint (no config.json) nor a folder with a results file "
                           f"({', '.join(RESULT_FILES)})")
    resolve_source(source)
    return "checkpoint", source


def cmd_report(args) -> int:
    from .reporting import accuracy_matrix_figure, method_summary_figure, router_figure, save_figure

    kind, source = report_source(args.input)
    if kind == "checkpoint":
        summary = checkpoint_summary(source)
        if not summary["experts"]:
            raise CommandError(f"{source} has no experts yet: nothing to plot (grow one with `pmoe add-expert`)")
        figure, what = router_figure(summary), "router usage and fitted key sample counts"
    else:
        results = read_results(source)
        try:
            if isinstance(results.get("summary"), dict):  # benchmarks/continual.py, benchmarks/cl_benchmark.py
                summary = results["summary"]
                if not summary or not all(isinstance(value, dict) for value in summary.values()):
                    raise CommandError(f"{source}: `summary` must map each method to its metrics")
                if not any(key in value for value in summary.values() for key in ("LA", "OP", "BWT")):
                    raise CommandError(f"{source}: `summary` holds no LA / OP / BWT (not a continual-learning "
                                       "results file)")
                arguments = results.get("args") if isinstance(results.get("args"), dict) else {}
                figure = method_summary_figure(summary, results.get("tasks"), arguments.get("seeds"),
                                               ylabel="exact match / transfer (%)")
                what = "LA / OP / BWT per method"
            elif isinstance(results.get("methods"), dict) or "accuracy_matrix" in results:
                tasks, panels = matrix_panels(results, source)
                figure = accuracy_matrix_figure(tasks, panels)
                what = f"accuracy matrices of {', '.join(name for name, _, _ in panels)}"
            else:
                raise CommandError(
                    f"{source}: not a results file of `pmoe demo` (`methods`), examples/run_continual.py "
                    "(`accuracy_matrix`) or benchmarks/continual.py / cl_benchmark.py (`summary`)"
                )
        except (KeyError, TypeError, AttributeError) as error:
            raise CommandError(f"{source}: unexpected results format ({type(error).__name__}: {one_line(error)})")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_figure(figure, args.output)
    print(f"wrote {args.output}: {what} from {source}")
    return 0


# ----------------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, steps_per_task=args.steps_per_task, pretrain_steps=args.pretrain_steps,
             seed=args.seed)
    return 0


# ----------------------------------------------------------------------------------------------- parser
def add_command(commands, name, handler, help, description, examples):
    width = min(100, shutil.get_terminal_size().columns - 2)
    parser = commands.add_parser(name, help=help, description=textwrap.fill(description, width),
                                 epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pmoe", description="Progressive mixture of LoRA experts for HF causal LMs.",
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="a typical session:\n"
                           "  pmoe convert path/to/llama my-pmoe          # dense -> PMoE, no experts yet\n"
                           "  pmoe add-expert my-pmoe support-tickets     # grow an expert (or let the Trainer "
                           "callback do it)\n"
                           "  pmoe info my-pmoe                           # layout, experts, router statistics\n"
                           "  pmoe report out/continual_results.json -o results.png\n\n"
                           "Run `pmoe COMMAND --help` for a command's options and examples.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = add_command(
        commands, "convert", cmd_convert, "Convert a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint to PMoE.",
        "Convert a dense Llama, Mistral, Qwen2 or Qwen3 causal LM (a local folder or a Hub repo id) into a PMoE "
        "checkpoint with no experts yet: same weights and same logits as the source (checked on a probe). The "
        "output holds the weights, config.json with auto_map, the remote code (configuration_pmoe.py, "
        "modeling_pmoe.py) and the source's tokenizer when it has one, so it loads with "
        "AutoModelForCausalLM.from_pretrained(OUTPUT_DIR, trust_remote_code=True) where pmoe is not installed.",
        ["pmoe convert path/to/llama my-pmoe",
         "pmoe convert Qwen/Qwen2.5-0.5B qwen-pmoe --num-shallow-layers 12 --expert-rank 16",
         "pmoe convert path/to/mistral mistral-pmoe --expert-layers all --dtype bfloat16"],
    )
    convert.add_argument("source", metavar="SOURCE", help="dense checkpoint: a local folder or a Hub repo id")
    convert.add_argument("output_dir", metavar="OUTPUT_DIR", help="new (or empty) folder for the PMoE checkpoint")
    convert.add_argument("--num-shallow-layers", type=nonnegative_int, metavar="N",
                         help="layers [0, N) keep base weights only (default: half of the layers)")
    convert.add_argument("--expert-rank", type=positive_int, metavar="R", help="LoRA rank of every expert (default: 8)")
    convert.add_argument("--expert-layers", choices=EXPERT_LAYERS,
                         help="experts in the deep layers only (default) or in every layer")
    convert.add_argument("--routing", choices=CONVERT_ROUTING, help="one gate per sequence (default) or per token")
    convert.add_argument("--router-keys", choices=CONVERT_ROUTER_KEYS,
                         help="fitted diagonal Gaussian task keys (default), fitted LDA keys (shared covariance) or keys "
                              "learned by gradient")
    convert.add_argument("--router-top-k", type=nonnegative_int, metavar="K",
                         help="use the K best experts per sequence / token (default: 0, every expert)")
    convert.add_argument("--dtype", choices=DTYPES, default="auto",
                         help="dtype to load and save the weights in (default: auto, the source's)")

    add_expert = add_command(
        commands, "add-expert", cmd_add_expert, "Grow one expert for a new task in a PMoE checkpoint.",
        "Grow one LoRA expert (and its router key) for TASK in a PMoE checkpoint and save it. The new expert is "
        "untrained (its LoRA B is zero), so the model's outputs do not change until it is trained. By default "
        "the checkpoint is updated in place, safely: the new checkpoint is written to a temporary folder next to it, "
        "which then replaces it, so an interruption never leaves a half-written checkpoint. Other files in the "
        "folder (tokenizer, README, ...) are kept.",
        ["pmoe add-expert my-pmoe support-tickets",
         "pmoe add-expert my-pmoe sql --output-dir my-pmoe-sql",
         "pmoe info my-pmoe"],
    )
    add_expert.add_argument("checkpoint", metavar="CHECKPOINT", help="PMoE checkpoint folder (or Hub repo id with "
                                                                    "--output-dir)")
    add_expert.add_argument("task", metavar="TASK", help="name of the new task (must not have an expert yet)")
    add_expert.add_argument("--output-dir", metavar="DIR", help="write to this new folder instead of in place")

    info = add_command(
        commands, "info", cmd_info, "Describe a PMoE checkpoint: layout, experts, router statistics.",
        "Describe a PMoE checkpoint without loading its weights (only the router statistics are read): the base "
        "architecture (when recorded by `pmoe convert`), the pmoe and transformers versions that saved it (as "
        "recorded in config.json), the shallow / deep split, where the experts are, their "
        "targets, rank and alpha, the routing; then one row per expert (task, trainable parameters, training steps, "
        "share of the router's gate mass in training) and, for Gaussian router keys, how many training sequences "
        "(or tokens) each key was fitted on.",
        ["pmoe info my-pmoe", "pmoe info my-pmoe --json | jq '.experts[].task'", "pmoe info user/my-pmoe-repo"],
    )
    info.add_argument("checkpoint", metavar="CHECKPOINT_OR_REPO_ID", help="PMoE checkpoint folder or Hub repo id")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    report = add_command(
        commands, "report", cmd_report, "Plot results JSON (accuracy matrices, benchmark) or a checkpoint's router.",
        "Draw a figure from INPUT. A results JSON of `pmoe demo` (demo_results.json) or of "
        "examples/run_continual.py (continual_results.json) gives accuracy-matrix heatmaps with LA / OP / BWT in the "
        "titles; benchmarks/continual.py's continual.json gives a bar chart of LA / OP / BWT per method (mean ± std "
        "over seeds). A folder holding one of these files works too. A PMoE checkpoint (folder or repo id) gives its "
        "router: each expert's share of the gate mass in training and, for Gaussian keys, the samples each key was "
        "fitted on.",
        ["pmoe report pmoe-demo/demo_results.json --output demo.png",
         "pmoe report out/continual_results.json -o matrix.png",
         "pmoe report benchmarks/results/continual.json -o benchmark.png",
         "pmoe report my-pmoe -o router.png"],
    )
    report.add_argument("input", metavar="INPUT", help="results JSON (or a folder with one), or a PMoE checkpoint")
    report.add_argument("-o", "--output", required=True, metavar="FILE.png", help="figure to write (PNG, or any "
                                                                                  "format matplotlib knows)")

    demo = add_command(
        commands, "demo", cmd_demo,
        "Offline continual-learning demo: PMoE against sequential fine-tuning on built-in tasks.",
        "Pretrain (first run, cached) a small Llama, convert it to PMoE and train four built-in tasks one after "
        "another, against sequential fine-tuning on the same budget; prints both accuracy matrices, writes a figure, "
        "a results JSON and the PMoE model. About 5 minutes on 2 CPU cores.",
        ["pmoe demo", "pmoe demo --steps-per-task 50 --output-dir /tmp/demo"],
    )
    demo.add_argument("--output-dir", default="pmoe-demo", help="Where results, figure and model go (./pmoe-demo).")
    demo.add_argument("--steps-per-task", type=int, default=300, help="Training steps per task (default: 300).")
    demo.add_argument("--pretrain-steps", type=int, default=1500,
                      help="Steps of base-model pretraining on the first run (cached; default: 1500).")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and (args.steps_per_task < 1 or args.pretrain_steps < 1):
        parser.error("--steps-per-task and --pretrain-steps must be >= 1")
    if args.command != "demo":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # stderr keeps only the error line, if any
    try:
        return args.handler(args)
    except (CommandError, OSError, ValueError, KeyError) as error:
        print(f"pmoe {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
