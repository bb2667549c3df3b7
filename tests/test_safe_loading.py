"""Safe loading: weights only through safetensors, remote-code files that hold model code only, and no code from a
checkpoint's `auto_map` run unless the caller passes `trust_remote_code=True` (pmoe itself never does)."""

import ast
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import pmoe
from pmoe import PMoEForCausalLM

from helpers import REMOTE_CODE_FILES, make_pmoe, randomize_experts


PACKAGE = Path(pmoe.__file__).parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_pmoe(num_experts=2, expert_tasks=["sql", "chat"])
    randomize_experts(model)
    folder = tmp_path_factory.mktemp("safe") / "checkpoint"
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def checkpoint(saved, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    return folder


# ------------------------------------------------------------------------------------------- safetensors only
def test_save_pretrained_writes_only_safetensors(tmp_path):
    model = make_pmoe(num_experts=1, expert_tasks=["a"])
    model.save_pretrained(tmp_path / "default")
    model.save_pretrained(tmp_path / "explicit", safe_serialization=True)
    for folder in ("default", "explicit"):
        files = {path.name for path in (tmp_path / folder).iterdir()}
        assert "model.safetensors" in files
        assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for name in files), files


def test_save_pretrained_refuses_pickle(tmp_path):
    # transformers 5 dropped `safe_serialization` and would ignore it silently; pmoe says no instead.
    with pytest.raises(ValueError, match=r"pmoe saves weights only as safetensors \(model\.safetensors\): "
                                         r"safe_serialization=False is not supported"):
        make_pmoe().save_pretrained(tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists()


class RunsOnUnpickle:
    """A pickle that creates a marker file when it is loaded, as a malicious `pytorch_model.bin` would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


@pytest.fixture
def pickle_checkpoint(checkpoint, tmp_path):
    """The checkpoint with its weights in `pytorch_model.bin` only; that file runs code if unpickled."""
    marker = tmp_path / "unpickled"
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": RunsOnUnpickle(marker)}))
    return checkpoint, marker


NO_SAFETENSORS = (r"No safetensors weights in .*: pmoe loads weights only from model\.safetensors \(or "
                  r"model\.safetensors\.index\.json and its shards\) and refuses pickle files such as "
                  r"pytorch_model\.bin, which can run code when loaded")


@pytest.mark.parametrize("loader", [PMoEForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained,
                                    AutoModel.from_pretrained], ids=["PMoEForCausalLM", "AutoModelForCausalLM",
                                                                     "AutoModel"])
def test_a_pickle_only_checkpoint_is_refused(pickle_checkpoint, loader):
    folder, marker = pickle_checkpoint
    with pytest.raises(OSError, match=NO_SAFETENSORS):
        loader(folder)
    with pytest.raises(OSError, match=NO_SAFETENSORS):
        loader(folder, use_safetensors=None)
    with pytest.raises(ValueError, match=r"pmoe loads weights only from safetensors: use_safetensors=False is not "
                                         r"supported, because pickle files \(pytorch_model\.bin\) can run code"):
        loader(folder, use_safetensors=False)
    assert not marker.exists()


def test_a_pickle_file_path_is_refused(pickle_checkpoint, saved):
    folder, marker = pickle_checkpoint
    config = AutoConfig.from_pretrained(saved)
    with pytest.raises(ValueError, match=r"pmoe loads weights only from safetensors, and .*pytorch_model\.bin' is "
                                         r"not a \.safetensors file"):
        PMoEForCausalLM.from_pretrained(folder / "pytorch_model.bin", config=config)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- remote-code audit
# The remote-code files are copied into every checkpoint and run by whoever loads it with trust_remote_code=True.
# They must hold model code only. Modules they may not import (nor any submodule of them):
FORBIDDEN_MODULES = {
    "subprocess", "socket", "ssl", "urllib", "requests", "http", "httpx", "aiohttp", "ftplib", "smtplib", "telnetlib",
    "webbrowser", "shutil", "pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "ctypes", "cffi",
    "importlib", "imp", "runpy", "multiprocessing", "pty", "signal", "sys", "builtins", "io", "pathlib", "glob",
    "huggingface_hub", "transformers.dynamic_module_utils",
}
# Names they may not call.
FORBIDDEN_CALLS = {"open", "exec", "eval", "compile", "__import__", "breakpoint", "input", "globals", "locals", "vars"}
# Attribute calls that delete, rename, execute or deserialise, whatever object they are called on.
FORBIDDEN_METHODS = {
    "system", "popen", "remove", "unlink", "rename", "rmdir", "removedirs", "rmtree", "chmod",
    "chown", "spawn", "spawnv", "execv", "execve", "fork", "kill", "urlopen", "loads", "load_file",
}
# Dotted names they may not use at all: pickle-based torch loading and torch.hub's code download.
FORBIDDEN_CHAINS = ("torch.load", "torch.save", "torch.hub", "torch.package", "torch.jit.load", "torch.serialization")
# `os` is imported by modeling_pmoe.py and loading_pmoe.py; every use of it must be one of these audited ones:
# (file, dotted name) -> functions allowed to use it, and why.
ALLOWED_OS_USES = {
    ("modeling_pmoe.py", "os.PathLike"): {"from_dense"},  # isinstance checks of path arguments
    ("loading_pmoe.py", "os.PathLike"): {"load_from_safetensors"},
    # a read-only check that refuses a single weights file that is not .safetensors.
    ("loading_pmoe.py", "os.path.isfile"): {"load_from_safetensors"},
}
ALLOWED_IMPORTS = {
    "modeling_pmoe.py": {
        "contextlib", "copy", "inspect", "os", "dataclasses", "collections.abc", "torch", "transformers",
    },
    "configuration_pmoe.py": {"copy", "transformers"},
    "experts_pmoe.py": {"math", "collections.abc", "torch", "transformers"},
    "growth_pmoe.py": {"collections.abc", "torch"},
    "loading_pmoe.py": {"os", "collections.abc"},
}
# transformers.utils.hub (network) is never imported by the shipped code: push_to_hub and the model card live in the
# installed package (pmoe.hub), which is not shipped.
ALLOWED_HUB_IMPORTS = set()


class Audit(ast.NodeVisitor):
    def __init__(self, filename):
        self.filename = filename
        self.functions = []
        self.problems = []
        self.os_uses = []

    def problem(self, node, text):
        self.problems.append(f"{self.filename}:{node.lineno} in {self.where()}: {text}")

    def where(self):
        return self.functions[-1] if self.functions else "<module>"

    def visit_FunctionDef(self, node):
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def check_module(self, node, module):
        if node_level := getattr(node, "level", 0):  # `from .configuration_pmoe import ...`
            if f"{module}.py" not in REMOTE_CODE_FILES or node_level != 1:
                self.problem(node, f"relative import of {module!r}")
            return
        top = module.split(".")[0]
        if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_MODULES):
            self.problem(node, f"imports {module}")
        allowed = ALLOWED_IMPORTS[self.filename]
        if module not in allowed and top not in allowed:
            self.problem(node, f"imports {module}, not in the allowed imports {sorted(allowed)}")
        if module.startswith("transformers.utils.hub") and self.where() not in ALLOWED_HUB_IMPORTS:
            self.problem(node, "imports the Hub client")

    def visit_Import(self, node):
        for alias in node.names:
            self.check_module(node, alias.name)

    def visit_ImportFrom(self, node):
        self.check_module(node, node.module or "")
        if node.module == "transformers":
            for alias in node.names:
                if alias.name in ("dynamic_module_utils", "utils.hub"):
                    self.problem(node, f"imports transformers.{alias.name}")

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            self.problem(node, f"calls {node.func.id}()")
        if isinstance(node.func, ast.Attribute) and node.func.attr in FORBIDDEN_METHODS:
            self.problem(node, f"calls .{node.func.attr}()")
        for keyword in node.keywords:
            if keyword.arg == "trust_remote_code" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value in (False, None)
            ):
                self.problem(node, "passes trust_remote_code")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        chain = dotted(node)
        if chain is not None:
            if any(chain == bad or chain.startswith(bad + ".") for bad in FORBIDDEN_CHAINS):
                self.problem(node, f"uses {chain}")
            if chain.split(".")[0] in ("os", "tempfile"):
                self.os_uses.append((chain, self.where(), node))
                return  # the whole chain is recorded; do not record its prefixes again
        self.generic_visit(node)

    def visit_Name(self, node):
        # `os` / `tempfile` only as the root of an audited dotted name (never passed around or aliased).
        if node.id in ("os", "tempfile"):
            self.problem(node, f"uses the module {node.id} directly")


def dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def audit(path):
    result = Audit(path.name)
    result.visit(ast.parse(path.read_text(), filename=str(path)))
    for chain, function, node in result.os_uses:
        allowed = ALLOWED_OS_USES.get((path.name, chain))
        if allowed is None or function not in allowed:
            result.problem(node, f"uses {chain} (audited uses: {sorted(ALLOWED_OS_USES)})")
    return result


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_remote_code_files_hold_model_code_only(name):
    result = audit(PACKAGE / name)
    assert result.problems == []


def test_the_audit_allow_list_is_exact():
    """Every allowed use of os / tempfile is still there (a stale allow-list would hide a new use later)."""
    used = {((name, chain), function) for name in REMOTE_CODE_FILES for chain, function, _ in audit(PACKAGE / name).os_uses}
    assert {key for key, _ in used} == set(ALLOWED_OS_USES)
    for key, functions in ALLOWED_OS_USES.items():
        assert {function for used_key, function in used if used_key == key} == functions, key


def test_the_audit_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "modeling_pmoe.py"
    bad.write_text(
        "import os\nimport subprocess\nfrom pickle import loads\nimport torch\n"
        "def f(path):\n"
        "    os.system('x')\n    open(path)\n    eval('1')\n    torch.load(path)\n    getattr(os, 'system')\n"
        "    os.remove(path)\n    g(trust_remote_code=True)\n"
    )
    problems = "\n".join(audit(bad).problems)
    for expected in ("imports subprocess", "imports pickle", "uses os.system", "calls open()", "calls eval()",
                     "uses torch.load", "uses the module os directly", "calls .remove()", "passes trust_remote_code",
                     "calls .system()"):
        assert expected in problems, expected


# The one audited exception: `pmoe demo` reloads the folder it has just written itself (whose remote code is a copy of
# pmoe's own two files) with trust_remote_code=True, in a child process without pmoe (the script `pmoe.demo.RELOAD`),
# to show the load path of users without pmoe.
ALLOWED_TRUST_REMOTE_CODE = {("demo.RELOAD", "<module>")}


def nodes_with_function(node, function="<module>"):
    """Every AST node under `node`, with the name of the innermost function that holds it."""
    for child in ast.iter_child_nodes(node):
        inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
        yield child, inner
        yield from nodes_with_function(child, inner)


def test_pmoe_never_passes_trust_remote_code():
    """No call anywhere in the package (CLI, PEFT interop, callbacks, remote code) passes trust_remote_code other
    than False / None, except the audited demo reload above. Loading a checkpoint's own code is the user's decision."""
    from pmoe.demo import RELOAD

    found = set()
    sources = [(path.name, path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))] + [("demo.RELOAD", RELOAD)]
    for name, source in sources:
        for node, function in nodes_with_function(ast.parse(source, filename=name)):
            pairs = []
            if isinstance(node, ast.Call):
                pairs = [(keyword.arg, keyword.value) for keyword in node.keywords]
            elif isinstance(node, ast.Dict):
                pairs = [(key.value, value) for key, value in zip(node.keys, node.values)
                         if isinstance(key, ast.Constant)]
            for key, value in pairs:
                if key == "trust_remote_code" and not (
                    isinstance(value, ast.Constant) and value.value in (False, None)
                ):
                    found.add((name, function))
    assert found == ALLOWED_TRUST_REMOTE_CODE


# ------------------------------------------------------------------------------------------- auto_map elsewhere
MARKER_CODE = "from pathlib import Path\nPath({marker!r}).touch()\nraise SystemExit('must never run')\n"


@pytest.mark.parametrize("reference", ["evil_modeling", "other-org/other_repo--evil_modeling"])
def test_code_named_by_auto_map_never_runs_without_trust_remote_code(checkpoint, tmp_path, reference, capsys):
    marker = tmp_path / "code-ran"
    code = MARKER_CODE.format(marker=str(marker))
    # Every Python file in the folder would leave the marker if imported: the auto_map's target, the folder's own
    # copies of the remote code (a tampered checkpoint), and a custom generate function.
    for name in ("evil_modeling.py", *REMOTE_CODE_FILES):
        (checkpoint / name).write_text(code)
    (checkpoint / "custom_generate").mkdir()
    (checkpoint / "custom_generate" / "generate.py").write_text(code)
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": f"{reference}.EvilConfig",
        "AutoModel": f"{reference}.EvilModel",
        "AutoModelForCausalLM": f"{reference}.EvilForCausalLM",
        "AutoModelForSequenceClassification": f"{reference}.EvilForSequenceClassification",
    }
    (checkpoint / "config.json").write_text(json.dumps(config))
    modules_before = set(sys.modules)

    # pmoe is imported, so the Auto classes resolve "pmoe" to its own classes and never ask about remote code.
    assert type(AutoConfig.from_pretrained(checkpoint)) is pmoe.PMoEConfig
    assert type(PMoEForCausalLM.from_pretrained(checkpoint)) is PMoEForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(checkpoint)) is PMoEForCausalLM
    assert type(AutoModel.from_pretrained(checkpoint)) is pmoe.PMoEModel
    assert type(AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)) is (
        pmoe.PMoEForSequenceClassification
    )
    assert type(AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=False)) is PMoEForCausalLM

    # The CLI commands that read checkpoints.
    from pmoe.cli import main

    assert main(["info", str(checkpoint)]) == 0
    assert main(["report", str(checkpoint), "--output", str(tmp_path / "router.png")]) == 0
    capsys.readouterr()

    assert not marker.exists()
    new_modules = set(sys.modules) - modules_before
    assert not [name for name in new_modules if "evil" in name or name.startswith("transformers_modules")]
