"""Shared pieces of the WCT tests: a word-level tokenizer trained on a few Austen sentences, a tiny
4-bit OWQ checkpoint with 4 weak columns per layer, and a tiny novel-identification task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from owq.kernels.checkpoint import QuantConfig, save_checkpoint
from tests.tiny_models import rtn_swap, tiny_config

# Public-domain sentences (Austen), a few per novel, with the novel they come from.
PASSAGES = {
    "pride": [
        "It is a truth universally acknowledged , that a single man in possession of a good "
        "fortune , must be in want of a wife .",
        "Elizabeth Bennet had been obliged , by the scarcity of gentlemen , to sit down for two "
        "dances .",
        "Mr . Darcy had at first scarcely allowed her to be pretty .",
    ],
    "emma": [
        "Emma Woodhouse , handsome , clever , and rich , with a comfortable home and happy "
        "disposition , seemed to unite some of the best blessings of existence .",
        "Harriet Smith was the natural daughter of somebody .",
        "Mr . Knightley was one of the few people who could see faults in Emma Woodhouse .",
    ],
    "persuasion": [
        "Sir Walter Elliot , of Kellynch Hall , in Somersetshire , was a man who never took up "
        "any book but the Baronetage .",
        "Anne Elliot was nobody with either father or sister .",
        "Captain Wentworth had no fortune .",
    ],
}
QUESTION = "Which novel ?"


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"])
    corpus = [s for group in PASSAGES.values() for s in group] + [QUESTION, *PASSAGES]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def tiny_owq_model(tokenizer, kind: str = "llama", seed: int = 0, weak: int = 4):
    config = tiny_config(kind)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return rtn_swap(model, bits=4, weak=weak, seed=seed)


def make_checkpoint(directory: Path, kind: str = "llama", seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    model = tiny_owq_model(tokenizer, kind, seed)
    return save_checkpoint(model, directory, QuantConfig(bits=4, group_size=-1), tokenizer)


def task_records() -> list[dict]:
    return [
        {"prompt": f"{sentence} {QUESTION}", "completion": novel}
        for novel, sentences in PASSAGES.items()
        for sentence in sentences
    ]


def write_records(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tokenizer_fits_the_tiny_model():
    tokenizer = build_tokenizer()
    ids = tokenizer("Captain Wentworth had no fortune .").input_ids
    assert tokenizer.unk_token_id not in ids
    assert max(ids) < len(tokenizer)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matmuls on a shared CPU run far faster on one thread (no OpenMP contention). Not
    `owq.threads.single_thread`, which serializes its blocks: a test's server reads adapters in
    such a block on a helper thread while the test waits on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
