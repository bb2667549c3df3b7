"""The fake Hub (tests/processes/hub_server.py) against the real clients: huggingface_hub uploads and downloads, and
transformers push_to_hub / from_pretrained, each in a subprocess whose HF_ENDPOINT points at the fake."""

import json
import re

from processes.hub_server import HubServer

from helpers import client_env, run_client


UPLOAD_AND_DOWNLOAD = """
    import json, pathlib, sys
    from huggingface_hub import HfApi, create_repo, hf_hub_download, snapshot_download, upload_folder
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    folder = pathlib.Path(sys.argv[1])
    api = HfApi()
    create_repo("org/data")
    create_repo("org/data", exist_ok=True)  # the 409 is swallowed

    (folder / "sub").mkdir()
    (folder / "a.txt").write_text("first")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 100)
    first = upload_folder(repo_id="org/data", folder_path=folder, commit_message="first").oid
    (folder / "a.txt").write_text("second")
    second = upload_folder(repo_id="org/data", folder_path=folder, commit_message="second").oid
    third = api.upload_file(path_or_fileobj=b"added", path_in_repo="c.txt", repo_id="org/data").oid

    def read(filename, revision):
        return pathlib.Path(hf_hub_download("org/data", filename, revision=revision)).read_text()

    def error(filename, repo_id="org/data", revision=None):
        try:
            hf_hub_download(repo_id, filename, revision=revision)
        except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
            return type(e).__name__

    old = pathlib.Path(snapshot_download("org/data", revision=first))
    print(json.dumps({
        "shas": [first, second, third],
        "a": [read("a.txt", first), read("a.txt", second), read("a.txt", "main")],
        "c_at_first": error("c.txt", revision=first),
        "c_at_third": read("c.txt", third),
        "snapshot_first": sorted(str(p.relative_to(old)) for p in old.rglob("*") if p.is_file()),
        "snapshot_a": (old / "a.txt").read_text(),
        "b_ok": (old / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 100,
        "files_main": sorted(api.list_repo_files("org/data")),
        "sha_main": api.model_info("org/data").sha,
        "commit_titles": [c.title for c in api.list_repo_commits("org/data")],
        "errors": [error("nope.txt"), error("a.txt", repo_id="org/missing"), error("a.txt", revision="nobranch")],
    }))
"""


def test_upload_folder_revisions_and_downloads(tmp_path):
    (tmp_path / "folder").mkdir()
    with HubServer() as server:
        out = run_client(UPLOAD_AND_DOWNLOAD, client_env(server, tmp_path / "home"), tmp_path / "folder")
        first, second, third = out["shas"]
        # create_repo's own "initial commit" (.gitattributes), then one commit per upload.
        initial = server.commits("org/data")[-1]
        assert server.commits("org/data") == [third, second, first, initial]
        assert len(set(server.commits("org/data"))) == 4
        assert set(server.files("org/data", initial)) == {".gitattributes"}
        assert all(re.fullmatch(r"[0-9a-f]{40}", sha) for sha in out["shas"])
        assert server.files("org/data", first)["a.txt"] == b"first"
        assert server.unhandled == []
        # Every file travelled inline in the commit: no LFS batch or Xet token call was ever made.
        assert not any("lfs" in path or "xet" in path for _, path in server.requests)
    assert out["a"] == ["first", "second", "second"]
    assert out["c_at_first"] == "RemoteEntryNotFoundError"
    assert out["c_at_third"] == "added"
    assert out["snapshot_first"] == [".gitattributes", "a.txt", "sub/b.bin"]
    assert out["snapshot_a"] == "first" and out["b_ok"]
    assert out["files_main"] == [".gitattributes", "a.txt", "c.txt", "sub/b.bin"]
    assert out["sha_main"] == third
    assert out["commit_titles"] == ["Upload c.txt with huggingface_hub", "second", "first", "initial commit"]
    assert out["errors"] == ["RemoteEntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError"]


