"""causal-lm data: rows read with `datasets`, tokenized with loss masks, optionally packed.

Formats, detected from the columns (and logged):
- chat: `messages`, a list of {role, content}, rendered with the tokenizer's chat template;
  the loss covers the assistant turns (their spans in the rendered text, found by rendering
  each prefix of the conversation with and without the reply);
- prompt/completion: `prompt` and `completion` strings; the loss covers the completion and EOS;
- text: `text`; the loss covers every token and EOS.
`trainOnPrompt` puts the loss on every token of the first two as well. Rows longer than
maxSeqLength are truncated (and counted). Packing concatenates whole examples, in a
seeded order, into sequences of exactly maxSeqLength tokens: position ids restart at 0 for
every example, which transformers turns into a block-diagonal causal mask, so neither
attention nor positions cross example boundaries. Packing happens once, before training,
so a packed sequence is one dataset item and a resume lands on the same sequence.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from trainer.errors import UserError

log = logging.getLogger(__name__)

IGNORE = -100  # cross-entropy's ignore_index: tokens without loss


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


class TokenDataset(Dataset):
    """Examples, one a dataset item; packed: per item, the lengths of the examples packed into it."""

    deterministic_items = True  # tokenized and packed before training: a lookup

    def __init__(self, examples: list[Example], packed: list[list[int]] | None = None):
        self.examples = examples
        self.packed = packed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


# ------------------------------------------------------------------ reading rows
def read_rows(path: str, key: str, fetch) -> list[dict]:
    """Rows of a JSONL (.jsonl/.json) or Parquet file, local or on S3 (`fetch(uri) -> local Path`)."""
    if path.startswith("s3://"):
        local = fetch(path)
    else:
        local = Path(path[len("file://"):] if path.startswith("file://") else path)
        if not local.is_file():
            raise UserError(f"{key}: {path!r}: no such file")
    kind = "parquet" if local.suffix == ".parquet" else "json" if local.suffix in (".jsonl", ".json") else None
    if kind is None:
        raise UserError(f"{key}: {path!r}: expected a .jsonl, .json or .parquet file")
    try:
        import datasets
    except ImportError:
        raise UserError("training.task: causal-lm needs the `datasets` package: pip install 'kubetrain[nlp]'") from None
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="kubetrain-datasets-") as cache:  # pods: read-only $HOME
            loaded = datasets.load_dataset(kind, data_files=str(local), split="train", keep_in_memory=True,
                                           cache_dir=cache)
            rows = loaded.to_list()
    except Exception as e:  # pyarrow's and datasets' parse errors
        raise UserError(f"{key}: {path}: cannot read it as {kind}: {str(e).splitlines()[0][:300]}") from None
    if not rows:
        raise UserError(f"{key}: {path}: no rows")
    return rows


def detect_format(rows: list[dict], key: str) -> str:
    columns = set(rows[0])
    if "messages" in columns:
        return "chat"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    raise UserError(f"{key}: columns {sorted(columns)}: expected `messages` (chat), `prompt` and `completion`, "
                    "or `text`")


# ------------------------------------------------------------------ tokenizing
class Tokenize:
    """One row to one Example, for one format; counts what it truncated."""

    def __init__(self, tokenizer, fmt: str, max_length: int, train_on_prompt: bool, key: str):
        self.tokenizer, self.fmt, self.max_length = tokenizer, fmt, max_length
        self.train_on_prompt, self.key = train_on_prompt, key
        self.truncated = 0
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{key}: chat data (`messages`) needs a tokenizer with a chat template, and this one has "
                            "none: add `chat_template` to tokenizer_config.json (or chat_template.jinja) in the "
                            "model folder, or use prompt/completion rows")
        self.eos = tokenizer.eos_token_id

    def __call__(self, row: dict, index: int) -> Example:
        if self.fmt == "chat":
            ids, mask = self._chat(row, index)
        else:
            if self.fmt == "text":
                prompt, answer = "", _text(row, "text", index, self.key)
            else:
                prompt, answer = _text(row, "prompt", index, self.key), _text(row, "completion", index, self.key)
            p = self._encode(prompt) if prompt else []
            a = self._encode(answer) + ([self.eos] if self.eos is not None else [])
            ids, mask = p + a, [self.train_on_prompt] * len(p) + [True] * len(a)
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, mask = ids[:self.max_length], mask[:self.max_length]
        labels = [t if keep else IGNORE for t, keep in zip(ids, mask)]
        return Example(ids, labels)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _chat(self, row: dict, index: int) -> tuple[list[int], list[bool]]:
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise UserError(f"{self.key}: row {index}: `messages` must be a list of {{role, content}}")
        text = self._render(messages)
        spans = []  # character spans of the assistant replies
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = self._render(messages[:i], True), self._render(messages[:i + 1])
            if not (text.startswith(before) and text.startswith(through)):
                raise UserError(f"{self.key}: row {index}: the chat template renders a conversation's prefix "
                                "differently from the whole, so the assistant's tokens cannot be found")
            spans.append((len(before), len(through)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        mask = [self.train_on_prompt or any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
        return ids, mask


def _text(row: dict, column: str, index: int, key: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise UserError(f"{key}: row {index}: `{column}` must be a string, not {type(value).__name__}")
    return value


def tokenize_rows(rows: list[dict], tokenize: Tokenize) -> list[Example]:
    examples = [tokenize(row, i) for i, row in enumerate(rows)]
    return [e for e in examples if any(t != IGNORE for t in e.labels[1:])]  # nothing to learn: dropped


def pack(examples: list[Example], length: int, pad_id: int, seed: int) -> TokenDataset:
    """Whole examples, in a seeded order, first-fit into sequences of `length` tokens; the tail of
    each sequence is padding with its own positions and no loss."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    packs: list[list[Example]] = []
    room: list[int] = []
    for i in order:
        e = examples[i]
        for p, left in enumerate(room):
            if len(e.input_ids) <= left:
                packs[p].append(e)
                room[p] -= len(e.input_ids)
                break
        else:
            packs.append([e])
            room.append(length - len(e.input_ids))
    items = []
    for group, left in zip(packs, room):
        ids = [t for e in group for t in e.input_ids] + [pad_id] * left
        labels = [t for e in group for t in e.labels] + [IGNORE] * left
        items.append(Example(ids, labels))
    return TokenDataset(items, packed=[[len(e.input_ids) for e in g] + ([left] if left else [])
                                       for g, left in zip(packs, room)])


