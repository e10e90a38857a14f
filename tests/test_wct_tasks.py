"""The benchmark's pieces: Austen task splits (stand-in corpus), title ranking, LoRA baseline."""

from __future__ import annotations

import pytest
import torch
import wct_tasks as tune_tasks
from transformers import AutoTokenizer
from wct_lora import lora_params_per_rank, rank_for_budget, trainable, wrap_lora

from owq.kernels.checkpoint import load_checkpoint
from owq.kernels.owq_linear import OWQLinear
from owq.quantizer.tuning.data import load_examples
from owq.quantizer.tuning.tune import TuneConfig, select_layers, train
from tests.test_wct_support import make_checkpoint, single_thread, task_records, write_records

__all__ = ["single_thread"]

NOVEL = """PRIDE AND PREJUDICE

By Jane Austen



Chapter 1


It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife.  However little known the
feelings or views of such a man may be on his first entering a
neighbourhood, this truth is so well fixed in the minds of the
surrounding families, that he is considered the rightful property of
some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that
Netherfield Park is let at last?"  Mr. Bennet replied that he had not.
"But it is," returned she; "for Mrs. Long has just been here, and she
told me all about it."  Mr. Bennet made no answer.
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tasks") / "base")


def test_paragraphs_drop_headings_and_join_lines():
    paras = tune_tasks.paragraphs(NOVEL)
    assert len(paras) == 2 and paras[0].startswith("It is a truth")
    assert "\n" not in paras[0] and "  " not in paras[0]


def test_sentences_and_passages():
    sents = tune_tasks.sentences(NOVEL)
    assert sents[0].endswith("wife.") and sents[1].startswith("However")
    assert any(s.startswith('"My dear Mr. Bennet,"') for s in sents)
    for passage in tune_tasks.passages(NOVEL, per=2, min_chars=10, max_chars=10_000):
        assert passage in " ".join(sents)


def test_domain_windows_are_disjoint_word_runs():
    windows = tune_tasks.domain_windows(NOVEL, words=10)
    words = " ".join(tune_tasks.paragraphs(NOVEL)).split()
    assert [w.split() for w in windows] == [
        words[i : i + 10] for i in range(0, 10 * len(windows), 10)
    ]


def test_novel_id_split_is_disjoint_and_seeded(monkeypatch):
    fake = {
        name: "\n\n".join(
            f"Line {i} of {name} starts here. Then comes more of {name} {i}. It ends {i} in {name}."
            for i in range(30)
        )
        for name in tune_tasks.TITLES
    }
    monkeypatch.setattr(tune_tasks, "read_novels", lambda: fake)
    monkeypatch.setattr(tune_tasks, "passages", lambda text: tune_tasks.sentences(text))
    kwargs = {"seed": 3, "n_train": 4, "n_test": 2}
    train_items, test_items = tune_tasks.novel_id_task(**kwargs)
    assert (train_items, test_items) == tune_tasks.novel_id_task(**kwargs)
    assert len(train_items) == 6 * 4 and len(test_items) == 6 * 2
    assert not {i.prompt for i in train_items} & {i.prompt for i in test_items}
    item = test_items[0]
    assert item.prompt.endswith(f"\n{tune_tasks.QUESTION}\nAnswer:")
    assert item.record()["completion"] == " " + tune_tasks.TITLES[item.novel]


def test_choice_logprobs_equal_full_forwards(checkpoint):
    model = load_checkpoint(checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    prompt, choices = "Anne Elliot was nobody . Which novel ?", ["persuasion", "emma", "pride"]
    got = tune_tasks.choice_logprobs(model, tok, prompt, choices)
    for score, choice in zip(got, choices, strict=True):
        ids = tok(prompt).input_ids
        cont = tok(choice, add_special_tokens=False).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([ids + cont])).logits[0].log_softmax(-1)
        expected = sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(cont))
        torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-4)


def test_lora_wraps_owq_linear_and_trains_only_lora(checkpoint, tmp_path):
    model = load_checkpoint(checkpoint)
    budget = sum(model.get_submodule(p).oweight.numel() for p in select_layers(model))
    rank = rank_for_budget(model, budget)
    assert abs(rank * lora_params_per_rank(model) - budget) <= lora_params_per_rank(model) / 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = wrap_lora(model, rank)
    assert sum(isinstance(m, OWQLinear) for m in model.modules()) == 2 * 7
    params = trainable(peft_model)
    assert sum(p.numel() for p in params) == rank * lora_params_per_rank(model)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    examples = load_examples(write_records(tmp_path / "t.jsonl", task_records()), tok, 64)
    result = train(peft_model, params, examples, TuneConfig(max_steps=6, lr=1e-2, batch_size=3))
    assert result.final_loss < result.first_loss
    base = peft_model.get_base_model().state_dict()
    for name, tensor in before.items():
        key = name.replace(".weight", ".base_layer.weight")
        for candidate in (name, key, *(k for k in base if k.endswith(name.split(".", 1)[1]))):
            if candidate in base and "lora_" not in candidate:
                assert torch.equal(base[candidate], tensor), name
                break