PUSH = """
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = sys.argv[1]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 50, (2, 7))
    shas, logits = [], []
    for step in range(2):  # two pushes: the second only changes the weights
        if step:
            with torch.no_grad():
                model.lm_head.weight.mul_(2)
        with torch.no_grad():
            logits.append(model(input_ids).logits)
        shas.append(model.push_to_hub("org/tiny", commit_message=f"push {step}").oid)
    torch.save({"input_ids": input_ids, "logits": logits}, f"{out_dir}/expected.pt")
    print(json.dumps({"shas": shas}))
"""

LOAD = """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out_dir, shas = sys.argv[1], sys.argv[2:]
    expected = torch.load(f"{out_dir}/expected.pt")
    identical = []
    for sha, logits in zip(shas, expected["logits"]):
        model = LlamaForCausalLM.from_pretrained("org/tiny", revision=sha).eval()
        with torch.no_grad():
            identical.append(bool(torch.equal(model(expected["input_ids"]).logits, logits)))
    latest = AutoModelForCausalLM.from_pretrained("org/tiny").eval()  # branch "main" = the second push
    with torch.no_grad():
        identical.append(bool(torch.equal(latest(expected["input_ids"]).logits, expected["logits"][1])))
    print(json.dumps({"identical": identical}))
"""


def test_push_to_hub_then_from_pretrained_at_each_commit(tmp_path):
    with HubServer() as server:
        pushed = run_client(PUSH, client_env(server, tmp_path / "push_home"), tmp_path)["shas"]
        loaded = run_client(LOAD, client_env(server, tmp_path / "load_home"), tmp_path, *pushed)
        assert server.commits("org/tiny")[:2] == pushed[::-1]
        first, second = (server.files("org/tiny", sha) for sha in pushed)
        assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= set(first)
        assert first["model.safetensors"] != second["model.safetensors"]
        assert first["config.json"] == second["config.json"]
        assert server.unhandled == []
    assert loaded["identical"] == [True, True, True]


UPLOAD_CHECKPOINT = """
    import json, sys
    from huggingface_hub import create_repo, upload_folder

    create_repo("org/remote")
    print(json.dumps({"sha": upload_folder(repo_id="org/remote", folder_path=sys.argv[1]).oid}))
"""


def save_remote_code_checkpoint(out_dir):
    """A tiny Llama saved as a remote-code model (a config and a model subclass in .py files, named in auto_map),
    with reference logits. Built in the test process: no network is needed to save it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = out_dir / "checkpoint"
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny_remote'\n")
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyConfig\n\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    config_json = json.loads((folder / "config.json").read_text())
    config_json.update(model_type="tiny_remote", architectures=["TinyForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config_json))
    input_ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "logits": model(input_ids).logits}, out_dir / "expected.pt")
    return folder


REMOTE_CODE_LOAD = """
    import json, sys, torch
    from transformers import AutoModelForCausalLM

    out_dir, sha = sys.argv[1], sys.argv[2]
    expected = torch.load(f"{out_dir}/expected.pt")
    model = AutoModelForCausalLM.from_pretrained("org/remote", revision=sha, trust_remote_code=True).eval()
    with torch.no_grad():
        identical = bool(torch.equal(model(expected["input_ids"]).logits, expected["logits"]))
    print(json.dumps({"class": type(model).__name__, "module": type(model).__module__, "identical": identical}))
"""


def test_remote_code_from_pretrained_at_commit(tmp_path):
    with HubServer() as server:
        folder = save_remote_code_checkpoint(tmp_path)
        sha = run_client(UPLOAD_CHECKPOINT, client_env(server, tmp_path / "push_home"), folder)["sha"]
        out = run_client(REMOTE_CODE_LOAD, client_env(server, tmp_path / "load_home"), tmp_path, sha)
        fetched = {
            path.rsplit("/", 1)[-1] for method, path in server.requests if method == "GET" and "/resolve/" in path
        }
        assert {"config.json", "configuration_tiny.py", "modeling_tiny.py", "model.safetensors"} <= fetched
        assert server.unhandled == []
    assert out["class"] == "TinyForCausalLM" and out["module"].startswith("transformers_modules.")
    assert out["identical"]
