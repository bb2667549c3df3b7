"""Version drift: `import pmoe` warns once outside the tested transformers range (read from pmoe's installed metadata),
checkpoints record the pmoe and transformers versions that wrote them, and the cache output (renamed `cache` in
transformers 5.24) is dropped by the Trainer at evaluation."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, Cache, Trainer, TrainingArguments

import pmoe
from pmoe.configuration_pmoe import PMOE_VERSION

from helpers import make_pmoe, tiny_pmoe_config


ROOT = Path(__file__).resolve().parents[1]
WARNING_TEXT = "is tested with transformers"
FAKE_REQUIRES = [
    "torch<=2.13,>=2.6",
    "transformers<5.25,>=5.23",
    'peft>=0.17; extra == "peft"',
    'transformers>=4; extra == "test"',  # an extra's requirement is not the install's: ignored
]


def installed_specifier():
    specifier = pmoe.tested_transformers_specifier()
    if specifier is None:
        pytest.skip("pmoe's distribution metadata is not installed (running from a source tree): no version check")
    return specifier


def child_env():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_python(tmp_path, *args):
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def fake_metadata(monkeypatch):
    """pmoe's metadata declares `transformers>=5.23,<5.25`, whatever is installed."""
    real_requires, real_version = importlib.metadata.requires, importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "requires",
                        lambda name: list(FAKE_REQUIRES) if name == "pmoe" else real_requires(name))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0" if name == "pmoe" else real_version(name))


# ------------------------------------------------------------------------------------------- check_transformers_version
@pytest.mark.parametrize("installed", ["5.23.0", "5.24.0", "5.24.3", "5.24.0.dev0", "5.24.0rc1"])
def test_in_range_gives_no_message(fake_metadata, installed):
    assert pmoe.check_transformers_version(installed) is None


@pytest.mark.parametrize("installed", ["5.25.0", "5.25.0.dev0", "5.22.9", "6.0.0", "4.57.1"])
def test_out_of_range_names_the_version_and_the_range(fake_metadata, installed):
    message = pmoe.check_transformers_version(installed)
    assert message.startswith(f"pmoe 0.1.0 is tested with transformers>=5.23,<5.25, but transformers {installed} is "
                              "installed: ")
    assert "Pin a tested version (pip install 'transformers>=5.23,<5.25')" in message
    assert message.endswith("run pmoe's test suite against it (see README 'Tested versions').")


def test_default_is_the_imported_transformers(fake_metadata, monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.25.1")
    assert "but transformers 5.25.1 is installed" in pmoe.check_transformers_version()
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    assert pmoe.check_transformers_version() is None


def test_unparsable_version_is_not_judged(fake_metadata):
    assert pmoe.check_transformers_version("not-a-version") is None


def test_no_metadata_is_silent(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)
    assert pmoe.tested_transformers_specifier() is None
    assert pmoe.check_transformers_version("99.0.0") is None
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ["torch>=2.6"])  # no transformers requirement
    assert pmoe.check_transformers_version("99.0.0") is None


# ------------------------------------------------------------------------------------------- the installed metadata
def test_installed_metadata_is_this_source_trees():
    """The range is written once, in pyproject.toml; the check reads it from the installed metadata, so a stale
    install would check a stale range (reinstall: `pip install -e .`, as .ci/run does)."""
    specifier = installed_specifier()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [requirement for requirement in project["dependencies"]
                if requirement.replace(" ", "").lower().startswith("transformers")]
    from packaging.requirements import Requirement

    assert len(declared) == 1 and Requirement(declared[0]).specifier == specifier, (declared, str(specifier))
    assert importlib.metadata.version("pmoe") == pmoe.__version__ == PMOE_VERSION


def test_package_version_is_the_config_modules():
    """pyproject.toml takes the package version from configuration_pmoe.PMOE_VERSION (or, static, equals it)."""
    assert pmoe.__version__ == PMOE_VERSION == pmoe.PMOE_VERSION
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    if "version" in pyproject["project"].get("dynamic", []):
        dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
        assert dynamic == {"attr": "pmoe.configuration_pmoe.PMOE_VERSION"}
    else:
        assert pyproject["project"]["version"] == PMOE_VERSION


# ------------------------------------------------------------------------------------------- import-time warning
def test_import_warns_once_outside_the_tested_range(tmp_path):
    specifier = installed_specifier()
    fake = next(version for version in ("5.99.0", "4.0.0", "99.0.0") if not specifier.contains(version,
                                                                                                 prereleases=True))
    child = textwrap.dedent(
        """
        import json, sys, warnings
        import transformers

        transformers.__version__ = sys.argv[1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pmoe
            import pmoe  # a second import is the cached module: no second warning
        print(json.dumps([{"category": w.category.__name__, "message": str(w.message), "filename": w.filename}
                          for w in caught if "%s" in str(w.message)]))
        """ % WARNING_TEXT
    )
    result = run_python(tmp_path, "-c", child, fake)
    assert result.returncode == 0, result.stderr[-3000:]
    caught = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(caught) == 1, caught
    assert caught[0]["category"] == "UserWarning"
    assert caught[0]["filename"] == "<string>"  # points at the user's `import pmoe`, not at pmoe
    assert caught[0]["message"] == pmoe.check_transformers_version(fake)
    assert f"but transformers {fake} is installed" in caught[0]["message"]
    assert f"transformers{pmoe.format_specifier(specifier)}" in caught[0]["message"]

    # With the default filters, the user sees it once on stderr.
    result = run_python(tmp_path, "-c", f"import transformers; transformers.__version__ = {fake!r}; import pmoe")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(WARNING_TEXT) == 1, result.stderr
    assert f"<string>:1: UserWarning: pmoe {pmoe.__version__} is tested with transformers" in result.stderr


