"""Crash safety: find the newest checkpoint a `Trainer` finished writing, and save a model without ever leaving a
half-written folder in place of a good one.

What transformers does (5.x): `Trainer._save_checkpoint` writes straight into `<output_dir>/checkpoint-<step>` (no
temporary folder, no rename): the model (`save_pretrained`: config.json, then model.safetensors), then optimizer.pt,
scheduler.pt and rng_state.pth, then trainer_state.json last, and only then deletes checkpoints beyond
`save_total_limit`. `transformers.trainer_utils.get_last_checkpoint` (and so `train(resume_from_checkpoint=True)`)
takes the highest-numbered `checkpoint-<step>` folder whatever it holds, so after a crash during a save it names the
half-written one and resuming from it fails. `PreTrainedModel.save_pretrained` writes each file in place too: a crash
while it overwrites a folder destroys the save that was there.
"""

import contextlib
import json
import os
import re
import shutil
import struct

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .experts_pmoe import expert_index_of


TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _safetensors_keys(path):
    """The tensor names of a safetensors file, or None if its header does not parse or the file is shorter or longer
    than the header says (a write cut short)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return None
            header = json.loads(handle.read(length))
        tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
        end = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return None
    return set(tensors) if size == 8 + length + end else None


def read_weight_map(index_path) -> dict[str, str] | None:
    """`{tensor name: shard file}` of a sharded save's `model.safetensors.index.json`, or None when it does not parse
    or maps nothing."""
    weight_map = (_read_json(index_path) or {}).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    return weight_map


def is_complete_save(directory) -> bool:
    """Whether `directory` holds a whole `save_pretrained` save: config.json parses, the safetensors weights (one file,
    or an index and all its shards) are complete, and for a PMoE model the weights hold exactly the config's experts
    (a crash while overwriting a folder can leave a new config.json next to the old weights)."""
    config = _read_json(os.path.join(directory, "config.json"))
    if not isinstance(config, dict):
        return False
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_weight_map(index)
        if weight_map is None:
            return False
        keys = set()
        for shard in set(weight_map.values()):
            shard_keys = _safetensors_keys(os.path.join(directory, shard))
            if shard_keys is None:
                return False
            keys |= shard_keys
    elif os.path.isfile(single):
        keys = _safetensors_keys(single)
        if keys is None:
            return False
    else:
        return False
    if config.get("model_type") == "pmoe":
        experts = {index for key in keys if (index := expert_index_of(key)) is not None}
        if experts != set(range(int(config.get("num_experts", 0)))):
            return False
    return True


def is_complete_checkpoint(checkpoint) -> bool:
    """Whether the `Trainer` finished writing `checkpoint` (`<output_dir>/checkpoint-<step>`): its trainer_state.json,
    which the Trainer writes last, parses and is for that step, and its model save is complete (`is_complete_save`)."""
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(checkpoint)))
    state = _read_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    if match is None or not isinstance(state, dict) or state.get("global_step") != int(match.group(1)):
        return False
    return is_complete_save(checkpoint)


def last_complete_checkpoint(output_dir) -> str | None:
    """The newest `checkpoint-<step>` folder of `output_dir` that the `Trainer` finished writing (None if there is
    none). Use it instead of `transformers.trainer_utils.get_last_checkpoint` / `resume_from_checkpoint=True`, which
    pick the newest folder even when a crash cut its save short:

    ```python
    checkpoint = pmoe.last_complete_checkpoint("out")
    model = pmoe.PMoEForCausalLM.from_pretrained(checkpoint)
    Trainer(model, args, ..., callbacks=[callback]).train(resume_from_checkpoint=checkpoint)
    ```
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name) for name in os.listdir(output_dir)
        if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        if is_complete_checkpoint(path):
            return path
    return None


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_directory(save_directory):
    """Yield a staging folder to write a whole save into (`save_pretrained`, a tokenizer, ...). When the block ends
    without an error, the staging folder is flushed to disk and renamed into place, so `save_directory` holds either
    the previous complete save or the new one, never a half-written folder; on an error it is removed and
    `save_directory` is left as it was.

    The staging folder is `.<name>.saving` next to `save_directory`. An existing folder is renamed to
    `.<name>.previous` first and deleted after; should a crash fall between those two renames, both hidden folders are
    complete and the next `atomic_directory` to the same folder puts the new one in place."""
    target = os.path.abspath(os.fspath(save_directory)).rstrip(os.sep)
    parent, name = os.path.split(target)
    staging = os.path.join(parent, f".{name}.saving")
    previous = os.path.join(parent, f".{name}.previous")
    os.makedirs(parent, exist_ok=True)
    if not os.path.exists(target) and os.path.isdir(previous):
        # Interrupted between the two renames below: the staged save was complete.
        os.rename(staging if os.path.isdir(staging) else previous, target)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(previous, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for root, _, files in os.walk(staging):
        for file in files:
            _fsync(os.path.join(root, file))
        _fsync(root)
    if os.path.exists(target):
        os.rename(target, previous)
        os.rename(staging, target)
        _fsync(parent)
        shutil.rmtree(previous)
    else:
        os.rename(staging, target)
        _fsync(parent)


def save_pretrained_atomic(model, save_directory, **kwargs) -> str:
    """`model.save_pretrained(save_directory, **kwargs)` that a crash cannot leave half-written (see
    `atomic_directory`). Returns the folder's absolute path."""
    with atomic_directory(save_directory) as staging:
        model.save_pretrained(staging, **kwargs)
    return os.path.abspath(os.fspath(save_directory)).rstrip(os.sep)


__all__ = ["atomic_directory", "is_complete_checkpoint", "is_complete_save", "last_complete_checkpoint", "save_pretrained_atomic"]
