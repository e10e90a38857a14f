"""Task data for weak-column tuning: jsonl records -> token ids and loss labels -> padded batches.

A line is `{"prompt": str, "completion": str}` (loss on the completion tokens and EOS only) or
`{"text": str}` (loss on every predicted token). The prompt is tokenized as the tokenizer does by
default (BOS if it adds one), the completion on its own with no special tokens plus EOS, so a
generation that starts from the prompt's ids reproduces the trained completion ids. A text record
longer than the context is split into consecutive windows of `max_len` tokens (users bring
documents, not pre-cut windows); a prompt/completion pair that does not fit is refused, naming the
side that is too long. Every problem raises `DataError` (a ValueError) naming the file and line.
Knows tokenizers, not models.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token that carries no loss (prompt, padding)


class DataError(ValueError):
    """Bad task data; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where no loss; else equal to input_ids

    @property
    def target_tokens(self) -> int:
        """Tokens that are predicted with loss (the first token is never predicted)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # int64 [B, T], right-padded
    attention_mask: torch.Tensor  # int64 [B, T]
    labels: torch.Tensor  # int64 [B, T], IGNORE on prompt and padding

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; DataError naming the line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            check_record(record, f"{path}:{number}")
            records.append((number, record))
    if not records:
        raise DataError(
            f"{path} is empty: expected one JSON object per line, "
            '{"prompt": ..., "completion": ...} or {"text": ...}'
        )
    return records


def check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        fields = ("text",)
    elif "prompt" in record or "completion" in record:
        fields = ("prompt", "completion")
    else:
        raise DataError(
            f'{where}: needs "text" or "prompt" and "completion"; found keys {sorted(record)}'
        )
    for name in fields:
        if name not in record:
            raise DataError(f'{where}: missing field "{name}"')
        if not isinstance(record[name], str):
            raise DataError(f'{where}: field "{name}" must be a string')
    if not record[fields[-1]]:
        raise DataError(f'{where}: field "{fields[-1]}" is empty')


def encode_record(record: dict, tokenizer) -> Example:
    """Token ids and labels of one checked record."""
    if "text" in record:
        ids = list(tokenizer(record["text"]).input_ids)
        return Example(tuple(ids), tuple(ids))
    prompt = list(tokenizer(record["prompt"]).input_ids)
    completion = list(tokenizer(record["completion"], add_special_tokens=False).input_ids)
    if tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    ids = prompt + completion
    return Example(tuple(ids), tuple([IGNORE] * len(prompt) + completion))


def text_windows(example: Example, max_len: int) -> list[Example]:
    """Consecutive, non-overlapping windows of `max_len` tokens (the last may be shorter); a
    window of one token (nothing to predict) is dropped."""
    ids = example.input_ids
    windows = (ids[start : start + max_len] for start in range(0, len(ids), max_len))
    return [Example(w, w) for w in windows if len(w) > 1]


def pair_too_long(where: str, example: Example, max_len: int) -> DataError:
    """The refusal of a prompt/completion pair longer than `max_len`, naming the side to cut."""
    prompt = sum(label == IGNORE for label in example.labels)
    completion = len(example.labels) - prompt
    sides = [n for n, size in (("prompt", prompt), ("completion", completion)) if size >= max_len]
    if sides:
        what = f"the {' and the '.join(sides)} alone {'is' if len(sides) == 1 else 'are'} too long"
    else:
        what = f"shorten the {'prompt' if prompt >= completion else 'completion'} (the longer side)"
    return DataError(
        f"{where}: prompt {prompt} + completion {completion} tokens (with EOS) = "
        f"{prompt + completion}, longer than the context (--max-len {max_len}); {what}, "
        "or raise --max-len"
    )


def load_examples(path: str | Path, tokenizer, max_len: int) -> list[Example]:
    """Read, check and tokenize a jsonl file (text records split into windows); DataError
    naming the first bad line."""
    examples, split = [], []
    for number, record in read_records(path):
        example = encode_record(record, tokenizer)
        where = f"{path}:{number}"
        if len(example.input_ids) > max_len:
            if "text" not in record:
                raise pair_too_long(where, example, max_len)
            windows = text_windows(example, max_len)
            split.append((number, len(windows)))
            examples.extend(windows)
            continue
        if example.target_tokens == 0:
            raise DataError(f"{where}: no token to learn from (text of one token?)")
        examples.append(example)
    if split:
        lines = ", ".join(f"{n} ({w})" for n, w in split[:5]) + (", ..." if len(split) > 5 else "")
        log.info(
            "%s: %d text records longer than --max-len %d split into %d windows of up to %d "
            "tokens (line (windows): %s)",
            path, len(split), max_len, sum(w for _, w in split), max_len, lines,
        )  # fmt: skip
    return examples


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return Batch(ids, mask, labels)


def epoch_batches(
    examples: list[Example], batch_size: int, seed: int, epoch: int, pad_id: int
) -> Iterator[Batch]:
    """One shuffled pass; the order depends only on (seed, epoch)."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """One JSON object per line (UTF-8), creating parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