def test_import_with_the_installed_transformers(tmp_path):
    specifier = installed_specifier()
    in_range = specifier.contains(transformers.__version__, prereleases=True)
    # Only pmoe's warnings become errors (other libraries may warn at import for their own reasons).
    result = run_python(tmp_path, "-W", "error:pmoe :UserWarning", "-c", "import pmoe")
    if in_range:
        assert result.returncode == 0, result.stderr[-3000:]
        assert WARNING_TEXT not in result.stderr
    else:  # this suite is being run against an untested transformers: the warning is due
        assert result.returncode != 0 and WARNING_TEXT in result.stderr


# ------------------------------------------------------------------------------------------- versions in config.json
def test_saved_config_records_the_versions_that_wrote_it(tmp_path):
    config = tiny_pmoe_config()
    assert config.pmoe_version is None and config.transformers_version is None  # built in memory
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pmoe_version"] == PMOE_VERSION == pmoe.__version__
    assert saved["transformers_version"] == transformers.__version__
    assert json.loads(config.to_json_string(use_diff=False))["pmoe_version"] == PMOE_VERSION
    assert AutoConfig.from_pretrained(tmp_path).pmoe_version == PMOE_VERSION


def test_checkpoint_records_the_version_and_ships_it(tmp_path):
    make_pmoe(num_experts=1, expert_tasks=["sql"]).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["pmoe_version"] == PMOE_VERSION
    # The remote code carries the constant pyproject.toml reads (a plain assignment: read without importing).
    assert f'\nPMOE_VERSION = "{PMOE_VERSION}"\n' in (tmp_path / "configuration_pmoe.py").read_text()


@pytest.mark.parametrize("recorded", ["0.0.9", None])
def test_older_checkpoint_shows_its_version_until_saved_again(tmp_path, recorded):
    make_pmoe(num_experts=1, expert_tasks=["sql"]).save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    if recorded is None:  # written before pmoe recorded its version
        del config["pmoe_version"]
    else:
        config["pmoe_version"] = recorded
    config_file.write_text(json.dumps(config))

    assert AutoConfig.from_pretrained(tmp_path / "old").pmoe_version == recorded
    model = pmoe.PMoEForCausalLM.from_pretrained(tmp_path / "old")
    assert model.config.pmoe_version == recorded and model.config.expert_tasks == ["sql"]
    model.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["pmoe_version"] == PMOE_VERSION
    assert AutoConfig.from_pretrained(tmp_path / "new").pmoe_version == PMOE_VERSION


REMOTE_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["pmoe"] = None  # remote code only
    from transformers import AutoConfig

    source, target = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    loaded = config.pmoe_version
    config.save_pretrained(target)
    with open(target + "/config.json") as handle:
        written = json.load(handle)["pmoe_version"]
    print(json.dumps({"module": type(config).__module__, "loaded": loaded, "written": written}))
    """
)


def test_remote_code_records_the_version_of_the_code_it_ships(tmp_path):
    """Without pmoe, the checkpoint's own configuration_pmoe.py writes its PMOE_VERSION: the version of the code that
    wrote the file, whichever pmoe is (or is not) installed."""
    folder = tmp_path / "checkpoint"
    tiny_pmoe_config().save_pretrained(folder)
    shutil.copy(Path(pmoe.__file__).parent / "configuration_pmoe.py", folder / "configuration_pmoe.py")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_pmoe.PMoEConfig"}
    config["pmoe_version"] = "0.0.9"
    (folder / "config.json").write_text(json.dumps(config))
    shipped = folder / "configuration_pmoe.py"
    text = shipped.read_text()
    assert text.count(f'\nPMOE_VERSION = "{PMOE_VERSION}"\n') == 1
    shipped.write_text(text.replace(f'\nPMOE_VERSION = "{PMOE_VERSION}"\n', '\nPMOE_VERSION = "9.9.9"\n'))

    env = dict(child_env(), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", REMOTE_CHILD, str(folder), str(tmp_path / "resaved")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"module": report["module"], "loaded": "0.0.9", "written": "9.9.9"}
    assert report["module"].startswith("transformers_modules.")


# ------------------------------------------------------------------------------------------- cache output at evaluation
def test_keys_to_ignore_at_inference_cover_the_cache_output():
    """transformers 5.24 renamed the cache output `past_key_values` -> `cache`: both are dropped at evaluation."""
    assert {"past_key_values", "cache"} <= set(pmoe.PMoEConfig.keys_to_ignore_at_inference)
    model = make_pmoe()
    with torch.no_grad():
        outputs = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True)
    cache_keys = [key for key, value in outputs.items() if isinstance(value, Cache)]
    assert cache_keys and set(cache_keys) <= set(model.config.keys_to_ignore_at_inference), list(outputs.keys())


def test_trainer_predict_with_the_cache_on_returns_the_logits_only(tmp_path):
    # The Trainer sets `config.use_cache = args.use_cache`; with it on, an un-ignored cache output reaches the
    # Trainer's gathering and fails ("Unsupported types (DynamicCache) passed to `_pad_across_processes`").
    model = make_pmoe()
    dataset = [{"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True,
                             use_cache=True)
    predictions = Trainer(model, args).predict(dataset).predictions
    assert not isinstance(predictions, tuple), type(predictions)  # the cache would come back next to the logits
    assert predictions.shape == (4, 4, model.config.vocab_size)
