"""Built-in offline tasks: a character-level tokenizer, a general pretraining corpus and five clearly different tasks.

Every task is prompt -> answer over a small alphabet, generated in code with a seed, scored by exact match. The
prompt starts with the task's three-letter instruction, as real instructions differ between tasks:

    rev  reverse the letters         "rev hbdag=" -> "gadbh"
    srt  sort the digits             "srt 3141=" -> "1134"
    add  add two 2-digit numbers     "add 23+45=" -> "68"
    nxt  shift every letter by one   "nxt abcj=" -> "bcda"  (j wraps to a)
    cnt  count a letter              "cnt abacab:a=" -> "3"

The pretraining corpus (general knowledge for the base model) is copying and random text in the same alphabet; no
task appears in it.
"""

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast


LETTERS = "abcdefghij"
DIGITS = "0123456789"
# Letters of the instructions beyond a-j ("o" is unused but kept: the token ids, and so the cached demo base model and
# the published demo / benchmark numbers, depend on this exact vocabulary).
ALPHABET = LETTERS + DIGITS + " =+:" + "nrstvxcdop"
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus <pad> (0), <s> (1), </s> (2), <unk> (3)."""
    characters = sorted(set(ALPHABET + "cpy"))  # + "y" of the corpus' `cpy`
    vocab = {token: index for index, token in enumerate(SPECIAL)}
    for character in characters:
        vocab.setdefault(character, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def padding_collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Pads `input_ids` / `attention_mask` on the right and `labels` with -100, for causal-LM training batches."""
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def _word(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _reverse(rng):
    word = _word(rng, LETTERS, 3, 6)
    return f"rev {word}=", word[::-1]


def _sort(rng):
    digits = _word(rng, DIGITS, 3, 6)
    return f"srt {digits}=", "".join(sorted(digits))


def _add(rng):
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"add {a}+{b}=", str(a + b)


def _shift(rng):
    word = _word(rng, LETTERS, 3, 6)
    return f"nxt {word}=", "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in word)


def _count(rng):
    word = _word(rng, LETTERS[:4], 4, 7)
    letter = rng.choice(LETTERS[:4])
    return f"cnt {word}:{letter}=", str(word.count(letter))


TASKS = {"reverse": _reverse, "sort": _sort, "add": _add, "shift": _shift, "count": _count}


def task_examples(task: str, count: int, seed: int) -> list[dict]:
    """`count` examples of `task` as `{"prompt", "answer"}` dicts; different seeds give disjoint-by-chance samples."""
    if task not in TASKS:
        raise ValueError(f"Unknown built-in task {task!r}; available: {sorted(TASKS)}.")
    rng = random.Random(f"{task}-{seed}")
    return [dict(zip(("prompt", "answer"), TASKS[task](rng))) for _ in range(count)]


def task_splits(task: str, train: int, test: int, seed: int = 0) -> dict:
    """Train and test examples; test prompts never appear in train."""
    test_set = task_examples(task, test, seed=10_000 + seed)
    held_out = {example["prompt"] for example in test_set}
    train_set = [e for e in task_examples(task, train * 2, seed=seed) if e["prompt"] not in held_out][:train]
    return {"train": train_set, "test": test_set}


def pretraining_text(count: int, seed: int = 0) -> list[str]:
    """General text for the base model: copying (`cpy abc=abc`) and random character streams."""
    rng = random.Random(f"corpus-{seed}")
    texts = []
    for _ in range(count):
        if rng.random() < 0.6:
            word = _word(rng, LETTERS + DIGITS, 3, 6)
            texts.append(f"cpy {word}={word}")
        else:
            texts.append(_word(rng, ALPHABET, 8, 14))
    return texts


__all__ = ["TASKS", "char_tokenizer", "padding_collator", "pretraining_text", "task_examples", "task_splits"]