class CausalCollate:
    """Pads a batch to its longest item (right). Inputs are input_ids and position_ids, no attention
    mask: padding and packed examples each get positions from 0, which transformers reads as
    separate sequences (a block-diagonal causal mask) when no KV cache is kept; the target is the
    labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        width = max(len(e.input_ids) for e, _ in items)
        ids, labels, positions = [], [], []
        for e, lengths in items:
            pad = width - len(e.input_ids)
            ids.append(e.input_ids + [self.pad_id] * pad)
            labels.append(e.labels + [IGNORE] * pad)
            lengths = (lengths or [len(e.input_ids)]) + ([pad] if pad else [])
            positions.append([p for n in lengths for p in range(n)])
        # transformers reads packing from position ids only without a KV cache: say so, whatever the config
        inputs = {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(positions), "use_cache": False}
        return inputs, torch.tensor(labels)

    def count_tokens(self, batch) -> torch.Tensor:
        """Real tokens of a collated batch: padding is the pad id without a label (a real token that is
        the pad id, an end-of-sequence say, keeps its label where it is trained on)."""
        inputs, labels = batch
        return ((inputs["input_ids"] != self.pad_id) | (labels != IGNORE)).sum()


class WithLengths(Dataset):
    """(Example, its packed lengths or None): what CausalCollate takes."""

    deterministic_items = True

    def __init__(self, data: TokenDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index], (self.data.packed[index] if self.data.packed else None)


# ------------------------------------------------------------------ the synthetic instruction task
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
           "seventeen eighteen nineteen twenty").split()
PEOPLE = ("ana", "bo", "cy", "dee", "eli", "fay", "gus", "hal", "ivy", "jo")
ASKS = ("what comes after {n} ?", "say the number after {n} .", "{p} wants the number after {n} .",
        "after {n} comes which number ?", "{p} asks : what follows {n} ?", "next after {n} , please .")
SYNTHETIC_WORDS = sorted(set(NUMBERS) | set(PEOPLE) | {w for a in ASKS for w in a.split() if "{" not in w})


def synthetic_rows(count: int, seed: int, chat: bool) -> list[dict]:
    """An instruction task a tiny model learns in minutes and that exact match can grade: answer with
    the number word after the one asked for, in one of several phrasings."""
    g = random.Random(seed)
    rows = []
    for _ in range(count):
        n = g.randrange(len(NUMBERS) - 1)
        prompt = g.choice(ASKS).format(n=NUMBERS[n], p=g.choice(PEOPLE))
        answer = NUMBERS[n + 1]
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
                    if chat else {"prompt": prompt + " answer :", "completion": " " + answer})
    return rows


def prompt_of(row: dict, fmt: str) -> tuple[list[dict] | str, str]:
    """(what the model is given, the expected answer) for a generation check."""
    if fmt == "chat":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]["content"]
    if fmt == "prompt-completion":
        return row["prompt"], row["completion"]
    return row["text"][: len(row["text"]) // 2], row["text"][len(row["text"]) // 2:]
