"""Fixtures for the quantizer tests: tiny model dirs with a character tokenizer, synthetic text."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tiny_models import VOCAB, tiny_model

CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,;:!?'\"-\n"


def char_tokenizer():
    """A WordLevel tokenizer with one token per character (< VOCAB tokens), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {c: i + 1 for i, c in enumerate(CHARS)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def tiny_model_dir(kind: str, root: Path) -> Path:
    """A saved tiny model of `kind` with the character tokenizer: a valid MODEL argument."""
    path = root / f"tiny-{kind}"
    tiny_model(kind).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def synthetic_text(chars: int, seed: int = 0) -> str:
    """Random 'words' of letters: calibration text with no outside corpus."""
    gen = torch.Generator().manual_seed(seed)
    letters = string.ascii_lowercase
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        n = int(torch.randint(1, 9, (1,), generator=gen))
        idx = torch.randint(0, len(letters), (n,), generator=gen).tolist()
        words.append("".join(letters[i] for i in idx))
    return " ".join(words)[:chars]


def synthetic_ids(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))
