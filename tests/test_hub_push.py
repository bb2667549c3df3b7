"""push_to_hub to a Hub endpoint on 127.0.0.1 (tests/processes/hub_server.py), then loading each revision as remote
code in a fresh process without pmoe, through the normal download path."""

import torch
from safetensors.torch import save_file

from pmoe import PMoEForCausalLM

from helpers import REMOTE_CODE_FILES, client_env, make_dense, padded_batch, randomize_experts, run_client
from processes.hub_server import HubServer


PUSH = """
    import json, sys
    from pmoe import PMoEForCausalLM

    repo_id, checkpoints = sys.argv[1], sys.argv[2:]
    shas = []
    for checkpoint in checkpoints:  # one push per checkpoint: one revision each
        model = PMoEForCausalLM.from_pretrained(checkpoint)
        shas.append(model.push_to_hub(repo_id, license="apache-2.0", commit_message=f"{model.config.num_experts} experts").oid)
    print(json.dumps({"shas": shas}))
"""

LOAD = """
    import json, sys
    sys.modules["pmoe"] = None  # the loading side does not have pmoe
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    repo_id, data_file, revisions = sys.argv[1], sys.argv[2], sys.argv[3:]
    data = load_file(data_file)
    report = {}
    for revision in revisions:
        model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        report[revision] = {
            "class": type(model).__module__ + "." + type(model).__name__,
            "tasks": model.config.expert_tasks,
            "logits": {name[len("logits-"):]: bool(torch.equal(logits, data[name])) for name in data if name.startswith("logits-")},
        }
    print(json.dumps(report))
"""


def test_push_grow_push_and_load_each_revision_as_remote_code(tmp_path):
    model = PMoEForCausalLM.from_dense(make_dense("llama"), num_shallow_layers=2, expert_rank=4)
    model.config.base_model_name_or_path = "org/tiny-llama"
    input_ids, attention_mask = padded_batch(batch=2, length=7)
    data = {"input_ids": input_ids, "attention_mask": attention_mask}

    def snapshot(name):
        model.eval()
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            data[f"logits-{name}"] = model(input_ids=input_ids, attention_mask=attention_mask).logits

    model.add_expert("support")
    randomize_experts(model, [0])
    model.config.expert_train_steps = [300]
    model.record_task_scores({"support": 0.9})
    snapshot("v1")
    model.add_expert("sql")  # growth: one more expert, the first one frozen
    randomize_experts(model, [1], seed=3)  # a key that routes the test batch to the new expert
    model.record_task_scores({"support": 0.9, "sql": 0.7})
    snapshot("v2")
    assert not torch.equal(data["logits-v1"], data["logits-v2"])
    save_file(data, tmp_path / "data.safetensors")

    with HubServer() as server:
        shas = run_client(PUSH, client_env(server, tmp_path / "push-home"), "org/pmoe-tiny",
                          tmp_path / "v1", tmp_path / "v2")["shas"]
        report = run_client(LOAD, client_env(server, tmp_path / "load-home"), "org/pmoe-tiny",
                            tmp_path / "data.safetensors", shas[0], shas[1], "main")
        card_v1 = server.files("org/pmoe-tiny", shas[0])["README.md"].decode()
        card_v2 = server.files("org/pmoe-tiny", shas[1])["README.md"].decode()
        files = set(server.files("org/pmoe-tiny", shas[1]))
        assert server.unhandled == []

    assert len(set(shas)) == 2
    old, new, main = report[shas[0]], report[shas[1]], report["main"]
    assert old["class"].startswith("transformers_modules.") and old["class"].endswith("modeling_pmoe.PMoEForCausalLM")
    assert old["tasks"] == ["support"] and old["logits"]["v1"]  # the old revision loads as before, bit for bit
    assert new["tasks"] == ["support", "sql"] and new["logits"]["v2"] and not new["logits"]["v1"]
    assert main == new
    assert {"config.json", "model.safetensors", *REMOTE_CODE_FILES, "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)

    # The model card: Hub metadata, expert table, the recorded results, a trust_remote_code snippet.
    assert card_v2.startswith("---\n") and "base_model: org/tiny-llama" in card_v2 and "license: apache-2.0" in card_v2
    assert "library_name: transformers" in card_v2 and "- pmoe" in card_v2
    assert "| 0 | support |" in card_v2 and "| 1 | sql |" in card_v2 and "| 1 | sql |" not in card_v1
    assert "| sql | 90.0 | 70.0 |" in card_v2 and "LA 80.0 · OP 80.0 · BWT +0.0" in card_v2
    assert 'from_pretrained("org/pmoe-tiny", trust_remote_code=True)' in card_v2
